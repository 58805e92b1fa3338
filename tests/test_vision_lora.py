"""LoRA on the vision side (``model.args.VISION_TARGETS``): which layers the target names select, the
adapter file's names, save/load, merging into native and Hugging Face base folders, and NF4, on a tiny
random ``Mistral3ForConditionalGeneration`` fed images of different sizes. Export to transformers and
PEFT: tests/test_vision_export.py."""

from __future__ import annotations

import json

import pytest
import torch

from model.args import DEFAULT_TARGETS, VISION_TARGETS, LoraArgs
from model.checkpoint import iter_checkpoint_tensors, load_adapters
from model.configs import load_model_args, params_from_args
from model.lora import LoRALinear, freeze_all_but_lora, lora_file_state, lora_modules, lora_state_dict
from model.merge import merged_weights
from model.multimodal import is_vision_key
from model.transformer import Transformer
from tests.model_helpers import hf_and_native_mistral3, tiny_mistral_text_config, write_consolidated
from tests.test_vision_encoder import IMG, MERGE, PATCH, VOCAB, _row

ALL_TARGETS = [*DEFAULT_TARGETS, *VISION_TARGETS]
# Those a grouped-query attention model has (the default list also names latent attention's).
PRESENT = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", *VISION_TARGETS]
# One layer of each vision kind, as the adapter file names them (a public contract, as the text model's).
VISION_ADAPTER_KEYS = {
    f"{module}.lora_{ab}.weight"
    for module in (
        *(f"vision_encoder.transformer.layers.{i}.attention.{w}" for i in (0, 1) for w in ("wq", "wk", "wv", "wo")),
        *(f"vision_encoder.transformer.layers.{i}.feed_forward.{w}" for i in (0, 1) for w in ("w1", "w2", "w3")),
        "vision_language_adapter.w_in", "vision_language_adapter.w_out", "patch_merger.merging_layer",
    )
    for ab in "AB"
}


