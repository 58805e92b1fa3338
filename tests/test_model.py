"""The model against Hugging Face transformers and against its own invariants."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model.args import LoraArgs, ModelArgs
from model.checkpoint import load_adapters
from model.configs import args_from_params, load_model_args, params_from_args
from model.hf import to_hf_state_dict
from model.hf_config import hf_config_from_args
from model.keys import to_checkpoint_names
from model.lora import LoRALinear, freeze_all_but_lora, lora_file_state, lora_state_dict
from model.merge import merged_weights
from model.tiny import random_base_model, tiny_args
from model.transformer import RMSNorm, Transformer, _RMSNormFunction
from tests.model_helpers import write_checkpoint

SEQLENS = [7, 13, 4]


def _tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_model(tmp_path, args: ModelArgs, state: dict):
    """Write the weights in HF's on-disk layout and let transformers load them itself."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype="float32")))
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(state, args).items()}, str(folder / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sliding_window": 5},
        {"moe": {"num_experts": 4, "num_experts_per_tok": 2}},
    ],
    ids=["dense", "sliding_window", "moe"],
)
def test_logits_match_hugging_face(tmp_path, overrides):
    args = tiny_args(rope_theta=1e6, **overrides)
    ours = random_base_model(args, seed=1).eval()
    hf = _hf_model(tmp_path, args, ours.state_dict())
    tokens = _tokens(sum(SEQLENS), args.vocab_size)
    with torch.no_grad():
        packed = ours(tokens, SEQLENS)
        start = 0
        for n in SEQLENS:
            # HF runs each document on its own; ours ran them packed in one row.
            ref = hf(input_ids=tokens[start : start + n][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], ref, rtol=1e-4, atol=1e-4)
            start += n


