"""utils.export_hf for Mistral Small 4 (latent attention, fine-grained MoE) against transformers'
``Mistral4ForCausalLM`` and PEFT: the adapter loads with ``PeftModel.from_pretrained`` and gives our
logits, routed experts included (PEFT ``target_parameters`` on the fused ``gate_up_proj``/``down_proj``,
``model.hf_experts``); the merged export loads in transformers with our merged logits; the adapter
file keeps one key per expert at the layer level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from model.args import LoraArgs
from model.checkpoint import save_model_folder
from model.configs import load_model_args, params_from_args
from model.hf import peft_targets
from model.hf_config import args_from_hf_config, hf_config_from_args
from model.hf_experts import fuse_expert_weights
from model.keys import to_checkpoint_names
from model.lora import lora_file_state
from model.merge import merged_weights
from model.tiny import tiny_args
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf, train_adapters, write_consolidated
from tests.test_mistral4_mla import SEQLENS, _hf_config, _hf_model, _tokens
from tests.test_mistral4_moe import MOE  # layer 0 dense, layers 1 and 2 MoE here
from utils.export_hf import main as export

ALL = ["wq", "wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo", "w1", "w2", "w3"]
# PEFT checks rank/alpha patterns against targeted *modules* only and warns about the one that targets
# the fused gate_up_proj *parameter*; the logits checks below show it is applied.
PATTERN_WARNING = "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"


def _trained(
    tmp_path: Path, targets: list[str], q_lora_rank: int | None = 32, vision: bool = False
) -> tuple[Path, Transformer]:
    """A random HF Mistral4 base in tmp_path/base (inside a Mistral3ForConditionalGeneration with
    ``vision``) and a RUN_DIR laid out as training writes it (params.json with its lora section,
    lora.safetensors, args.yaml naming the base) after 3 AdamW steps; returns the checkpoint folder and
    the trained model."""
    base = tmp_path / "base"
    if vision:
        _hf_vision_model(base)
    else:
        _hf_model(base, q_lora_rank=q_lora_rank, n_layers=3, first_dense=1, **MOE)
    lora = LoraArgs(rank=4, scaling=1.5, dropout=0.1, target_modules=targets)
    model = Transformer.from_folder(base, device="cpu", dtype=torch.float32, lora=lora)
    train_adapters(model, _tokens())
    run = tmp_path / "run"
    folder = write_consolidated(run, params_from_args(model.args), lora, targets, "lora.safetensors",
                                lora_file_state(model))
    (run / "args.yaml").write_text(yaml.safe_dump({"model_id_or_path": str(base)}))
    return folder.parent, model.eval()


def _hf_vision_model(folder: Path):
    """The tiny Mistral 4 text model of ``_hf_model`` (q_lora_rank 32) inside a Mistral3ForConditionalGeneration
    with a one-layer Pixtral encoder, as transformers saves it."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {**_config(), "model_type": "mistral4"}
    config = Mistral3Config(
        text_config=text, image_token_index=10, tie_word_embeddings=False,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14, head_dim=16, hidden_act="silu"),
    )
    torch.manual_seed(0)
    return save_random_hf(Mistral3ForConditionalGeneration(config), folder)


