"""Mistral Small 3.x / Magistral / Devstral Small: text fine-tuning of a multimodal checkpoint. The
language model trains; the Pixtral vision encoder and adapter are carried bit for bit. Checked against
transformers' own ``Mistral3ForConditionalGeneration`` on a tiny random model, in the Hugging Face
layout and the native one (params.json ``vision_encoder`` + ``vision_encoder.*`` ... weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors, save_model_folder
from model.configs import args_from_params, load_model_args, params_from_args
from model.hf_config import args_from_hf_config
from model.lora import freeze_all_but_lora, lora_file_state
from model.multimodal import is_vision_key
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf, tiny_mistral_text_config

SEQLENS = [19, 7, 12]
VOCAB = 128
# Native names a Mistral Small 3.1 release uses (vLLM's and mistral-inference's loaders read these).
NATIVE_VISION = {
    "vision_encoder.patch_conv.weight", "vision_encoder.ln_pre.weight",
    "vision_encoder.transformer.layers.0.attention.wq.weight", "vision_encoder.transformer.layers.0.attention.wk.weight",
    "vision_encoder.transformer.layers.0.attention.wv.weight", "vision_encoder.transformer.layers.0.attention.wo.weight",
    "vision_encoder.transformer.layers.0.attention_norm.weight", "vision_encoder.transformer.layers.0.ffn_norm.weight",
    "vision_encoder.transformer.layers.0.feed_forward.w1.weight", "vision_encoder.transformer.layers.0.feed_forward.w2.weight",
    "vision_encoder.transformer.layers.0.feed_forward.w3.weight",
    "vision_language_adapter.w_in.weight", "vision_language_adapter.w_out.weight",
    "patch_merger.merging_layer.weight", "pre_mm_projector_norm.weight",
}


def _config(**vision):
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=tiny_mistral_text_config(VOCAB, intermediate_size=96),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14, head_dim=16, hidden_act="silu", **vision),
        image_token_index=10, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the same model converted to the native layout)."""
    from transformers import Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("mistral3")
    torch.manual_seed(0)
    hf = Mistral3ForConditionalGeneration(_config())
    save_random_hf(hf, root / "hf")
    native = root / "native"
    state = {key: t for key, t, _ in iter_checkpoint_tensors(root / "hf")}
    save_model_folder(native, params_from_args(load_model_args(root / "hf")), state)
    return hf.eval(), root / "hf", native


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (sum(SEQLENS),), generator=torch.Generator().manual_seed(0))


def _assert_matches(ours: Transformer, hf) -> float:
    """Packed text logits == transformers run alone on each document; the worst relative error."""
    return assert_packed_matches_hf(ours, hf, _tokens(), SEQLENS)


def _hf_vision(hf) -> dict[str, torch.Tensor]:
    return {k: v for k, v in hf.state_dict().items() if "vision_tower" in k or "multi_modal_projector" in k}


def test_text_logits_match_transformers_in_both_layouts(folders):
    hf, hf_folder, native = folders
    ours = Transformer.from_folder(hf_folder, device="cpu", dtype=torch.float32).eval()
    assert _assert_matches(ours, hf) < 1e-4
    params = json.loads((native / "params.json").read_text())
    assert params["vision_encoder"]["hidden_size"] == 32 and params["vision_encoder"]["image_token_id"] == 10
    with safe_open(str(native / "consolidated.safetensors"), "pt") as f:
        assert {k for k in f.keys() if is_vision_key(k)} == NATIVE_VISION
    from_native = Transformer.from_folder(native, device="cpu", dtype=torch.float32).eval()
    assert from_native.args == ours.args
    assert not any(is_vision_key(k) for k in from_native.state_dict())  # the vision side is not built
    assert _assert_matches(from_native, hf) < 1e-4


def test_native_vision_qk_rows_are_interleaved_as_transformers_converts_them(folders):
    """transformers' Pixtral conversion permutes the native q/k rows per head, (heads, head_dim/2, 2) ->
    (heads, 2, head_dim/2), as for the text model; every other vision weight is the same tensor."""
    hf, _, native = folders
    hf_state = _hf_vision(hf)
    ours = _native_vision(native)
    for leaf in ("q", "k"):
        w = ours[f"vision_encoder.transformer.layers.0.attention.w{leaf}.weight"]  # (heads * head_dim, dim)
        hf_rows = w.view(2, 8, 2, 32).transpose(1, 2).reshape(32, 32)
        assert torch.equal(hf_rows, hf_state[f"model.vision_tower.transformer.layers.0.attention.{leaf}_proj.weight"])
    assert torch.equal(ours["patch_merger.merging_layer.weight"],
                       hf_state["model.multi_modal_projector.patch_merger.merging_layer.weight"])
    assert torch.equal(ours["vision_language_adapter.w_in.weight"], hf_state["model.multi_modal_projector.linear_1.weight"])