def _autograd_rms_norm(x, weight, eps):
    """The plain formulation (Mistral's), differentiated by autograd: the reference."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rms(x, w):
    return _RMSNormFunction.apply(x, w, 1e-5)


def test_rms_norm_backward_passes_gradcheck():
    # Input and gain gradients against finite differences (float64, (batch, tokens, dim) input).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_rms, (x, w))
    assert type(RMSNorm(6, 1e-5)(x).grad_fn).__name__ == "_RMSNormFunctionBackward"  # the module runs it


@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_equals_autograd_in_bf16(weight_grad):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 32, generator=g).bfloat16()
    w = (torch.rand(32, generator=g) + 0.5).bfloat16().requires_grad_(weight_grad)
    grad = torch.randn(64, 32, generator=g).bfloat16()
    results = []
    for fn in (_rms, lambda x, w: _autograd_rms_norm(x, w, 1e-5)):
        x = x0.clone().requires_grad_(True)
        w.grad = None
        y = fn(x, w)
        y.backward(grad)
        results.append((y, x.grad, w.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert torch.equal(y, y_ref)  # the forward is the same arithmetic
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=2e-2)
    if weight_grad:
        torch.testing.assert_close(gw.float(), gw_ref.float(), rtol=2e-2, atol=5e-2)


def test_sliding_window_changes_long_documents_only():
    full = random_base_model(tiny_args(), seed=2).eval()
    windowed = Transformer(tiny_args(sliding_window=6))
    windowed.load_state_dict(full.state_dict())
    tokens = _tokens(20, 128)
    with torch.no_grad():
        a, b = full(tokens, [20]), windowed.eval()(tokens, [20])
    # Inside the window both see the same context; beyond it they must differ.
    torch.testing.assert_close(a[:6], b[:6])
    assert not torch.allclose(a[6:], b[6:], atol=1e-3)


@pytest.mark.parametrize("window", [None, 5])
def test_packed_equals_separate(window):
    model = random_base_model(tiny_args(sliding_window=window), seed=3).eval()
    tokens = _tokens(sum(SEQLENS), 128, seed=1)
    with torch.no_grad():
        packed = model(tokens, SEQLENS)
        separate = torch.cat([model(chunk, [len(chunk)]) for chunk in tokens.split(SEQLENS)])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_flex_attention_equals_sdpa(window):
    model = random_base_model(tiny_args(sliding_window=window), seed=4).eval()
    seqlens = [40, 3, 85]  # crosses FlexAttention's 128-token blocks unevenly
    tokens = _tokens(sum(seqlens), 128, seed=2)
    with torch.no_grad():
        sdpa = model(tokens, seqlens)
        model.attention_backend = "flex"
        flex = model(tokens, seqlens)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)


def _lora_copy(base: Transformer, lora: LoraArgs) -> Transformer:
    model = Transformer(base.args, lora=lora)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters()
    return model.eval()


@pytest.mark.parametrize("moe", [None, {"num_experts": 3, "num_experts_per_tok": 2}])
def test_zero_initialised_lora_equals_base(moe):
    base = random_base_model(tiny_args(moe=moe), seed=5).eval()
    lora = _lora_copy(base, LoraArgs(rank=4))
    n_lora = sum(isinstance(m, LoRALinear) for m in lora.modules())
    # every wq..wo and w1..w3; an MoE layer's w1..w3 each hold all its experts' adapters (model.experts)
    assert n_lora == base.args.n_layers * (4 + 3)
    tokens = _tokens(sum(SEQLENS), 128)
    with torch.no_grad():
        torch.testing.assert_close(lora(tokens, SEQLENS), base(tokens, SEQLENS))


def test_merged_equals_unmerged():
    base = random_base_model(tiny_args(), seed=6)
    lora = _lora_copy(base, LoraArgs(rank=4, scaling=1.5))
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    merged = Transformer(base.args)
    merged.load_state_dict(dict(merged_weights(lora)))
    tokens = _tokens(sum(SEQLENS), 128)
    with torch.no_grad():
        out_lora, out_merged = lora(tokens, SEQLENS), merged.eval()(tokens, SEQLENS)
    torch.testing.assert_close(out_merged, out_lora, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out_merged, base.eval()(tokens, SEQLENS), atol=1e-3)


def test_only_adapters_receive_gradients():
    lora = _lora_copy(random_base_model(tiny_args(moe={"num_experts": 2, "num_experts_per_tok": 1})), LoraArgs(rank=2))
    lora.train()
    freeze_all_but_lora(lora)
    tokens = _tokens(sum(SEQLENS), 128)
    lora(tokens, SEQLENS).float().logsumexp(-1).mean().backward()
    for name, p in lora.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B starts at zero so A's gradient is zero at step 0; B's must not be.
    assert any(p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)


def test_bf16_base_with_fp32_adapters_runs():
    base = random_base_model(tiny_args(), dtype=torch.bfloat16)
    lora = _lora_copy(base, LoraArgs(rank=2)).to(torch.bfloat16)
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.float(), m.lora_B.float()
    assert lora.layers[0].attention.wq.lora_A.weight.dtype == torch.float32
    out = lora(_tokens(10, 128), [10])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pth"])
def test_from_folder_layouts(tmp_path, layout):
    args = tiny_args(sliding_window=8)
    state = write_checkpoint(tmp_path, args, seed=7, layout=layout)
    model = Transformer.from_folder(tmp_path, dtype=torch.float32, lora=LoraArgs(rank=4))
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert model.args.sliding_window == 8
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    assert all(m.lora_B.weight.abs().sum() == 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_from_folder_casts_to_requested_dtype(tmp_path):
    write_checkpoint(tmp_path, tiny_args(), layout="safetensors")
    model = Transformer.from_folder(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_weight_is_named(tmp_path):
    args = tiny_args()
    state = random_base_model(args).state_dict()
    del state["layers.1.feed_forward.w3.weight"]
    from model.checkpoint import save_model_folder

    save_model_folder(tmp_path, params_from_args(args), state)
    with pytest.raises(ValueError, match=r"missing 1 weight.*layers\.1\.feed_forward\.w3\.weight"):
        Transformer.from_folder(tmp_path, dtype=torch.float32)


def test_unexpected_weight_is_named(tmp_path):
    args = tiny_args()
    state = random_base_model(args).state_dict()
    state["layers.0.attention.bias"] = torch.zeros(3)
    from model.checkpoint import save_model_folder

    save_model_folder(tmp_path, params_from_args(args), state)
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.bias' is not part of this model"):
        Transformer.from_folder(tmp_path, dtype=torch.float32)


def test_no_weights_file_is_explained(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(params_from_args(tiny_args())))
    with pytest.raises(FileNotFoundError, match="consolidated.safetensors"):
        Transformer.from_folder(tmp_path)


def test_incomplete_shards_are_reported(tmp_path):
    write_checkpoint(tmp_path, tiny_args(), layout="sharded")
    (tmp_path / "consolidated-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2"):
        Transformer.from_folder(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.pop("head_dim"), "missing required key 'head_dim'"),
        (lambda p: p.update(n_heads="32"), "'n_heads' must be a positive integer"),
        (lambda p: p.update(sliding_window=-1), "'sliding_window' must be a positive integer"),
        (lambda p: p.pop("norm_eps"), "missing required key 'norm_eps'"),
        (lambda p: p.update(moe={"num_experts": 8}), "'moe' is missing 'num_experts_per_tok'"),
        (lambda p: p.update(moe={"num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1}),
         r"'moe' has \['num_shared_experts'\] but no 'expert_hidden_dim'"),
    ],
)
def test_params_json_errors_name_file_and_key(tmp_path, edit, message):
    params = params_from_args(tiny_args())
    edit(params)
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=message) as err:
        load_model_args(tmp_path)
    assert "params.json" in str(err.value)


def test_params_json_round_trips_unknown_keys(tmp_path):
    params = {**params_from_args(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2})),
              "quantization": None, "max_seq_len": 4096}
    args = args_from_params(params)
    assert params_from_args(args) == params


def test_adapters_round_trip_through_safetensors(tmp_path):
    base = random_base_model(tiny_args())
    a = _lora_copy(base, LoraArgs(rank=3))
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    save_file({k: v.contiguous() for k, v in lora_file_state(a).items()}, str(tmp_path / "lora.safetensors"))
    b = _lora_copy(base, LoraArgs(rank=3))
    load_adapters(b, tmp_path / "lora.safetensors")
    for key, value in lora_state_dict(a).items():
        torch.testing.assert_close(lora_state_dict(b)[key], value, rtol=0, atol=0)
    wrong_rank = _lora_copy(base, LoraArgs(rank=5))
    with pytest.raises(ValueError, match="lora.rank"):
        load_adapters(wrong_rank, tmp_path / "lora.safetensors")


def test_adapter_key_contract():
    """The adapter file's key names are a public contract (mistral-inference loads them)."""
    model = Transformer(tiny_args(n_layers=1, moe={"num_experts": 2, "num_experts_per_tok": 1}), lora=LoraArgs(rank=2))
    # The model stacks its experts' adapters; the file names each expert's (model.keys).
    file_state = to_checkpoint_names(lora_state_dict(model), model.args)
    keys = sorted(file_state)
    attn = [f"layers.0.attention.{w}.{ab}.weight" for w in ("wk", "wo", "wq", "wv") for ab in ("lora_A", "lora_B")]
    experts = [f"layers.0.feed_forward.experts.{j}.{w}.{ab}.weight"
               for j in (0, 1) for w in ("w1", "w2", "w3") for ab in ("lora_A", "lora_B")]
    assert keys == sorted(attn + experts)
    assert file_state["layers.0.feed_forward.experts.1.w2.lora_B.weight"].shape == (64, 2)
    dense = Transformer(tiny_args(n_layers=1), lora=LoraArgs(rank=2, target_modules=["wq", "wv"]))
    assert sorted(lora_state_dict(dense)) == [
        "layers.0.attention.wq.lora_A.weight", "layers.0.attention.wq.lora_B.weight",
        "layers.0.attention.wv.lora_A.weight", "layers.0.attention.wv.lora_B.weight",
    ]
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(dense).items()}
    assert shapes["layers.0.attention.wq.lora_A.weight"] == (2, 64)
    assert shapes["layers.0.attention.wq.lora_B.weight"] == (64, 2)