def _hf(folder: Path):
    from transformers import Mistral4ForCausalLM  # transformers 5.24's AutoModelForCausalLM has no mistral4

    return Mistral4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _base_logits(tmp_path: Path) -> torch.Tensor:
    base = Transformer.from_folder(tmp_path / "base", device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        return base(_tokens(), SEQLENS)


@pytest.mark.parametrize(
    "targets",
    [ALL, ["experts.w1", "wq_b"], ["experts.w3", "wkv_b"], ["experts.w2", "wo"], ["shared_experts.w1"]],
    ids=["all", "experts_w1_only", "experts_w3_only", "experts_w2_only", "shared_experts_w1_only"],
)
@pytest.mark.filterwarnings(PATTERN_WARNING)
def test_peft_adapter_matches_our_model(tmp_path, targets):
    from peft import PeftModel

    ckpt, ours = _trained(tmp_path, targets)
    out = tmp_path / "peft"
    export(["--checkpoint", str(ckpt), "--out", str(out)])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6
    assert config["base_model_name_or_path"] == str(tmp_path / "base")  # from RUN_DIR/args.yaml
    # PEFT cannot apply dropout to fused expert parameters (lora.ParamWrapper refuses it).
    assert config["lora_dropout"] == (0.1 if targets == ["shared_experts.w1"] else 0.0)
    hf = PeftModel.from_pretrained(_hf(tmp_path / "base"), out).eval()
    assert assert_packed_matches_hf(ours, hf, _tokens(), SEQLENS) < 1e-4
    # The adapter must matter, or the comparison above proves nothing.
    with torch.no_grad():
        assert not torch.allclose(ours(_tokens(), SEQLENS), _base_logits(tmp_path), atol=1e-3)


@pytest.mark.filterwarnings(PATTERN_WARNING)
def test_adapter_key_contract(tmp_path):
    """lora.safetensors names every routed expert at the layer level (Mistral's names, model.keys); the
    PEFT file holds one ParamWrapper adapter per fused parameter, w1 and w3 side by side (rank 2r)."""
    ckpt, _ = _trained(tmp_path, ALL, q_lora_rank=None)
    state = load_file(str(ckpt / "consolidated" / "lora.safetensors"))
    layer1 = sorted(k for k in state if k.startswith("layers.1.") and "attention" not in k)
    assert layer1 == sorted(
        [f"layers.1.experts.{e}.{w}.lora_{ab}.weight" for e in range(16) for w in ("w1", "w2", "w3") for ab in "AB"]
        + [f"layers.1.shared_experts.{w}.lora_{ab}.weight" for w in ("w1", "w2", "w3") for ab in "AB"]
    )
    assert {"layers.0.feed_forward.w1.lora_A.weight", "layers.0.attention.wq.lora_B.weight",
            "layers.2.attention.wkv_a_with_mqa.lora_A.weight"} <= set(state)
    assert state["layers.2.experts.15.w2.lora_B.weight"].shape == (64, 4)  # (dim, rank)

    out = tmp_path / "peft"
    export(["--checkpoint", str(ckpt), "--out", str(out)])
    peft = load_file(str(out / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers"
    assert sorted(k for k in peft if k.startswith(f"{prefix}.1.mlp.")) == sorted(
        [f"{prefix}.1.mlp.experts.{inner}lora_{ab}.weight" for inner in ("", "base_layer.") for ab in "AB"]
        + [f"{prefix}.1.mlp.shared_experts.{p}.lora_{ab}.weight" for p in ("gate_proj", "up_proj", "down_proj")
           for ab in "AB"]
    )
    assert f"{prefix}.0.mlp.gate_proj.lora_A.weight" in peft and f"{prefix}.0.self_attn.q_proj.lora_B.weight" in peft
    gate_up_a = peft[f"{prefix}.1.mlp.experts.base_layer.lora_A.weight"]
    gate_up_b = peft[f"{prefix}.1.mlp.experts.base_layer.lora_B.weight"]
    assert gate_up_a.shape == (16 * 8, 64) and gate_up_b.shape == (2 * 16, 8 * 16)  # (E * 2r, dim), (2I, 2r * E)
    assert peft[f"{prefix}.1.mlp.experts.lora_A.weight"].shape == (16 * 4, 16)  # down_proj: (E * r, I)
    # Expert 3's gate_up update is [B1 A1; B3 A3]: lora_B read as (out, rank, experts), lora_A as (experts, rank, in).
    e = 3
    a, b = gate_up_a.view(16, 8, 64)[e], gate_up_b.view(32, 8, 16)[:, :, e]
    w1 = state[f"layers.1.experts.{e}.w1.lora_B.weight"] @ state[f"layers.1.experts.{e}.w1.lora_A.weight"]
    w3 = state[f"layers.1.experts.{e}.w3.lora_B.weight"] @ state[f"layers.1.experts.{e}.w3.lora_A.weight"]
    torch.testing.assert_close(b @ a, torch.cat([w1, w3]), rtol=0, atol=1e-7)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "mlp.down_proj", "mlp.gate_proj",
                                        "mlp.up_proj", "o_proj", "q_proj", "shared_experts.down_proj",
                                        "shared_experts.gate_proj", "shared_experts.up_proj"]
    assert config["rank_pattern"] == {r"mlp\.experts\.gate_up_proj": 8}
    assert config["alpha_pattern"] == {r"mlp\.experts\.gate_up_proj": 12}  # alpha / r unchanged: 12 / 8 = 6 / 4


def test_peft_targets_keep_scoped_names():
    """Scoped targets select routed or shared experts alone, in every MoE family; a dense model has neither."""
    mistral4 = args_from_hf_config(_config())
    scoped = LoraArgs(rank=2, target_modules=["experts.w2", "shared_experts.w1"])
    assert peft_targets(scoped, mistral4) == (["shared_experts.gate_proj"], ["mlp.experts.down_proj"])
    leaf = LoraArgs(rank=2, target_modules=["w3", "wq_b"])
    assert peft_targets(leaf, mistral4) == (["mlp.up_proj", "q_b_proj", "shared_experts.up_proj"],
                                            ["mlp.experts.gate_up_proj"])
    # Mixtral: PEFT converts hub-layout w1/w2/w3 itself, all three together (model.hf.to_peft_state_dict).
    mixtral = tiny_args(moe={"num_experts": 3, "num_experts_per_tok": 2})
    assert peft_targets(LoraArgs(rank=2, target_modules=["experts.w1", "wk"]), mixtral) == (
        ["k_proj", "w1", "w2", "w3"], [])
    assert peft_targets(LoraArgs(rank=2, target_modules=["experts.w1", "wk"]), tiny_args()) == (["k_proj"], [])


def _config() -> dict:
    """The config.json of the tiny model ``_trained`` writes, without weights."""
    return _hf_config(q_lora_rank=32, n_layers=3, first_dense=1, **MOE).to_dict()


def test_merged_export_loads_in_transformers(tmp_path):
    ckpt, ours = _trained(tmp_path, ALL)
    out = tmp_path / "merged"
    export(["--checkpoint", str(ckpt), "--out", str(out), "--merged", "--max_shard_size", "60KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the fused experts cross shard boundaries
    assert index["weight_map"].keys() == load_file(str(tmp_path / "base" / "model.safetensors")).keys()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral4" and config["torch_dtype"] == "float32"
    assert load_model_args(out) == ours.args  # config.json says the same model, mscales included

    assert assert_packed_matches_hf(ours, _hf(out), _tokens(), SEQLENS) < 1e-4
    # Fused on the way out, split on the way in: our import reads back exactly our merged weights.
    merged = dict(merged_weights(ours))  # checkpoint names: one tensor per expert
    back = Transformer.from_folder(out, device="cpu", dtype=torch.float32)
    for key, value in to_checkpoint_names(back.state_dict(), back.args).items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0)

    # A native base (params.json + sharded consolidated files, one key per expert) gives the same export,
    # and exported with no adapter it is the transformers base bit for bit.
    native = tmp_path / "native"
    base = Transformer.from_folder(tmp_path / "base", device="cpu", dtype=torch.float32)
    save_model_folder(native, params_from_args(base.args), base.state_dict(), layout="sharded")
    export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "from_native"), "--merged", "--base_model", str(native)])
    single = load_file(str(tmp_path / "from_native" / "model.safetensors"))
    for shard in set(index["weight_map"].values()):
        for key, value in load_file(str(out / shard)).items():
            torch.testing.assert_close(single[key], value, rtol=0, atol=0)
    export(["--checkpoint", str(native), "--out", str(tmp_path / "hf_base"), "--merged"])
    exported, hf_base = (load_file(str(f / "model.safetensors")) for f in (tmp_path / "hf_base", tmp_path / "base"))
    assert exported.keys() == hf_base.keys()
    for key, value in hf_base.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