def _adapter_run(base, tmp_path):
    """A LoRA model on ``base`` with trained-looking adapters, and its checkpoint folder."""
    lora = LoraArgs(rank=2, scaling=1.5)
    model = Transformer.from_folder(base, dtype=torch.float32, lora=lora)
    freeze_all_but_lora(model)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:  # lora_B is zero at initialisation
            torch.nn.init.normal_(p, std=0.1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in lora_file_state(model).items()}, str(ckpt / "lora.safetensors"))
    lora_params = {"enable": True, "rank": 2, "scaling": 1.5, "target_modules": lora.target_modules}
    (ckpt / "params.json").write_text(json.dumps({**params_from_args(model.args), "lora": lora_params}))
    return model.eval(), ckpt


def _native_vision(folder) -> dict[str, torch.Tensor]:
    return {k: t for k, t, _ in iter_checkpoint_tensors(folder) if is_vision_key(k)}


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_merge_lora_carries_every_vision_weight(folders, tmp_path, layout):
    from model.merge import merge_checkpoint
    from utils.merge_lora import main as merge

    hf, hf_folder, native = folders
    base = native if layout == "native" else hf_folder
    model, ckpt = _adapter_run(base, tmp_path)
    assert merge(["--base_model", str(base), "--lora", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    expected = _native_vision(native)
    merged_vision = _native_vision(tmp_path / "merged")
    assert merged_vision.keys() == expected.keys()
    for key, t in expected.items():
        assert merged_vision[key].dtype == t.dtype and torch.equal(merged_vision[key], t), key
    params = json.loads((tmp_path / "merged" / "params.json").read_text())
    assert params["vision_encoder"] == json.loads((native / "params.json").read_text())["vision_encoder"]
    merged = Transformer.from_folder(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_tokens(), SEQLENS), model(_tokens(), SEQLENS), rtol=1e-4, atol=1e-4)
    # A cast of the merged text weights leaves the vision weights as stored.
    merge_checkpoint(base, ckpt / "lora.safetensors", 1.5, tmp_path / "bf16", torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "consolidated.safetensors"), "pt") as f:
        assert f.get_tensor("layers.0.attention.wq.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("patch_merger.merging_layer.weight"), expected["patch_merger.merging_layer.weight"])


def test_training_merged_save_carries_vision_weights(folders):
    from finetune.checkpointing import gather_merged
    from finetune.loss import TransformerWithLoss

    _, _, native = folders
    model = Transformer.from_folder(native, dtype=torch.float32, lora=LoraArgs(rank=2))
    out = gather_merged(TransformerWithLoss(model), torch.bfloat16, native)
    for key, t in _native_vision(native).items():
        assert out[key].dtype == t.dtype and torch.equal(out[key], t), key
    assert out["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="base folder"):
        gather_merged(TransformerWithLoss(model), torch.bfloat16)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_merged_export_loads_as_mistral3_with_identical_vision(folders, tmp_path, layout):
    from transformers import Mistral3ForConditionalGeneration

    from utils.export_hf import main as export

    hf, hf_folder, native = folders
    base = native if layout == "native" else hf_folder
    model, ckpt = _adapter_run(base, tmp_path)
    export(["--checkpoint", str(ckpt), "--base_model", str(base), "--out", str(tmp_path / "out"), "--merged"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
    exported = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    expected, got = _hf_vision(hf), _hf_vision(exported)
    assert got.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    assert _assert_matches(model, exported) < 1e-4
    assert args_from_hf_config(config).extra["vision_encoder"] == load_model_args(native).extra["vision_encoder"]


def test_peft_adapter_targets_the_language_model(folders, tmp_path):
    from peft import PeftModel
    from transformers import Mistral3ForConditionalGeneration

    from utils.export_hf import main as export

    hf, hf_folder, _ = folders
    model, ckpt = _adapter_run(hf_folder, tmp_path)
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "peft")])
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    base = Mistral3ForConditionalGeneration.from_pretrained(hf_folder, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapted = {n for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert adapted and all(".language_model.layers." in n for n in adapted)  # none in the vision tower
    assert _assert_matches(model, peft) < 1e-4
    with torch.no_grad():  # the adapter matters, or the comparison proves nothing
        assert not torch.allclose(model(_tokens(), SEQLENS), hf(input_ids=_tokens()[None]).logits[0], atol=1e-3)


def test_refusals_name_the_key(folders, tmp_path):
    _, hf_folder, native = folders
    params = json.loads((native / "params.json").read_text())
    with pytest.raises(ValueError, match="'multimodal'"):
        args_from_params({**params, "multimodal": {"whisper_model_args": {}}})
    with pytest.raises(ValueError, match="vision_encoder.num_attention_heads"):
        args_from_params({**params, "vision_encoder": {"hidden_size": 32}})
    config = json.loads((hf_folder / "config.json").read_text())
    for change, match in (({"projector_hidden_act": "relu"}, "projector_hidden_act"),
                          ({"vision_config": {**config["vision_config"], "hidden_act": "gelu"}}, "vision_config.hidden_act"),
                          ({"text_config": "x"}, "text_config")):
        with pytest.raises(ValueError, match=match):
            args_from_hf_config({**config, **change})
    # A text-only params.json with vision weights is still a mismatch, named.
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "vision_encoder"}))
    (text_only / "consolidated.safetensors").symlink_to(native / "consolidated.safetensors")
    with pytest.raises(ValueError, match="weight .+ is not part of this model"):
        Transformer.from_folder(text_only, dtype=torch.float32)