def mistral3_config():
    """Tiny, with every in_features a multiple of NF4's block of 64 and a biased projector (Pixtral's)."""
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=tiny_mistral_text_config(VOCAB),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=PATCH, head_dim=32, hidden_act="silu"),
        image_token_index=IMG, spatial_merge_size=MERGE, multimodal_projector_bias=True, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the same weights in the native layout)."""
    return hf_and_native_mistral3(mistral3_config(), tmp_path_factory.mktemp("vision_lora"))


def logits(model: Transformer) -> torch.Tensor:
    """The packed row of two documents with three images (tests.test_vision_encoder)."""
    tokens, seqlens, images = _row()
    with torch.no_grad():
        return model(tokens, seqlens, images=[i for doc in images for i in doc])


def trained(model: Transformer, seed: int = 1, std: float = 0.1) -> Transformer:
    """Adapters as training leaves them (lora_B is zero at initialisation), of size ``std``."""
    freeze_all_but_lora(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def adapter_checkpoint(model: Transformer, root, targets: list[str]):
    """The consolidated/ folder training writes under ``root`` for ``model``'s adapters (``write_consolidated``),
    its params.json listing the ``targets`` this model has."""
    return write_consolidated(root, params_from_args(model.args), model.lora,
                              model.args.present_targets(targets, vision=True), "lora.safetensors",
                              lora_file_state(model))


def test_target_names_select_the_vision_layers_only_by_full_name(folders):
    _, hf_folder, _ = folders
    args = load_model_args(hf_folder)

    def adapted(targets: list[str]) -> set[str]:
        return set(lora_modules(Transformer(args, lora=LoraArgs(rank=2, target_modules=targets), vision=True)))

    default = adapted(list(DEFAULT_TARGETS))
    assert default and not any(is_vision_key(n) for n in default)  # plain wq, w1 ...: the language model only
    vision = adapted(list(VISION_TARGETS))
    assert {f"{n}.lora_{ab}.weight" for n in vision for ab in "AB"} == VISION_ADAPTER_KEYS
    assert adapted(["vision_encoder.wq", "patch_merger.merging_layer"]) == {
        "vision_encoder.transformer.layers.0.attention.wq", "vision_encoder.transformer.layers.1.attention.wq",
        "patch_merger.merging_layer"}
    assert adapted(ALL_TARGETS) == default | vision
    # The adapter's params.json lists what this model has; a text-only build has no vision layers.
    assert args.present_targets(ALL_TARGETS) == PRESENT
    assert args.present_targets(ALL_TARGETS, vision=False) == PRESENT[:7]
    with pytest.raises(ValueError, match=r"lora.target_modules has \['vision_encoder.q_proj'\]"):
        LoraArgs(target_modules=["vision_encoder.q_proj"])


def test_zero_adapters_equal_the_base_and_only_adapters_train(folders):
    _, _, native = folders
    base = Transformer.from_folder(native, dtype=torch.float32, vision=True).eval()
    model = Transformer.from_folder(native, dtype=torch.float32, vision=True,
                                    lora=LoraArgs(rank=2, target_modules=ALL_TARGETS)).eval()
    assert isinstance(model.vision_language_adapter.w_in, LoRALinear)
    assert model.vision_language_adapter.w_in.bias is not None  # the projector's bias, loaded as the base's
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    trained(model)
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)
    tokens, seqlens, images = _row()
    model(tokens, seqlens, images=[i for doc in images for i in doc]).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(lora_state_dict(model))
    assert VISION_ADAPTER_KEYS <= with_grad


def test_adapter_file_names_and_round_trip(folders, tmp_path):
    _, _, native = folders
    lora = LoraArgs(rank=2, target_modules=ALL_TARGETS)
    model = trained(Transformer.from_folder(native, dtype=torch.float32, vision=True, lora=lora))
    ckpt = adapter_checkpoint(model, tmp_path / "ckpt", ALL_TARGETS)
    state = lora_file_state(model)
    assert {k for k in state if is_vision_key(k)} == VISION_ADAPTER_KEYS
    assert json.loads((ckpt / "params.json").read_text())["lora"]["target_modules"] == PRESENT
    fresh = Transformer.from_folder(native, dtype=torch.float32, vision=True, lora=lora).eval()
    load_adapters(fresh, ckpt / "lora.safetensors")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    text_lora = Transformer.from_folder(native, dtype=torch.float32, vision=True, lora=LoraArgs(rank=2))
    with pytest.raises(ValueError, match=r"unexpected \['patch_merger.merging_layer.lora_A.weight'"):
        load_adapters(text_lora, ckpt / "lora.safetensors")


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_merged_folder_gives_the_lora_models_logits_with_images(folders, tmp_path, layout):
    from utils.merge_lora import main as merge

    _, hf_folder, native = folders
    base = native if layout == "native" else hf_folder
    lora = LoraArgs(rank=2, scaling=1.5, target_modules=ALL_TARGETS)
    model = trained(Transformer.from_folder(base, dtype=torch.float32, vision=True, lora=lora))
    ckpt = adapter_checkpoint(model, tmp_path / "ckpt", ALL_TARGETS)
    assert merge(["--base_model", str(base), "--lora", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    merged = Transformer.from_folder(tmp_path / "merged", dtype=torch.float32, vision=True).eval()
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-4, atol=1e-4)
    # Every vision weight with an adapter moved; the rest (norms, conv, the projector's bias) is the base's.
    stored = {k: t for k, t, _ in iter_checkpoint_tensors(native)}
    out = {k: t for k, t, _ in iter_checkpoint_tensors(tmp_path / "merged")}
    for key in (k for k in stored if is_vision_key(k)):
        adapted = f"{key.removesuffix('.weight')}.lora_A.weight" in VISION_ADAPTER_KEYS
        assert torch.equal(out[key], stored[key]) != adapted, key


def test_live_merge_equals_unmerged_with_images(folders):
    """``merged_weights`` (training's merged save) folds the vision adapters too."""
    _, _, native = folders
    model = trained(Transformer.from_folder(native, dtype=torch.float32, vision=True,
                                            lora=LoraArgs(rank=2, target_modules=ALL_TARGETS)))
    plain = Transformer(model.args, vision=True).eval()
    plain.load_state_dict(dict(merged_weights(model)))
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-4, atol=1e-4)


def test_nf4_vision_targets_equal_the_dequantized_model(folders):
    pytest.importorskip("bitsandbytes")
    from model.quant import NF4LoRALinear, quantize_lora_layers

    _, _, native = folders
    model = trained(Transformer.from_folder(native, dtype=torch.float32, vision=True,
                                            lora=LoraArgs(rank=2, target_modules=ALL_TARGETS)))
    bias = model.vision_language_adapter.w_out.bias.clone()
    quantize_lora_layers(model, torch.float32)
    nf4 = {n for n, m in lora_modules(model).items() if isinstance(m, NF4LoRALinear)}
    assert {f"{n}.lora_{ab}.weight" for n in nf4 if is_vision_key(n) for ab in "AB"} == VISION_ADAPTER_KEYS
    assert torch.equal(model.vision_language_adapter.w_out.bias, bias)
    # The same model without adapters, its linears holding the de-quantized NF4 weights, adapters folded in.
    plain = Transformer(model.args, vision=True).eval()
    plain.load_state_dict(dict(merged_weights(model)))
    torch.testing.assert_close(logits(model), logits(plain), rtol=1e-4, atol=1e-4)
