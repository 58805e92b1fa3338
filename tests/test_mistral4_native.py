"""Mistral Small 4 in Mistral's native format: ``params.json`` with the top-level latent-attention keys,
``yarn`` and ``llama_4_scaling``, and ``consolidated.safetensors`` with one tensor per expert under the
names vLLM's Mistral Large 3 loader reads. The same tiny random weights are written as a transformers
``Mistral4ForCausalLM`` folder and, converted here independently of ``model.hf``, as a native folder;
both must load to the same network and to transformers' logits."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.configs import args_from_params, params_from_args
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf
from tests.test_mistral4_mla import ORIGINAL, SEQLENS  # positions run past the original context
from tests.test_mistral4_mla import _tokens as tokens

VOCAB = 128


def _hf_rope(apply_scale: bool) -> dict:
    """transformers' rope_parameters for the native yarn block with ``apply_scale`` as vLLM reads it
    for latent attention: true is DeepSeek's mscale_all_dim 1 (softmax scale times mscale squared,
    rotations unscaled), false is an attention factor of 1 with no softmax scaling."""
    magnitude = {"mscale": 1.0, "mscale_all_dim": 1.0} if apply_scale else {"attention_factor": 1.0}
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 8.0, "beta_slow": 1.0, "llama_4_scaling_beta": 0.3, "partial_rotary_factor": 8 / 24,
            **magnitude}


def native_params(apply_scale: bool = False) -> dict:
    """params.json as Mistral writes it for Mistral Small 4 (tiny): latent attention at the top level,
    n_kv_heads = n_heads, head_dim = qk_nope_head_dim + qk_rope_head_dim, the fine-grained moe block."""
    return {
        "dim": 64, "n_layers": 3, "head_dim": 24, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 4,
        "rope_theta": 10000.0, "norm_eps": 1e-06, "vocab_size": VOCAB, "tied_embeddings": False,
        "max_position_embeddings": 4 * ORIGINAL,
        "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "llama_4_scaling": {"original_max_position_embeddings": ORIGINAL, "beta": 0.3},
        "yarn": {"original_max_position_embeddings": ORIGINAL, "factor": 4.0, "apply_scale": apply_scale,
                 "beta": 8.0, "alpha": 1.0},
        "moe": {"expert_hidden_dim": 16, "route_every_n": 1, "first_k_dense_replace": 1, "num_experts": 16,
                "num_experts_per_tok": 4, "num_expert_groups": 1, "num_expert_groups_per_tok": 1,
                "routed_scale": 1.5, "num_shared_experts": 1},
    }


def hf_model(folder: Path, apply_scale: bool = False):
    """The tiny random ``Mistral4ForCausalLM`` that ``native_params`` describes, saved in ``folder``."""
    from transformers import Mistral4Config, Mistral4ForCausalLM

    p = native_params(apply_scale)
    config = Mistral4Config(
        vocab_size=VOCAB, hidden_size=p["dim"], intermediate_size=p["hidden_dim"], num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], q_lora_rank=p["q_lora_rank"],
        kv_lora_rank=p["kv_lora_rank"], qk_nope_head_dim=p["qk_nope_head_dim"], qk_rope_head_dim=p["qk_rope_head_dim"],
        v_head_dim=p["v_head_dim"], first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=16, n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.5,
        rms_norm_eps=p["norm_eps"], max_position_embeddings=4 * ORIGINAL, rope_parameters=_hf_rope(apply_scale),
    )
    torch.manual_seed(0)
    return save_random_hf(Mistral4ForCausalLM(config), folder)


# transformers' Mistral4 names -> Mistral's consolidated ones, as vLLM's MistralLarge3ForCausalLM.remapping
# maps them the other way (vllm/model_executor/models/mistral_large_3.py).
_RENAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"layers.\1.attention.wq_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"layers.\1.attention.q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"layers.\1.attention.wq_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", r"layers.\1.attention.wkv_a_with_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"layers.\1.attention.kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", r"layers.\1.attention.wkv_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight", r"layers.\1.shared_experts.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight", r"layers.\1.shared_experts.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.weight", r"layers.\1.shared_experts.w3.weight"),
]
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def native_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Mistral4 state dict under Mistral's consolidated names: transformers' fused
    ``gate_up_proj`` (experts, 2 * hidden, dim; gate rows first) and ``down_proj`` split per expert. Latent
    attention rotates adjacent pairs in both (rope_interleave; vLLM's is_neox_style=False): no permutation."""
    out = {}
    for key, tensor in hf_state.items():
        fused = _FUSED.fullmatch(key)
        if fused:
            layer, which = fused.groups()
            for e, w in enumerate(tensor):
                if which == "down_proj":
                    out[f"layers.{layer}.experts.{e}.w2.weight"] = w.clone()
                else:
                    gate, up = w.chunk(2, dim=0)
                    out[f"layers.{layer}.experts.{e}.w1.weight"] = gate.clone()
                    out[f"layers.{layer}.experts.{e}.w3.weight"] = up.clone()
            continue
        for pattern, name in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, name, key)] = tensor.clone()
                break
        else:
            raise AssertionError(f"no native name for {key}")
    return out


