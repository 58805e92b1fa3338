"""QLoRA (``quantization: nf4``): numerics of the NF4 layer, what trains, config errors, and
train.py end to end on CPU. Two ranks equal one: tests/test_qlora_distributed.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from finetune.args import TrainArgs  # noqa: E402
from finetune.build import check_quantization  # noqa: E402
from finetune.config import ConfigError  # noqa: E402
from finetune.data.args import DataArgs  # noqa: E402
from model.args import LoraArgs  # noqa: E402
from model.checkpoint import load_adapters  # noqa: E402
from model.lora import LoRALinear, lora_modules, lora_state_dict, merge_delta  # noqa: E402
from model.merge import merged_weights  # noqa: E402
from model.quant import NF4LoRALinear, quantize_lora_layers, quantize_nf4, quantized_weight_bytes  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from tests.train_helpers import make_workspace, read_metrics, run_cli, tiny_vocab_args, write_config  # noqa: E402

# in_features must be multiples of NF4's block of 64 (every released Mistral model's are).
SHAPE = dict(dim=64, hidden_dim=128, head_dim=16, n_heads=4, n_kv_heads=2)
# NF4 has 16 levels spread over [-absmax, absmax] of each block of 64 weights: for Gaussian
# weights the relative RMS error is about 0.09 (QLoRA paper, Dettmers et al. 2023); 8-bit
# absmaxes (double quantization) add about 0.2% to the scale.
NF4_REL_RMS = 0.10


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _tiny_lora_model(seed: int = 0) -> Transformer:
    model = Transformer(tiny_vocab_args(**SHAPE, vocab_size=256), lora=LoraArgs(rank=4))
    model.init_weights(seed)
    return model


def test_nf4_layer_output_within_nf4_error_of_full_precision():
    torch.manual_seed(0)
    full = LoRALinear(256, 192, rank=4, scaling=2.0)
    full.weight.data.normal_(0, 0.02)
    full.lora_B.weight.data.normal_(0, 0.02)  # a non-zero adapter passes through unquantized
    q = torch.nn.Sequential(full)
    x = torch.randn(64, 256)
    expected = full(x)
    quantize_lora_layers(q, torch.float32)
    nf4 = q[0]
    assert isinstance(nf4, NF4LoRALinear)
    error = _rel_rms(nf4.dequantize(), full.weight)
    assert 0.05 < error < NF4_REL_RMS  # quantized, and as finely as NF4 allows
    out_error = _rel_rms(
        nf4(x) - nf4.scaling * nf4.lora_B(nf4.lora_A(x)),
        expected - full.scaling * full.lora_B(full.lora_A(x)),
    )
    assert 0.05 < out_error < NF4_REL_RMS
    # The layer is dequantize-then-matmul, exactly.
    torch.testing.assert_close(nf4(x), x @ merge_delta(nf4.dequantize(), nf4.lora_A.weight, nf4.lora_B.weight, nf4.scaling).t(), rtol=1e-5, atol=1e-5)


def test_packed_storage_and_quantized_weight_bytes():
    weight = torch.randn(96, 128)
    for dtype, codes_per_element in ((torch.float32, 8), (torch.bfloat16, 4), (torch.uint8, 2)):
        packed, stats = quantize_nf4(weight, dtype)
        assert packed.dtype == dtype and tuple(packed.shape) == (weight.numel() // codes_per_element, 1)
    layer = NF4LoRALinear(4096, 14336, rank=16, scaling=2.0, storage_dtype=torch.bfloat16, device="meta")
    held = sum(t.numel() * t.element_size() for t in (layer.weight, *layer.buffers()))
    assert held == quantized_weight_bytes(4096 * 14336)
    assert held / (4096 * 14336) == pytest.approx(0.516, abs=1e-3)  # vs 2 bytes in bf16


def test_zero_adapter_on_nf4_base_equals_the_nf4_base():
    model = _tiny_lora_model()
    quantize_lora_layers(model, torch.float32)
    for m in lora_modules(model).values():
        assert not m.lora_B.weight.any()  # freshly initialised: B = 0, A random
    # The same transformer without adapters, its linears holding the de-quantized NF4 weights.
    plain = Transformer(model.args)
    plain.load_state_dict(dict(merged_weights(model)))
    ids = torch.randint(0, 256, (40,))
    torch.testing.assert_close(model(ids, [25, 15]), plain(ids, [25, 15]), rtol=0, atol=0)


def test_merged_equals_unmerged_on_nf4_base():
    model = _tiny_lora_model()
    quantize_lora_layers(model, torch.float32)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    merged = Transformer(model.args)
    merged.load_state_dict(dict(merged_weights(model)))
    ids = torch.randint(0, 256, (40,))
    torch.testing.assert_close(model(ids, [40]), merged(ids, [40]), rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_adapters():
    from model.lora import freeze_all_but_lora

    model = _tiny_lora_model()
    quantize_lora_layers(model, torch.float32)
    freeze_all_but_lora(model)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)  # so lora_A receives a gradient too
    model(torch.randint(0, 256, (32,)), [32]).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(sorted(lora_state_dict(model)))
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in with_grad)


def test_nf4_needs_in_features_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of 64, got 96.*quantization: none"):
        NF4LoRALinear(96, 64, rank=4, scaling=1.0)


def test_config_errors_name_the_key(monkeypatch):
    def args(**kw):
        return TrainArgs(model_id_or_path="m", run_dir="r", data=DataArgs(instruct_data="d.jsonl"), **kw)

    with pytest.raises(ConfigError, match="'quantization' is 'int4'; use one of none, nf4"):
        args(quantization="int4").validate()
    with pytest.raises(ConfigError, match="'quantization: nf4'.*'lora.enable' is false"):
        args(quantization="nf4", lora=LoraArgs(enable=False), save_adapters=False).validate()
    args(quantization="nf4").validate()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(
        ConfigError, match=r"'quantization: nf4'.*pip install '\.\[qlora\]'.*quantization: none"
    ):
        check_quantization("nf4")
    check_quantization("none")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return root, make_workspace(root, **SHAPE)


def _run(workspace, name: str, **overrides) -> tuple[Path, str]:
    root, base = workspace
    config = {**base, "run_dir": str(root / name), "quantization": "nf4", **overrides}
    result = run_cli(["train.py", str(write_config(root / f"{name}.yaml", config))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / name, result.stdout


def test_train_nf4_end_to_end(workspace):
    """Loss falls; lora.safetensors is the usual file and applies to the full-precision base; the
    run resumes (adapters and optimizer state load back) and saves a merged, de-quantized base."""
    run_dir, _ = _run(workspace, "nf4", max_steps=6, ckpt_freq=6)
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2
    consolidated = run_dir / "checkpoints" / "checkpoint_000006" / "consolidated"
    lora = load_file(str(consolidated / "lora.safetensors"))
    folder = workspace[1]["model_id_or_path"]
    model = Transformer.from_folder(folder, dtype=torch.float32, lora=LoraArgs(rank=4))
    assert sorted(lora) == sorted(lora_state_dict(model))  # the same keys as without quantization
    assert {t.dtype for t in lora.values()} == {torch.float32}
    assert json.loads((consolidated / "params.json").read_text())["lora"]["rank"] == 4
    load_adapters(model, consolidated / "lora.safetensors")  # strict key and shape checks

    # Resume for two steps at a negligible learning rate, saving merged weights: they must be the
    # de-quantized NF4 base plus the step-6 adapters (not the original base plus adapters).
    _, out = _run(
        workspace, "nf4", max_steps=8, ckpt_freq=8, save_adapters=False, optim={"lr": 1e-12, "pct_start": 0.0}
    )
    assert "Resum" in out and "Merging adapters into the de-quantized NF4 base" in out
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))
    merged = load_file(
        str(run_dir / "checkpoints" / "checkpoint_000008" / "consolidated" / "consolidated.safetensors")
    )
    base = load_file(str(Path(folder) / "consolidated.safetensors"))
    assert sorted(merged) == sorted(base)
    for key, w in base.items():
        prefix = key.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in lora:
            layer = NF4LoRALinear(w.shape[1], w.shape[0], rank=4, scaling=2.0)
            packed, stats = quantize_nf4(w, torch.float32)
            layer.weight.data.copy_(packed)
            layer.set_quant_stats(stats)
            w = merge_delta(
                layer.dequantize(), lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"], 2.0
            )
        torch.testing.assert_close(merged[key], w, rtol=1e-5, atol=1e-6, msg=key)


def _tiny_moe_lora_model(seed: int = 0) -> Transformer:
    """Fine-grained MoE (Mistral Small 4's): a dense first layer, then 8 stacked experts and a shared one."""
    moe = {"num_experts": 8, "num_experts_per_tok": 2, "expert_hidden_dim": 64, "num_shared_experts": 1,
           "first_k_dense_replace": 1}
    model = Transformer(tiny_vocab_args(**SHAPE, vocab_size=256, moe=moe), lora=LoraArgs(rank=4))
    model.init_weights(seed)
    return model


def test_nf4_quantizes_stacked_experts_and_their_gradients_dequantize_again():
    """Stacked experts are quantized as one NF4 stack (codes in rows per expert, so FSDP shards them by
    expert); the model computes exactly what the de-quantized weights compute, forward and backward."""
    from model.lora import freeze_all_but_lora
    from model.quant import NF4GroupedLoRALinear

    model = _tiny_moe_lora_model()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_lora_layers(model, torch.float32)
    experts = model.layers[1].feed_forward.experts.w2
    assert isinstance(experts, NF4GroupedLoRALinear)
    assert experts.weight.shape == (8, 64 * 64 // 8)  # (experts, codes): 8 NF4 codes per float32
    stack = experts.dequantize()  # (experts, out, in)
    assert stack.shape == (8, 64, 64)
    assert _rel_rms(stack, full["layers.1.feed_forward.experts.w2.weight"]) < NF4_REL_RMS
    freeze_all_but_lora(model)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    # The same LoRA model holding the de-quantized weights as plain tensors: same logits and gradients.
    plain = Transformer(model.args, lora=model.lora)
    plain.load_state_dict({**{k: v for k, v in model.state_dict().items() if ".lora_" in k},
                           **{f"{n}.weight": m.dequantize() for n, m in lora_modules(model).items()},
                           **{k: v for k, v in full.items() if ".lora_" not in k and k.rpartition(".")[0]
                              not in lora_modules(model)}})
    freeze_all_but_lora(plain)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    out, ref = model(ids, [25, 15]), plain(ids, [25, 15])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert "layers.1.feed_forward.experts.w2.lora_A.weight" in grads
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)
    # Merging folds the adapters into the de-quantized stack, under the checkpoint's per-expert names.
    merged = dict(merged_weights(model))
    assert merged["layers.1.experts.3.w2.weight"].shape == (64, 64)