@pytest.mark.filterwarnings(PATTERN_WARNING)
def test_inside_a_vision_model(tmp_path):
    """A Mistral 4 text model inside Mistral3ForConditionalGeneration: the adapter names the language model's
    modules (none of the vision tower's) and gives our logits; the merged export loads as that class with our
    logits and the vision weights unchanged."""
    from peft import PeftModel
    from transformers import Mistral3ForConditionalGeneration

    ckpt, ours = _trained(tmp_path, ALL, vision=True)
    assert ours.args.mla is not None and ours.args.extra.get("vision_encoder")
    export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "peft")])
    assert "base_model.model.model.language_model.layers.1.mlp.experts.base_layer.lora_A.weight" in load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors"))
    base = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapted = {n for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert {"base_model.model.model.language_model.layers.0.mlp.gate_proj.lora_A",
            "base_model.model.model.language_model.layers.1.mlp.shared_experts.up_proj.lora_A",
            "base_model.model.model.language_model.layers.2.mlp.experts.lora_A",
            "base_model.model.model.language_model.layers.2.self_attn.q_b_proj.lora_A"} <= adapted
    assert all(".language_model.layers." in n for n in adapted)  # none in the vision tower
    assert assert_packed_matches_hf(ours, peft, _tokens(), SEQLENS) < 1e-4

    export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"), "--merged"])
    merged = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert assert_packed_matches_hf(ours, merged, _tokens(), SEQLENS) < 1e-4
    exported, original = (load_file(str(f / "model.safetensors")) for f in (tmp_path / "merged", tmp_path / "base"))
    assert exported.keys() == original.keys()
    for key in [k for k in original if not k.startswith("language_model.")]:
        assert torch.equal(exported[key], original[key]), key


def test_fusing_refuses_incomplete_or_mismatched_experts():
    """The merged export fuses per-expert tensors; a truncated or damaged layer is named, not written."""
    w = torch.zeros(16, 64)
    experts = [(f"layers.1.experts.{e}.{p}.weight", w.T if p == "w2" else w)
               for e in range(3) for p in ("w1", "w2", "w3")]
    fused = dict(fuse_expert_weights([("norm.weight", w), *experts], num_experts=3))
    assert fused["layers.1.experts.gate_up_proj"].shape == (3, 32, 64) and "norm.weight" in fused
    with pytest.raises(ValueError, match=r"layer 1's routed experts are incomplete: no weight for \['experts.2.w3'\]"):
        dict(fuse_expert_weights(experts[:-1], num_experts=3))
    with pytest.raises(ValueError, match="routed expert 1's w3 weight is \\(8, 64\\)"):
        dict(fuse_expert_weights([*experts[:5], (experts[5][0], torch.zeros(8, 64))], num_experts=3))


def test_config_json_round_trips_the_mscales():
    """rope_parameters' mscale/mscale_all_dim are solved so transformers derives our rotation magnitude and
    softmax factor; the release's spelling (1.0, 1.0) is kept."""
    from dataclasses import replace

    args = args_from_hf_config(_config())
    rope = hf_config_from_args(args)["rope_parameters"]
    assert (rope["mscale"], rope["mscale_all_dim"], rope["partial_rotary_factor"]) == (1.0, 1.0, 8 / 24)
    for attention_factor, softmax in [(1.3, 1.0), (0.9, 1.7)]:
        other = replace(args, yarn=replace(args.yarn, attention_factor=attention_factor),
                        mla=replace(args.mla, softmax_scale_factor=softmax))
        back = args_from_hf_config(hf_config_from_args(other))
        assert back.yarn.attention_factor == pytest.approx(attention_factor, rel=1e-12)
        assert back.mla.softmax_scale_factor == pytest.approx(softmax, rel=1e-12)
    with pytest.raises(ValueError, match="without YaRN has no transformers config"):
        hf_config_from_args(replace(args, yarn=None))