def write_native(folder: Path, state: dict[str, torch.Tensor], params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "consolidated.safetensors"))
    return folder


@pytest.mark.parametrize("apply_scale", [False, True], ids=["apply_scale_false", "apply_scale_true"])
def test_native_folder_equals_hf_folder_and_transformers(tmp_path, apply_scale):
    hf = hf_model(tmp_path / "hf", apply_scale)
    state = native_state(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "layers.2.experts.15.w3.weight" in state and "layers.1.shared_experts.w2.weight" in state
    assert "layers.0.feed_forward.w1.weight" in state and "layers.1.gate.weight" in state
    write_native(tmp_path / "native", state, native_params(apply_scale))

    from_hf = Transformer.from_folder(tmp_path / "hf", device="cpu", dtype=torch.float32).eval()
    native = Transformer.from_folder(tmp_path / "native", device="cpu", dtype=torch.float32).eval()
    assert replace(native.args, extra={}) == replace(from_hf.args, extra={})
    mla = native.args.mla
    assert mla is not None and mla.q_lora_rank == 32
    assert native.args.yarn.attention_factor == 1.0  # latent attention's rotations keep magnitude 1
    assert (mla.softmax_scale_factor > 1.0) == apply_scale
    assert native.args.moe.fine_grained and native.args.moe.num_experts == 16 and native.args.moe.first_k_dense_replace == 1
    with torch.no_grad():
        torch.testing.assert_close(native(tokens(), SEQLENS), from_hf(tokens(), SEQLENS), rtol=0, atol=0)
    assert_packed_matches_hf(native, hf, tokens(), SEQLENS)


@pytest.mark.parametrize("apply_scale", [False, True])
def test_params_json_round_trips(apply_scale):
    params = native_params(apply_scale)
    args = args_from_params(params)
    written = params_from_args(args)
    # Key for key, values included; tied_embeddings false is the default and not written.
    assert written == {k: v for k, v in params.items() if k != "tied_embeddings"}
    assert args_from_params(written) == args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"q_lora_rank": None, "kv_lora_rank": None}, "'kv_lora_rank' is missing"),
        ({"v_head_dim": 0}, "'v_head_dim' must be a positive integer"),
        ({"qk_rope_head_dim": 7, "head_dim": 23}, "'qk_rope_head_dim' must be even"),
        ({"head_dim": 16}, r"'head_dim' 16 is not qk_nope_head_dim \+ qk_rope_head_dim \(24\)"),
        ({"n_kv_heads": 2}, "'n_kv_heads' 2 differs from 'n_heads' 4"),
        ({"sliding_window": 8}, "'sliding_window' with latent attention is not implemented"),
        ({"yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.2}},
         "'yarn.attention_factor' is not read for latent attention"),
        ({"yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0}},
         r"'yarn' has unknown key\(s\) \['mscale'\]"),
        ({"moe": {**native_params()["moe"], "use_load_balancing_bias": True}},
         r"'moe' has \['use_load_balancing_bias'\], which this library does not implement"),
    ],
)
def test_params_json_refusals_name_the_key(change, match):
    with pytest.raises(ValueError, match="m/params.json: " + match):
        args_from_params({**native_params(), **change}, source="m/params.json")


def test_params_json_refuses_a_scale_it_cannot_write():
    args = args_from_params(native_params())
    with pytest.raises(ValueError, match="has no params.json spelling"):
        params_from_args(replace(args, mla=replace(args.mla, softmax_scale_factor=1.7)))


# --- Native FP8 release (model.fp8) ---

# Mistral Small 4's FP8 layout, as vLLM's MistralLarge3 loader reads it (``qscale_weight`` -> weight_scale,
# ``qscale_act`` -> input_scale): every expert, shared-expert, dense feed-forward and latent-attention
# projection is float8_e4m3fn with a per-tensor weight scale and a static activation scale; the router
# ``gate``, ``wq_a`` and ``wkv_a_with_mqa`` (kept out here to show a mixed file loads), norms,
# embeddings and ``output`` stay bf16.
_FP8 = re.compile(r"layers\.\d+\.(experts\.\d+\.w[123]|shared_experts\.w[123]|feed_forward\.w[123]|"
                  r"attention\.(wq_b|wkv_b|wo))\.weight")
E4M3_MAX = 448.0


def fp8_release(hf_state: dict[str, torch.Tensor], row_scaled: str) -> tuple[dict, dict]:
    """(the FP8 file's tensors, the same weights dequantized in float32); ``row_scaled`` gets one scale
    per output row, the others one per tensor (0-dim, as Mistral stores them)."""
    fp8, dequantized = {}, {}
    for key, w in native_state(hf_state).items():
        w = w.to(torch.bfloat16)
        if not _FP8.fullmatch(key):
            fp8[key] = dequantized[key] = w
            continue
        per_row = key == row_scaled
        amax = w.float().abs().amax(dim=1, keepdim=True) if per_row else w.float().abs().max()
        scale = amax / E4M3_MAX  # (out, 1) or ()
        q = (w.float() / scale).to(torch.float8_e4m3fn)
        name = key.removesuffix(".weight")
        fp8[key] = q
        fp8[f"{name}.qscale_weight"] = scale.reshape(-1) if per_row else scale
        fp8[f"{name}.qscale_act"] = torch.tensor(0.05)
        dequantized[key] = q.float() * scale
    return fp8, dequantized


def test_fp8_release_loads_as_its_dequantized_weights(tmp_path):
    hf_model(tmp_path / "hf")
    hf_state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    fp8, dequantized = fp8_release(hf_state, row_scaled="layers.1.experts.3.w2.weight")
    assert fp8["layers.2.experts.7.w1.weight"].dtype == torch.float8_e4m3fn
    assert fp8["layers.2.experts.7.w1.qscale_weight"].dim() == 0
    assert fp8["layers.1.gate.weight"].dtype == fp8["layers.1.attention.wkv_a_with_mqa.weight"].dtype == torch.bfloat16
    quantization = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    write_native(tmp_path / "fp8", fp8, {**native_params(), "quantization": quantization})
    write_native(tmp_path / "direct", dequantized, native_params())

    release = Transformer.from_folder(tmp_path / "fp8", device="cpu", dtype=torch.float32).eval()
    direct = Transformer.from_folder(tmp_path / "direct", device="cpu", dtype=torch.float32).eval()
    assert release.args == direct.args  # the quantization block describes the files, not the network
    for (name, a), (_, b) in zip(release.state_dict().items(), direct.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        logits = release(tokens(), SEQLENS)
        torch.testing.assert_close(logits, direct(tokens(), SEQLENS), rtol=0, atol=0)
    # The quantization is real: FP8 rounding moves the logits away from the bf16 weights'.
    bf16 = {k: v.to(torch.bfloat16) for k, v in native_state(hf_state).items()}
    reference = Transformer.from_folder(write_native(tmp_path / "bf16", bf16, native_params()), device="cpu",
                                        dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(logits, reference(tokens(), SEQLENS), rtol=0, atol=1e-4)


# --- Merging adapters into a native folder (model.merge, utils.merge_lora) ---


def test_merge_lora_into_native_folder_equals_the_lora_model(tmp_path):
    from model.args import LoraArgs
    from model.lora import lora_file_state
    from model.merge import merged_weights
    from utils import merge_lora

    hf_model(tmp_path / "hf")
    base = write_native(tmp_path / "base", native_state(load_file(str(tmp_path / "hf" / "model.safetensors"))),
                        native_params())
    # Adapters on latent attention, dense, routed-expert and shared-expert layers, as training saves them.
    lora = LoraArgs(rank=4, scaling=1.5, target_modules=["wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo", "w1", "w2", "w3"])
    model = Transformer.from_folder(base, device="cpu", dtype=torch.float32, lora=lora).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_state = lora_file_state(model)
    assert "layers.1.experts.15.w3.lora_B.weight" in adapter_state and "layers.2.shared_experts.w2.lora_A.weight" in adapter_state
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(adapter / "lora.safetensors"))
    params = {**params_from_args(model.args), "lora": {"enable": True, "rank": lora.rank, "scaling": lora.scaling}}
    (adapter / "params.json").write_text(json.dumps(params))

    out = tmp_path / "merged"
    assert merge_lora.main(["--base_model", str(base), "--lora", str(adapter), "--out", str(out)]) == 0
    merged = load_file(str(out / "consolidated.safetensors"))
    # save_adapters: false writes merged_weights(model): the same tensors under the same native names.
    expected = dict(merged_weights(model))
    assert sorted(merged) == sorted(expected) == sorted(load_file(str(base / "consolidated.safetensors")))
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0, msg=key)
    written = json.loads((out / "params.json").read_text())
    assert written == {k: v for k, v in native_params().items() if k != "tied_embeddings"}

    plain = Transformer.from_folder(out, device="cpu", dtype=torch.float32).eval()
    assert plain.args == model.args
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens(), SEQLENS), model(tokens(), SEQLENS), rtol=1e-5, atol=1e-5)
        # The adapters matter: the merged model is not the base.
        base_model = Transformer.from_folder(base, device="cpu", dtype=torch.float32).eval()
        assert not torch.allclose(plain(tokens(), SEQLENS), base_model(tokens(), SEQLENS), atol=1e-3)
