"""The memory planner: its activation formula equals what autograd saves, its weight terms count the
real model's parameters, its CPU estimate is within 15% of a peak measured here, its GPU plan moves
the right way with every setting, and its command line says whether a plan fits and what to change."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from finetune.args import TrainArgs
from finetune.config import ConfigError
from model.args import (
    DEFAULT_TARGETS,
    VISION_TARGETS,
    Llama4Scaling,
    LoraArgs,
    MlaArgs,
    ModelArgs,
    MoeArgs,
    YarnArgs,
)
from model.lora import freeze_all_but_lora
from model.moe import CPU_ROW_MULTIPLE, MoeLayer
from model.transformer import Transformer
from utils.estimate_memory import (
    GB,
    KNOWN_MODELS,
    LINEARS,
    NF4_BYTES,
    Images,
    estimate,
    image_shape,
    main,
    max_image_size,
    param_counts,
    saved_bytes_per_layer,
    saved_bytes_per_token,
    selective_kept_bytes_per_expert_row,
    selective_saved_bytes_per_token,
    vision_block_saved_bytes,
    vision_block_targets,
    vision_first_block_unsaved_bytes,
    vision_outside_blocks_saved_bytes,
    vision_params,
    vision_selective_kept_bytes_per_patch,
)
from utils.workload import PRESETS

REPO = Path(__file__).resolve().parents[1]
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
SHAPE_7B = dict(
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32768
)
SHAPE_NEMO = dict(
    dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=131072
)


def _train_args(**kw) -> TrainArgs:
    return TrainArgs(model_id_or_path="-", run_dir="-", **kw)


def _block_args(moe: MoeArgs | None, n_layers: int) -> ModelArgs:
    """A small block shape whose tensors are all distinct sizes, for byte-exact comparisons."""
    return ModelArgs(dim=128, n_layers=n_layers, head_dim=32, hidden_dim=384, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, vocab_size=256, moe=moe)


def _routed_padding(model: Transformer, layer: int, seqlens: list[int]) -> list[int]:
    """Records, per forward of block ``layer``'s routed experts, the zero rows that ``MoeLayer``
    added (CPU bf16/fp16 only: each expert's rows rounded up to ``CPU_ROW_MULTIPLE``)."""
    padding: list[int] = []
    moe = getattr(model.layers[layer], "feed_forward", None)
    if isinstance(moe, MoeLayer):
        routed = sum(seqlens) * moe.top_k
        moe.experts.register_forward_pre_hook(lambda module, inputs: padding.append(inputs[0].shape[0] - routed))
    return padding


def _saved_by_block(args: ModelArgs, lora: LoraArgs, dtype: torch.dtype, seqlens: list[int],
                    layer: int = 1) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves inside block ``layer`` (not the first, whose
    input needs no grad), parameters and shared inputs excluded; and the routed experts' padding
    rows. Seeded random weights: the routing is a real one (uninitialised weights route every token
    to the same experts)."""
    torch.manual_seed(0)
    model = Transformer(args, lora=lora)
    model.init_weights(0)
    model.to(dtype)
    freeze_all_but_lora(model)
    padding = _routed_padding(model, layer, seqlens)
    ids = torch.randint(0, args.vocab_size, (sum(seqlens),))
    return _saved_inside(model, model.layers[layer], lambda: model.hidden_states(ids, seqlens)), sum(padding)


def _saved_inside(model: nn.Module, block: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves inside ``block`` while ``run`` runs the model,
    parameters and the block's inputs that need no grad (rotary tables etc.: computed once per
    forward, shared by all blocks) excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = [False]

    def enter(module, inputs):
        inside[0] = True
        skip.update(t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and not t.requires_grad)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [block.register_forward_pre_hook(enter),
             block.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for hook in hooks:
        hook.remove()
    return sum(seen.values())


def _predicted_saved(args: ModelArgs, targets: list[str], dtype: torch.dtype, seqlens: list[int], layer: int,
                     padding: int) -> float:
    """The planner's bytes for block ``layer``: per token, per layer, and the CPU-only padding rows
    this routing made (the CPU plan takes their expectation instead: ``expected_padding_rows``)."""
    c = 2 if dtype == torch.bfloat16 else 4
    return (sum(seqlens) * saved_bytes_per_token(args, targets, 8, 0.0, c, layer, padded=padding > 0)
            + saved_bytes_per_layer(args, targets, 8, 0.0, c, layer, padding_rows=padding))


def _check_padding(args: ModelArgs, dtype: torch.dtype, layer: int, padding: int) -> None:
    """The padding term is exercised: bf16 on CPU pads an MoE layer's rows, float32 does not."""
    if args.is_moe_layer(layer) and dtype == torch.bfloat16:
        assert 0 < padding < args.moe.num_experts * CPU_ROW_MULTIPLE
    else:
        assert padding == 0


@pytest.mark.parametrize("moe", [None, MoeArgs(4, 2)], ids=["dense", "moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("targets", [ALL, ["wq", "wv"], ["wo", "w2"]], ids=["all", "qv", "o-w2"])
def test_activation_formula_equals_saved_tensors(moe, dtype, targets):
    args = _block_args(moe, n_layers=2)
    lora = LoraArgs(rank=8, target_modules=targets)
    seqlens = [100, 60, 96]
    measured, padding = _saved_by_block(args, lora, dtype, seqlens)
    _check_padding(args, dtype, 1, padding)
    assert _predicted_saved(args, targets, dtype, seqlens, 1, padding) == measured


def _latent_args(q_lora_rank: int | None, first_k_dense: int, n_layers: int = 3, v_head_dim: int = 48) -> ModelArgs:
    """A tiny Mistral Small 4: latent attention (YaRN, llama-4 query scaling), 8 routed experts (top 2)
    and a shared one, the first ``first_k_dense`` layers dense. Every width is a multiple of 64 (NF4's
    block); by default the query/key head (32 + 16) is as wide as the value head, as in the release
    (64 + 64 = 128); a narrower ``v_head_dim`` is zero-padded for SDPA (``model.attention.attend``)."""
    return ModelArgs(
        dim=128, n_layers=n_layers, head_dim=48, hidden_dim=384, n_heads=4, n_kv_heads=4, norm_eps=1e-5,
        vocab_size=256, mla=MlaArgs(q_lora_rank, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                    v_head_dim=v_head_dim),
        moe=MoeArgs(8, 2, expert_hidden_dim=64, num_shared_experts=1, first_k_dense_replace=first_k_dense),
        yarn=YarnArgs(factor=4.0, original_max_position_embeddings=32),
        llama_4_scaling=Llama4Scaling(beta=0.1, original_max_position_embeddings=32),
    )


LATENT_TARGETS = {
    "all": list(LINEARS),
    "attention-b-experts-w2": ["wq_b", "wkv_b", "wq", "experts.w2"],
    "wo-shared-w1-w3": ["wo", "shared_experts.w1", "w3"],
}


@pytest.mark.parametrize("q_lora_rank", [256, None], ids=["q-lora", "plain-q"])
@pytest.mark.parametrize("first_k_dense", [1, 2], ids=["moe-layer", "dense-layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("targets", list(LATENT_TARGETS), ids=list(LATENT_TARGETS))
def test_latent_moe_activation_formula_equals_saved_tensors(q_lora_rank, first_k_dense, dtype, targets):
    # Block 1 is an MoE block with routed and shared experts, or (first_k_dense 2) a dense one.
    args = _latent_args(q_lora_rank, first_k_dense)
    lora = LoraArgs(rank=8, target_modules=LATENT_TARGETS[targets])
    seqlens = [100, 60, 96]
    measured, padding = _saved_by_block(args, lora, dtype, seqlens, layer=1)
    _check_padding(args, dtype, 1, padding)
    assert _predicted_saved(args, lora.target_modules, dtype, seqlens, 1, padding) == measured


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("targets", ["all", "wo-shared-w1-w3"])
def test_narrower_values_padded_for_sdpa_formula_equals_saved_tensors(dtype, targets):
    # v 16 < q/k 48: SDPA saves the zero-padded v (not wkv_b's output) and a padded output.
    args = _latent_args(256, 1, v_head_dim=16)
    lora = LoraArgs(rank=8, target_modules=LATENT_TARGETS[targets])
    seqlens = [100, 60, 96]
    measured, padding = _saved_by_block(args, lora, dtype, seqlens, layer=1)
    _check_padding(args, dtype, 1, padding)
    assert _predicted_saved(args, lora.target_modules, dtype, seqlens, 1, padding) == measured
    c = 2 if dtype == torch.bfloat16 else 4
    unpadded = saved_bytes_per_token(args, lora.target_modules, 8, 0.0, c, 1, sdpa=False)  # FlexAttention's
    assert unpadded < saved_bytes_per_token(args, lora.target_modules, 8, 0.0, c, 1)  # the shape tells them apart


def _kept_by_selective_block(args: ModelArgs, lora: LoraArgs, dtype: torch.dtype, seqlens: list[int],
                             nf4: bool = False, layer: int = 0) -> tuple[int, int]:
    """Bytes of the distinct storages that the real selective policy keeps in block ``layer``, and
    the routed experts' padding rows (seeded weights: a real routing, as ``_saved_by_block``)."""
    from model.attention import AttentionMask
    from model.rope import positions_from_seqlens, rotations

    torch.manual_seed(0)
    model = Transformer(args, lora=lora)
    model.init_weights(0)
    model.to(dtype)
    if nf4:
        from model.quant import quantize_lora_layers

        quantize_lora_layers(model, storage_dtype=dtype)
        # Adapters in the compute dtype, as FSDP's mixed precision gives them; parameters only:
        # module.to would also cast the float32 NF4 statistics (buffers), and dequantize to NaN.
        for p in model.parameters():
            p.data = p.data.to(dtype)
    freeze_all_but_lora(model)
    padding = _routed_padding(model, layer, seqlens)
    freqs = rotations(positions_from_seqlens(seqlens, "cpu"), args)
    mask = AttentionMask.build(seqlens, None, "sdpa", torch.device("cpu"))
    x = torch.randn(sum(seqlens), args.dim, dtype=dtype, requires_grad=True)
    return _kept_by_policy(model, model.layers[layer], x, freqs, mask), sum(padding)


def _kept_by_policy(model: nn.Module, block: nn.Module, *inputs: object) -> int:
    """Bytes of the distinct storages that finetune.parallel's selective policy (built for ``model``)
    keeps while ``block`` runs checkpointed on ``inputs``."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from finetune.parallel import selective_policy

    policy = selective_policy(model)
    kept: dict[int, int] = {}

    def recording_policy(ctx, func, *a, **kw):
        decision = policy(ctx, func, *a, **kw)
        if decision == CheckpointPolicy.MUST_SAVE:
            outs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
            for t in outs:
                if isinstance(t, torch.Tensor):
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return decision

    context_fn = functools.partial(create_selective_checkpoint_contexts, recording_policy,
                                   allow_cache_entry_mutation=True)
    checkpoint(block.forward, *inputs, use_reentrant=False, context_fn=context_fn)
    return sum(kept.values())


def _predicted_kept(args: ModelArgs, targets: list[str], seqlens: list[int], layer: int, padding: int) -> float:
    """The planner's kept bytes (bf16) for block ``layer``, with the padding rows this routing made."""
    return (sum(seqlens) * selective_saved_bytes_per_token(args, targets, 8, 2, layer)
            + padding * (selective_kept_bytes_per_expert_row(args, targets, 8, 2, layer) if args.is_moe_layer(layer) else 0))


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
@pytest.mark.parametrize("moe", [None, MoeArgs(4, 2)], ids=["dense", "moe"])
@pytest.mark.parametrize("targets", [ALL, ["wq", "wv"]], ids=["all", "qv"])
def test_selective_formula_equals_what_the_policy_keeps(moe, targets, nf4):
    if nf4:
        pytest.importorskip("bitsandbytes")
    args = _block_args(moe, n_layers=1)
    lora = LoraArgs(rank=8, target_modules=targets)
    seqlens = [100, 60, 96]
    measured, padding = _kept_by_selective_block(args, lora, torch.bfloat16, seqlens, nf4)
    _check_padding(args, torch.bfloat16, 0, padding)
    # NF4 (QLoRA): bitsandbytes' base product is not a kept matmul, but its LoRA update, added out
    # of place, is as wide: the same bytes.
    assert _predicted_kept(args, targets, seqlens, 0, padding) == measured


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
@pytest.mark.parametrize("first_k_dense", [1, 2], ids=["moe-layer", "dense-layer"])
@pytest.mark.parametrize("targets", list(LATENT_TARGETS), ids=list(LATENT_TARGETS))
def test_latent_moe_selective_formula_equals_what_the_policy_keeps(first_k_dense, targets, nf4):
    # Routed and shared experts: every product kept but the up-projections (their own widths) and the
    # routed experts' LoRA updates; the router's logits too.
    if nf4:
        pytest.importorskip("bitsandbytes")
    args = _latent_args(256, first_k_dense)
    lora = LoraArgs(rank=8, target_modules=LATENT_TARGETS[targets])
    seqlens = [100, 60, 96]
    measured, padding = _kept_by_selective_block(args, lora, torch.bfloat16, seqlens, nf4, layer=1)
    _check_padding(args, torch.bfloat16, 1, padding)
    assert _predicted_kept(args, lora.target_modules, seqlens, 1, padding) == measured


@pytest.mark.parametrize("targets", ["all", "wo-shared-w1-w3"])
def test_narrower_values_padded_for_sdpa_selective_formula_equals_what_the_policy_keeps(targets):
    args = _latent_args(256, 1, v_head_dim=16)
    lora = LoraArgs(rank=8, target_modules=LATENT_TARGETS[targets])
    seqlens = [100, 60, 96]
    measured, padding = _kept_by_selective_block(args, lora, torch.bfloat16, seqlens, layer=1)
    assert _predicted_kept(args, lora.target_modules, seqlens, 1, padding) == measured


def _bench_small(n_layers: int) -> ModelArgs:
    """The shape `bench_train_step --preset small --n_layers N` trains (its norm_eps; rope does not count)."""
    return ModelArgs(**{**PRESETS["small"], "n_layers": n_layers}, norm_eps=1e-5)


# A child that trains with `python -m utils.bench_train_step` and reports its own peak RSS. VmHWM,
# not ru_maxrss: a child's ru_maxrss starts at its parent's (this pytest process's) peak.
_CHILD = """
import json
from utils.bench_train_step import main
main({argv!r})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"vmhwm_gb": hwm * 1024 / 1e9}}))
"""


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"),
    reason="bf16 on a CPU without AVX-512 runs through emulated kernels: over 7 minutes a run instead of "
           "seconds; the planner's CPU terms are fitted to bf16 on AVX-512/AMX CPUs",
)
@pytest.mark.parametrize("checkpoint", ["full", "selective", "none"])
def test_cpu_estimate_within_15_percent_of_measured_peak(checkpoint):
    # The 'small' shape with 2 layers: a few seconds per run, activations and loss both sizeable.
    # Three steps, as the calibration's runs took: the RSS still grows over the first steps (the
    # heap, oneDNN's kernel caches), and after two it was 8% lower, at the edge of the tolerance.
    seq_len, n_layers = 2048, 2
    argv = [
        "--preset",
        "small",
        "--n_layers",
        str(n_layers),
        "--seq_len",
        str(seq_len),
        "--precision",
        "bf16",
        "--threads",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak_tflops",
        "1",
    ]
    argv += ["--checkpoint", checkpoint]
    code = _CHILD.format(argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["vmhwm_gb"]
    m = _bench_small(n_layers)
    plan = estimate(m, _train_args(seq_len=seq_len, checkpoint=checkpoint, precision="bf16"), device="cpu")
    assert plan.total / GB == pytest.approx(measured, rel=0.15), (plan.parts, measured)


def _small_mistral4_config(q_lora_rank: int | None, experts: int, top_k: int, width: int, shared: int,
                           dense: int) -> dict:
    """A Hugging Face config.json of a small Mistral Small 4 (2 layers, dim 512, vocab 32768 as the
    'small' preset): latent attention with YaRN and llama-4 scaling, fine-grained experts."""
    return {
        "model_type": "mistral4", "hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 1536,
        "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "vocab_size": 32768,
        "q_lora_rank": q_lora_rank, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32,
        "v_head_dim": 64, "n_routed_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": width,
        "n_shared_experts": shared, "first_k_dense_replace": dense,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
    }


LATENT_MOE_RUNS = {
    # q_lora_rank 256, a dense first layer, 16 experts 256 wide (top 2) + 1 shared; no checkpointing.
    "q-lora-dense-first-none-2048": (_small_mistral4_config(256, 16, 2, 256, 1, 1), "none", 2048),
    # One query projection, 32 experts 128 wide (top 4) + 2 shared in both layers; selective.
    "plain-q-top4-selective-1024": (_small_mistral4_config(None, 32, 4, 128, 2, 0), "selective", 1024),
}


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"),
    reason="bf16 on a CPU without AVX-512 runs through emulated kernels; the planner's CPU terms are fitted to "
           "bf16 on AVX-512/AMX CPUs",
)
@pytest.mark.parametrize("run", list(LATENT_MOE_RUNS))
def test_cpu_estimate_of_latent_moe_within_15_percent_of_measured_peak(run, tmp_path):
    # As the test above, on Mistral Small 4's layout: the bench trains the shape of a config.json
    # (--model), and the planner plans the same file.
    from model.configs import load_model_args

    config, checkpoint, seq_len = LATENT_MOE_RUNS[run]
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--model", str(tmp_path), "--seq_len", str(seq_len), "--precision", "bf16", "--threads", "2",
            "--steps", "2", "--warmup", "1", "--peak_tflops", "1", "--checkpoint", checkpoint]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(argv=argv)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["vmhwm_gb"]
    m = load_model_args(tmp_path)
    assert m.mla is not None and m.moe is not None and m.moe.fine_grained
    plan = estimate(m, _train_args(seq_len=seq_len, checkpoint=checkpoint, precision="bf16"), device="cpu")
    # The per-expert kernel-cache term was calibrated on one CPU (Intel with AMX, docs/memory.md): how much
    # oneDNN caches depends on the kernels a CPU gets, so it may be anything from none to twice that here;
    # every other term must hold within 15%.
    caches = plan.parts["CPU kernel caches: per-expert products (calibrated)"]
    low, high = (plan.total - caches) / GB, (plan.total + caches) / GB
    assert 0.85 * low <= measured <= 1.15 * high, (plan.parts, measured)


_RANK_PEAK = """
import os
from utils.bench_train_step import main
main({argv!r})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
open(os.path.join({out!r}, "rank_" + os.environ["RANK"]), "w").write(str(hwm * 1024 / 1e9))
"""


@pytest.mark.slow
def test_cpu_estimate_of_two_processes_within_12_percent_of_each_ranks_peak(tmp_path):
    # Two gloo ranks, where the all-gather of a large root (fp32, 134 MB) dominates the peak: the
    # planner was 17-20% low here before it counted the gather's second copy (docs/memory.md).
    seq_len, n_layers = 512, 2
    argv = ["--preset", "small", "--n_layers", str(n_layers), "--seq_len", str(seq_len), "--precision", "fp32",
            "--threads", "1", "--steps", "2", "--warmup", "1", "--peak_tflops", "1", "--checkpoint", "none"]
    script = tmp_path / "rank_peak.py"
    script.write_text(_RANK_PEAK.format(argv=argv, out=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = max(float((tmp_path / f"rank_{r}").read_text()) for r in range(2))
    m = _bench_small(n_layers)
    plan = estimate(m, _train_args(seq_len=seq_len, checkpoint="none", precision="fp32"), n_devices=2, device="cpu")
    assert plan.total / GB == pytest.approx(measured, rel=0.12), (plan.parts, measured)


# No GPU peak is compared here: the H100 peaks of docs/benchmarks.md ("GPU: training step (one
# H100)") were measured by an older version of the code, whose memory use and the planner's prediction
# have both moved since, and this suite runs without a GPU, so they cannot be re-measured with the
# code under test. They are re-measured on a GPU machine by `bash benchmarks/gpu_check.sh`
# (utils.bench_train_step's peak_mem_gb) and compared with the planner by
# `python benchmarks/check_memory_planner.py --gpu_only`. What holds without a GPU is checked
# instead: the weight terms against the real model's parameters (built on the meta device, so 7B and
# Nemo cost nothing), the activation terms against what autograd saves (the tests above), and the
# direction in which every setting moves the GPU plan (below).
SHAPE_MIXTRAL = dict(SHAPE_7B, moe=MoeArgs(8, 2))
# The real Mistral Small 4: latent attention, 128 stacked experts (top 4) + a shared one (meta device: free).
SHAPES = {"7b": ModelArgs(**SHAPE_7B, norm_eps=1e-5), "nemo": ModelArgs(**SHAPE_NEMO, norm_eps=1e-5),
          "mixtral": ModelArgs(**SHAPE_MIXTRAL, norm_eps=1e-5), "mistral-small-4": KNOWN_MODELS["mistral-small-4"]}
# Adapters on some attention projections, routed experts' w2 and shared experts' w1 only (scoped names).
SCOPED = ["wq", "wv", "wq_b", "wkv_b", "experts.w2", "shared_experts.w1"]


def _real_counts(m: ModelArgs, lora: LoraArgs | None) -> dict[str, int]:
    """Parameters of the real model (meta device: shapes only): frozen, trainable, one block, the root."""
    with torch.device("meta"):
        model = Transformer(m, lora=lora)
    if lora is not None:
        freeze_all_but_lora(model)
    params = list(model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return {
        "frozen": sum(p.numel() for p in params if not p.requires_grad),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "all": sum(p.numel() for p in params),
        "block": block,
        "root": sum(p.numel() for p in params) - m.n_layers * block,
    }


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("targets", [list(LINEARS), SCOPED, None], ids=["lora-all", "lora-scoped", "full"])
def test_weight_terms_count_the_real_models_parameters(shape, targets):
    m = SHAPES[shape]
    args = _train_args(seq_len=4096, precision="bf16")
    lora = None
    if targets is None:
        args.lora.enable = False
    else:
        args.lora.target_modules = targets
        lora = LoraArgs(rank=args.lora.rank, target_modules=targets)
    real = _real_counts(m, lora)
    for n in (1, 8):
        plan = estimate(m, args, n_devices=n)
        weights = plan.parts["base weights (sharded)"] * n
        optimizer = plan.parts["trainable: fp32 + grads + AdamW"] * n
        if lora is not None:  # frozen base in bf16; adapters in fp32 with their gradient and two moments
            assert weights == real["frozen"] * 2
            assert optimizer == real["trainable"] * 16
        else:  # every weight trains: fp32 weight, gradient, two moments
            assert real["frozen"] == 0 and weights + optimizer == real["all"] * 16
    # Two devices gather the whole root and two whole blocks (base and adapters) in bf16.
    assert estimate(m, args, n_devices=2).parts["unsharded root + 2 blocks"] == 2 * (real["root"] + 2 * real["block"])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("targets", [list(LINEARS), SCOPED], ids=["lora-all", "lora-scoped"])
def test_nf4_weight_term_counts_what_quantize_lora_layers_quantizes(shape, targets):
    """The NF4 share of the weights is every adapted linear's, stacked experts included, as
    model.quant quantizes them (meta device: no bitsandbytes needed); the rest stays in bf16."""
    from model.quant import NF4LoRALinear, quantize_lora_layers

    m = SHAPES[shape]
    with torch.device("meta"):
        model = Transformer(m, lora=LoraArgs(rank=16, target_modules=targets))
    quantize_lora_layers(model, storage_dtype=torch.bfloat16)
    quantized = sum(math.prod(q.full_shape) for q in model.modules() if isinstance(q, NF4LoRALinear))
    counts = param_counts(m, targets, 16)
    assert counts["layers_quantizable"] == quantized
    args = _train_args(seq_len=4096, precision="bf16", quantization="nf4")
    args.lora.target_modules = targets
    weights = estimate(m, args, n_devices=8).parts["base weights (sharded)"] * 8
    frozen = counts["layers"] + counts["root"]
    assert weights == pytest.approx((frozen - quantized) * 2 + quantized * NF4_BYTES)


@pytest.mark.parametrize("shape", [SHAPE_7B, SHAPE_NEMO, SHAPE_MIXTRAL], ids=["7b", "nemo", "mixtral"])
def test_gpu_plan_grows_with_every_setting_that_keeps_more(shape):
    m = ModelArgs(**shape, norm_eps=1e-5)

    def allocated(n_devices: int = 1, **kw) -> float:
        lora_enable = kw.pop("lora_enable", True)
        args = _train_args(precision="bf16", **{"seq_len": 8192, "checkpoint": True, **kw})
        args.lora.enable = lora_enable
        plan = estimate(m, args, n_devices=n_devices, device="cuda")
        assert plan.total == pytest.approx(plan.allocated + 1.0 * GB)  # plus the CUDA context
        return plan.allocated

    seq = [allocated(seq_len=s) for s in (2048, 8192, 32768)]
    assert seq == sorted(seq) and len(set(seq)) == 3
    assert allocated(batch_size=1) < allocated(batch_size=2) < allocated(batch_size=4)
    assert allocated(checkpoint=True) < allocated(checkpoint="selective") < allocated(checkpoint=False)
    assert allocated() < allocated(lora_enable=False)
    # More devices shard weights and optimizer state; the activations of each stay.
    assert allocated(n_devices=8) < allocated(n_devices=2)
    assert allocated(n_devices=8, lora_enable=False) < allocated(n_devices=2, lora_enable=False) / 2


def test_sharding_divides_weights_and_optimizer_state():
    m = ModelArgs(**SHAPE_7B, norm_eps=1e-5)
    args = _train_args(seq_len=8192, precision="bf16")
    one, eight = estimate(m, args, n_devices=1), estimate(m, args, n_devices=8)
    for part in ("base weights (sharded)", "trainable: fp32 + grads + AdamW"):
        assert eight.parts[part] == pytest.approx(one.parts[part] / 8)
    assert eight.parts["activations: block inputs"] == one.parts["activations: block inputs"]


def test_alone_only_adapters_are_gathered():
    # One device: frozen weights are not FSDP's, so no unsharded copy of them (finetune/parallel.py).
    m = ModelArgs(**SHAPE_7B, norm_eps=1e-5)
    lora, full = _train_args(seq_len=8192, precision="bf16"), _train_args(seq_len=8192, precision="bf16")
    full.lora.enable = False
    counts = param_counts(m, list(LINEARS), 16)
    one, two = estimate(m, lora, n_devices=1), estimate(m, lora, n_devices=2)
    assert one.parts["unsharded adapters of 2 blocks"] == 2 * counts["block_lora"] * 2
    assert two.parts["unsharded root + 2 blocks"] == 2 * (counts["root"] + 2 * (counts["block"] + counts["block_lora"]))
    # Fully fine-tuned, every weight trains, so FSDP gathers all of them even alone.
    assert estimate(m, full, n_devices=1).parts["unsharded root + 2 blocks"] == 2 * (counts["root"] + 2 * counts["block"])


def test_compiled_blocks_are_planned_as_eager_and_said_so():
    m = ModelArgs(**SHAPE_7B, norm_eps=1e-5)
    eager, compiled = (_train_args(seq_len=8192, precision="bf16") for _ in range(2))
    compiled.compile = True
    a, b = estimate(m, eager, n_devices=1), estimate(m, compiled, n_devices=1)
    assert a.parts == b.parts
    assert not any("compile" in n for n in a.notes) and any("upper bound" in n for n in b.notes)


def test_checkpointing_saves_what_the_formula_says():
    m = ModelArgs(**SHAPE_7B, norm_eps=1e-5)
    on = estimate(m, _train_args(seq_len=8192, precision="bf16", checkpoint=True))
    off = estimate(m, _train_args(seq_len=8192, precision="bf16", checkpoint=False))
    per_layer = saved_bytes_per_token(m, ALL, 16, 0.0, 2)
    assert off.parts["activations: saved tensors"] == 32 * 8192 * per_layer
    assert on.parts["activations: block inputs"] == 32 * 8192 * 4096 * 2


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_known_releases_count_the_real_models_parameters(name):
    """The release shapes (tied 3B, interleaved 8B 2410, 24B, Small 4's latent attention and experts)
    against the real model on the meta device."""
    m = KNOWN_MODELS[name]
    real = _real_counts(m, LoraArgs(rank=16))
    counts = param_counts(m, list(LINEARS), 16)
    assert counts["layers"] + counts["root"] == real["frozen"]  # a tied output counted once
    assert counts["layers_lora"] == real["trainable"]


def test_mistral_small_4_preset_is_transformers_mistral4_config(tmp_path):
    """The preset is Mistral4Config's defaults (its docstring documents them as Mistral-Small-4-119B-2603's),
    read through this library's own config.json translation; its text model has 118.97B parameters."""
    from transformers import Mistral4Config

    from model.configs import load_model_args

    (tmp_path / "config.json").write_text(Mistral4Config().to_json_string())
    preset = KNOWN_MODELS["mistral-small-4"]
    assert load_model_args(tmp_path) == replace(preset, extra={})
    counts = param_counts(preset, list(LINEARS), 16)
    assert round((counts["layers"] + counts["root"]) / 1e9, 2) == 118.97


@pytest.mark.parametrize("name", [n for n in sorted(KNOWN_MODELS) if KNOWN_MODELS[n].extra.get("vision_encoder")])
def test_vision_count_equals_transformers_pixtral_and_projector(name):
    # Pixtral 12B has no patch merger: transformers builds it as Llava (its projector: two linears).
    from transformers import LlavaConfig, Mistral3Config, PixtralVisionConfig, PixtralVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    m = KNOWN_MODELS[name]
    v = m.extra["vision_encoder"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "patch_size", "image_size")
    vision = PixtralVisionConfig(**{k: v[k] for k in keys}, head_dim=v["hidden_size"] // v["num_attention_heads"])
    text = {"model_type": "mistral", "hidden_size": m.dim}
    if v.get("mm_projector_id") == "patch_merge":
        config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=v["spatial_merge_size"],
                                multimodal_projector_bias=v["adapter_bias"])
        projector = Mistral3MultiModalProjector
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, multimodal_projector_bias=v["adapter_bias"])
        projector = LlavaMultiModalProjector
    with torch.device("meta"):
        modules = [PixtralVisionModel(config.vision_config), projector(config)]
    assert vision_params(m) == sum(p.numel() for mod in modules for p in mod.parameters())


def test_mistral_small_32_lora_r16_at_16384_fits_one_80gb_gpu(capsys):
    """Issue 16's question, answered with example/mistral_small_3.2.yaml (rank 16, seq_len 16384)."""
    argv = ["--train_yaml", "example/mistral_small_3.2.yaml", "--model", "mistral-small-3.2-24b", "--gpus", "1",
            "--gpu-memory", "80"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fits: 65.7 GB of 80 GB (82%)" in out and "0.44B vision encoder" in out and "not in the peak" in out
    assert main([*argv, "--seq_len", "32768"]) == 1
    assert "does NOT fit: 81.7 GB" in capsys.readouterr().out


def test_mistral_small_4_lora_r16_at_8192_gpu_count_with_and_without_nf4(capsys):
    """The issue's question, answered with example/mistral-small-4.yaml (rank 16, seq_len 8192): how many
    80 GB GPUs, with and without quantization: nf4 (which quantizes the stacked experts too)."""
    argv = ["--train_yaml", "example/mistral-small-4.yaml", "--model", "mistral-small-4", "--gpus", "8",
            "--gpu-memory", "80"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fits: 54.2 GB of 80 GB (68%)" in out and "fewest 80 GB GPUs that fit this config: 5 (73.7 GB each)" in out
    assert "LoRA rank 16" in out and "8192 x 1 tokens" in out and "36 latent (MLA" in out
    assert main([*argv, "--quantization", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "fits: 24.7 GB" in out and "fewest 80 GB GPUs that fit this config: 2 (56.7 GB each)" in out
    assert "stacked experts included" in out
    assert main([*argv[:-3], "4", "--gpu-memory", "80"]) == 1  # four GPUs without nf4: too few
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ministral3_8b", "mistral_small_3.2", "magistral_small", "mistral-small-4"])
def test_new_examples_load_and_plan_as_their_comment_says(name, capsys):
    """Each new example's header quotes the planner's command and total: running it gives that total."""
    text = (REPO / "example" / f"{name}.yaml").read_text()
    header = text.split("\n\n", 1)[0]
    assert text.startswith("# ") and "Sized for:" in header
    command = next(line for line in header.splitlines() if "python -m utils.estimate_memory" in line)
    argv = command.split("utils.estimate_memory", 1)[1].split()
    argv[argv.index("--train_yaml") + 1] = str(REPO / "example" / f"{name}.yaml")
    assert main([*argv, "--gpu-memory", "80"]) == 0
    fits = re.search(r"fits: (\d+\.\d) GB", capsys.readouterr().out).group(1)
    quoted = re.search(r"(\d+\.\d) GB", header.split("# Planner", 1)[1]).group(1)  # its first figure
    assert quoted == fits, header


def _workspace(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({**SHAPE_7B, "norm_eps": 1e-5, "rope_theta": 1e6}))
    cfg = {
        "model_id_or_path": str(folder),
        "run_dir": str(tmp_path / "run"),
        "data": {"instruct_data": "/path/to/train.jsonl"},
        **config,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_fits_with_a_folder_holding_only_params_json(tmp_path, capsys):
    cfg = _workspace(tmp_path, seq_len=8192)
    assert main(["--train_yaml", str(cfg), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "base weights (sharded)" in out


def test_cli_does_not_fit_and_names_the_knobs(tmp_path, capsys):
    cfg = _workspace(tmp_path, seq_len=32768, checkpoint=False)
    assert main(["--train_yaml", str(cfg), "--gpus", "1", "--gpu-memory", "80"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    assert "checkpoint: true" in out and "seq_len:" in out
    # Selective checkpointing fits the model shape of this workspace, but barely: said so.
    selective = next(line for line in out.splitlines() if "checkpoint: selective" in line)
    assert "(tight: over 90%)" in selective, out
    # A command-line override (as train.py takes them) makes it fit.
    assert main(["--train_yaml", str(cfg), "--gpus", "1", "--checkpoint", "true"]) == 0


def test_cli_missing_model_folder_is_a_user_error(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_id_or_path": str(tmp_path / "nowhere"),
                "run_dir": str(tmp_path / "r"),
                "data": {"instruct_data": "/path/to/train.jsonl"},
            }
        )
    )
    assert main(["--train_yaml", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "params.json" in err


def test_cli_without_a_gpu_plans_for_this_machines_ram(tmp_path, capsys, monkeypatch):
    # It used to plan silently for "1 GPU(s), 80 GB" on a machine without one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _workspace(tmp_path, seq_len=8192)
    main(["--train_yaml", str(cfg)])
    out = capsys.readouterr().out
    assert out.startswith("planning for 1 CPU process(es) sharing this machine's ")
    assert "GB of available RAM (no GPU here; --gpus N [--gpu-memory GB] plans for GPUs)" in out
    assert "per CPU process" in out and "GPU" not in out.split("\n", 2)[2]
    # Asked for GPUs it has not got: planned for them, and the memory it assumed is said.
    assert main(["--train_yaml", str(cfg), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("planning for 8 GPU(s) of 80 GB (assumed: no GPU here; --gpu-memory GB to change)")
    assert "per GPU" in out and " GB of 80 GB (" in out
    main(["--train_yaml", str(cfg), "--gpu-memory", "24"])
    assert capsys.readouterr().out.startswith("planning for 1 GPU(s) of 24 GB (--gpu-memory)")


def test_cpu_processes_hold_a_second_copy_of_the_root_while_gathering():
    # Over gloo the all-gather's own buffers hold the root twice (see the micro-measurement in
    # docs/memory.md); one process gathers no frozen weights, and on GPU that moment is not the peak.
    m = ModelArgs(**SHAPE_7B, norm_eps=1e-5)
    args = _train_args(seq_len=8192, precision="bf16")
    root = param_counts(m, ALL, 16)["root"] * 2
    part = "all-gather: second copy of the root"
    assert estimate(m, args, n_devices=2, device="cpu").parts[part] == root
    assert estimate(m, args, n_devices=8, device="cpu").parts[part] == root  # gathered whole on every rank
    assert part not in estimate(m, args, n_devices=1, device="cpu").parts
    assert part not in estimate(m, args, n_devices=2, device="cuda").parts


# Image data (issue 18): the vision encoder and adapter are built and counted.
def _vision_args(merge: bool, size: int = 64, layers: int = 3, hidden: int = 96, ffn: int = 224,
                 patch: int = 4) -> ModelArgs:
    """A tiny multimodal model: a Pixtral encoder with (Mistral Small 3.x) or without (Pixtral 12B) the
    pre-projector norm and 2x2 patch merger; every width distinct for byte-exact comparisons."""
    vision = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
                  num_channels=3, patch_size=patch, image_size=size, rope_theta=10000.0, image_token_id=5,
                  spatial_merge_size=2 if merge else 1, add_pre_mm_projector_layer_norm=merge, adapter_bias=not merge)
    if merge:
        vision["mm_projector_id"] = "patch_merge"
    return ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=128, extra={"vision_encoder": vision})


@pytest.mark.parametrize("merge", [True, False], ids=["merger", "no-merger"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vision_formula_equals_saved_tensors(merge, dtype):
    """Fully fine-tuned, the vision side saves for backward what the planner says, byte for byte: per
    block the text formula per patch (fused attention saves q, k, v, its output and log-sum-exp, as a
    text block's), plus the stem, the rotary table the blocks share, and the adapter. Three images of
    different sizes; the pixels are counted apart."""
    m = _vision_args(merge)
    torch.manual_seed(0)
    model = Transformer(m, vision=True)
    model.init_weights(0)
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    sizes = [64, 32, 16]  # square, as the plan's images; per-image terms differ by size
    images = [torch.randn(3, s, s) for s in sizes]
    seen = _saved_by_image_features(model, images)
    c = 2 if dtype == torch.bfloat16 else 4
    layers = m.extra["vision_encoder"]["num_hidden_layers"]
    expected = sum(layers * vision_block_saved_bytes(m, 1, s, list(LINEARS), 0, 0.0, c)
                   + vision_outside_blocks_saved_bytes(m, 1, s, c) for s in sizes)
    assert seen == expected


def _saved_by_image_features(model: Transformer, images: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while the vision side encodes ``images``
    (parameters and pixels not counted)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *images]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.image_features(images)
    return sum(seen.values())


def test_vision_attention_takes_the_path_the_planner_assumes():
    """The planner counts no (patches, patches) scores: model/vision.py's per-image SDPA must take a
    fused kernel (batched 4-D tensors: flash on CPU), not the math path (materialised scores and
    _safe_softmax; it did while it passed 3-D tensors, which no fused kernel takes). Going back to 3-D
    would make this fail, and the planner would need scores terms (docs/memory.md, before 1631964)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.lora import linear_factory
    from model.vision import VisionAttention, rotations_2d

    ops: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.__name__)
            return func(*args, **(kwargs or {}))

    attention = VisionAttention(32, 4, linear_factory(None))
    freqs = rotations_2d([(4, 4), (2, 3)], 8, 10000.0, torch.device("cpu"))
    with Record():
        attention(torch.randn(22, 32, requires_grad=True), freqs, [16, 6])
    fused = any("scaled_dot_product" in op for op in ops)
    assert fused, sorted(ops)
    assert "_safe_softmax.default" not in ops, sorted(ops)


def _image_plan(m: ModelArgs, images: Images | None, **kw) -> dict[str, float]:
    args = _train_args(precision="bf16", **{"seq_len": 16384, "checkpoint": True, **kw.pop("train", {})})
    if kw.pop("full", False):
        args.lora.enable = False
    return estimate(m, args, images=images, **kw).parts


def _vision_total(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if k.startswith("vision:"))


@pytest.mark.parametrize("name", ["mistral-small-3.2-24b", "pixtral-12b"])
def test_vision_terms_grow_with_images_and_their_size_and_text_only_adds_nothing(name):
    m = KNOWN_MODELS[name]
    size = max_image_size(m)
    text = _image_plan(m, None)
    assert not any(k.startswith("vision:") for k in text)  # text-only data: the vision side is not built
    assert _image_plan(m, Images(0, size)) == text
    # A text-only model plans text alone, and refuses images.
    text_model = replace(m, extra={})
    assert _image_plan(text_model, None) == text
    with pytest.raises(ConfigError, match="without a vision encoder"):
        _image_plan(text_model, Images(1, size))
    # More images, larger images: more memory; the text terms do not change (the images are tokens of seq_len).
    for kw in ({}, {"full": True}, {"full": True, "train": {"checkpoint": False}}, {"device": "cpu", "n_devices": 2}):
        one, three = _image_plan(m, Images(1, size), **kw), _image_plan(m, Images(3, size), **kw)
        small = _image_plan(m, Images(3, size // 2), **kw)
        assert _vision_total(small) < _vision_total(three) and _vision_total(one) < _vision_total(three), kw
        assert {k: v for k, v in three.items() if not k.startswith("vision:")} == _image_plan(m, None, **kw)
    # Fully fine-tuned, the encoder saves activations: checkpointing keeps less of them.
    kept = [sum(_image_plan(m, Images(3, size), full=True, train={"checkpoint": mode}).values())
            for mode in (True, "selective", False)]
    assert kept == sorted(kept) and len(set(kept)) == 3
    # Fused attention holds no (patches, patches) scores: a frozen encoder's activations grow with the
    # patches (4 x for twice the side), not with their square (the math path: 270 x for Small 3.2).
    frozen, half = (sum(v for k, v in _image_plan(m, Images(3, s)).items() if k.startswith("vision: activations"))
                    for s in (size, size // 2))
    assert frozen <= 4.5 * half, (frozen, half)


def test_vision_weights_are_sharded_and_counted_once():
    m = KNOWN_MODELS["mistral-small-3.2-24b"]
    params = vision_params(m)
    one = _image_plan(m, Images(1, 1540))["vision: weights (sharded)"]
    assert one == params * 2  # alone: frozen, unsharded, not gathered
    eight = _image_plan(m, Images(1, 1540), n_devices=8)["vision: weights (sharded)"]
    v = m.extra["vision_encoder"]
    h, f = v["hidden_size"], v["intermediate_size"]
    outside_blocks = params - v["num_hidden_layers"] * (4 * h * h + 3 * h * f + 2 * h)
    assert eight == pytest.approx(params * 2 / 8 + outside_blocks * 2)  # + stem and adapter gathered with the root
    full = _image_plan(m, Images(1, 1540), n_devices=8, full=True)["vision: weights (fp32 + grads + AdamW)"]
    assert full == pytest.approx(params * 16 / 8 + outside_blocks * 2)


VISION_LORA = {
    "encoder": ["wq", "vision_encoder.wq", "vision_encoder.wv", "vision_encoder.w2"],
    "everything": ["wq", *(f"vision_encoder.{w}" for w in ALL), "vision_language_adapter.w_in",
                   "vision_language_adapter.w_out", "patch_merger.merging_layer"],
}


def _vision_lora_model(targets: list[str], dtype: torch.dtype) -> tuple[ModelArgs, Transformer]:
    """The merged-patch vision model with rank-8 adapters on ``targets``, frozen but for them."""
    m = _vision_args(merge=True)
    torch.manual_seed(0)
    model = Transformer(m, lora=LoraArgs(rank=8, target_modules=targets), vision=True)
    model.init_weights(0)
    model.to(dtype)
    freeze_all_but_lora(model)
    return m, model


@pytest.mark.parametrize("targets", list(VISION_LORA))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vision_lora_block_formula_equals_saved_tensors(targets, dtype):
    """With adapters on the encoder (named in full, model.args.VISION_TARGETS), a vision block (the
    second: the first one's input needs no gradient) saves what the planner says, byte for byte."""
    m, model = _vision_lora_model(VISION_LORA[targets], dtype)
    sizes = [64, 32, 16]
    images = [torch.randn(3, s, s) for s in sizes]
    seen = _saved_inside(model, model.vision_encoder.transformer.layers[1], lambda: model.image_features(images))
    c = 2 if dtype == torch.bfloat16 else 4
    block_targets = vision_block_targets(VISION_LORA[targets])
    assert seen == sum(vision_block_saved_bytes(m, 1, s, block_targets, 8, 0.0, c) for s in sizes)


VISION_SIDE_LORA = {
    **VISION_LORA,
    "adapter side": ["wq", "vision_language_adapter.w_out"],
    "merger": ["patch_merger.merging_layer", "vision_language_adapter.w_out"],
    "feed-forward": ["vision_encoder.w1", "vision_encoder.w3", "vision_language_adapter.w_in"],
    "down-projection": ["vision_encoder.w2"],
}


@pytest.mark.parametrize("targets", list(VISION_SIDE_LORA))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vision_lora_side_formula_equals_saved_tensors(targets, dtype):
    """With LoRA, the whole vision side (every block, the rotary table, the pre-projector norm, the
    merger's unfolded input, the adapter's inputs and A x) saves what the planner says, byte for
    byte; the frozen stem saves nothing, nor does the first block's norm (its input needs no gradient),
    nor, without attention adapters, the first block's attention and feed-forward norm."""
    m, model = _vision_lora_model(VISION_SIDE_LORA[targets], dtype)
    sizes = [64, 32, 16]
    seen = _saved_by_image_features(model, [torch.randn(3, s, s) for s in sizes])
    c = 2 if dtype == torch.bfloat16 else 4
    block_targets = vision_block_targets(VISION_SIDE_LORA[targets])
    layers = m.extra["vision_encoder"]["num_hidden_layers"]
    expected = sum(
        (layers * vision_block_saved_bytes(m, 1, s, block_targets, 8, 0.0, c)
         - vision_first_block_unsaved_bytes(m, 1, s, c, block_targets) if block_targets else 0.0)
        + vision_outside_blocks_saved_bytes(m, 1, s, c, VISION_SIDE_LORA[targets], 8) for s in sizes)
    assert seen == expected


@pytest.mark.parametrize("targets", list(VISION_LORA))
def test_vision_lora_weights_count_the_real_models_adapters(targets):
    m = replace(KNOWN_MODELS["mistral-small-3.2-24b"])
    lora = LoraArgs(rank=16, target_modules=VISION_LORA[targets])
    with torch.device("meta"):
        model = Transformer(m, lora=lora, vision=True)
    freeze_all_but_lora(model)
    vision_names = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
    vision_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(vision_names))
    assert vision_lora > 0
    args = _train_args(precision="bf16", seq_len=16384)
    args.lora.target_modules = lora.target_modules
    line = "vision: weights (sharded) + adapters (fp32 + grads + AdamW)"
    weights = estimate(m, args, images=Images(1, 1540)).parts[line]
    assert weights == vision_params(m) * 2 + vision_lora * 16
    # NF4 stores the adapted vision linears in 4 bits too (model/quant.py quantizes every LoRALinear).
    args.quantization = "nf4"
    assert estimate(m, args, images=Images(1, 1540)).parts[line] < weights


# A tiny multimodal model trained one step on text, then one on images, reporting after each the peak
# of the tensors alive at once (parameters excluded; every op's outputs tracked until their storage
# dies: deterministic, as max_memory_allocated on GPU) and the process's peak RSS.
_IMAGE_CHILD = """
import json
import weakref
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from finetune.loss import TransformerWithLoss
from model.args import LoraArgs, ModelArgs
from model.lora import freeze_all_but_lora
from model.transformer import Transformer

class Live(TorchDispatchMode):
    def __init__(self, skip):
        super().__init__()
        self.skip, self.seen, self.live, self.peak = skip, set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {{}}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if size and ptr not in self.seen and ptr not in self.skip:
                    self.seen.add(ptr)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self.free, ptr, size)
        return out

    def free(self, ptr, size):
        self.seen.discard(ptr)
        self.live -= size

torch.set_num_threads(2)
args = ModelArgs(**{args!r})
model = Transformer(args, lora=LoraArgs(rank=8, target_modules={targets!r}), vision=True)
model.init_weights(0)
freeze_all_but_lora(model)
step = TransformerWithLoss(model)
opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-4)
rows = {size} // 8  # [IMG] rows (and columns) of one image: patch 4, 2 x 2 merge
ids = ([5] * rows + [6]) * rows * {n_images}
ids = torch.tensor(ids + [7] * ({seq_len} - len(ids)))
targets, mask = torch.randint(0, args.vocab_size, ids.shape), torch.ones(ids.shape, dtype=torch.bool)
params = {{p.untyped_storage().data_ptr() for p in model.parameters()}}
live, rss = [], []
for images in (None, [torch.randn(3, {size}, {size}) for _ in range({n_images})]):
    with Live(params) as mode:
        step(ids, [ids.numel()], targets, mask, images).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    live.append(mode.peak / 1e9)
    rss.append(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024 / 1e9)
print(json.dumps([live, rss]))
"""


@pytest.mark.parametrize("encoder", ["vision LoRA", "frozen"])
def test_cpu_estimate_of_an_image_run_within_15_percent_of_measured_peak(encoder):
    """LoRA on the language model and, for "vision LoRA", on every vision linear too (the encoder then
    saves its blocks' activations for backward), fp32 on CPU, no checkpointing, two 224 px images.
    Exactly, whatever the machine: the plan's vision activations bound the tensors the image step
    holds at once beyond the text step's, by at most 40% (its backward working set is an upper
    bound) and falling short by at most 10%. Measured RSS, with the calibrated allocator slack
    (docs/memory.md: within -14% to +17% over six encoder shapes): the text step's peak and the image
    step's within 15%, the difference (the vision terms) within 25%."""
    size, n_images, seq_len = 224, 2, 1664
    targets = [*DEFAULT_TARGETS, *VISION_TARGETS] if encoder == "vision LoRA" else list(DEFAULT_TARGETS)
    vision = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
                  patch_size=4, image_size=size, rope_theta=10000.0, spatial_merge_size=2, image_token_id=5,
                  mm_projector_id="patch_merge", add_pre_mm_projector_layer_norm=True, adapter_bias=False)
    shape = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=128, extra={"vision_encoder": vision})
    code = _IMAGE_CHILD.format(args=shape, size=size, n_images=n_images, seq_len=seq_len, targets=targets)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (text_live, image_live), (text_peak, image_peak) = json.loads(proc.stdout.strip().splitlines()[-1])
    m = ModelArgs(**shape)
    args = _train_args(seq_len=seq_len, checkpoint=False, precision="fp32")
    args.lora.rank, args.lora.target_modules = 8, targets
    plan = estimate(m, args, device="cpu", images=Images(n_images, size))
    assert image_shape(m, size)[1] * n_images <= seq_len
    activations = sum(v for k, v in plan.parts.items() if k.startswith("vision: activations")) / GB
    assert 0.9 * (image_live - text_live) <= activations <= 1.4 * (image_live - text_live), (activations, image_live - text_live)
    text, image = estimate(m, args, device="cpu").total / GB, plan.total / GB
    assert text == pytest.approx(text_peak, rel=0.15), (text, text_peak)
    assert image == pytest.approx(image_peak, rel=0.15), (image, image_peak)
    # The RSS difference of two steps holds allocator state (CPU_HEAP_VISION, fitted on one Intel Xeon) and
    # run-to-run spread of about 18 MB; on the frozen encoder it is only ~0.1 GB, so 40 MB of slack keeps
    # the check meaningful on other CPUs. The live-tensor check above is exact everywhere.
    assert image - text == pytest.approx(image_peak - text_peak, rel=0.25, abs=0.04), (image - text, image_peak - text_peak)


def test_cli_plans_image_data_and_names_the_fix_for_impossible_requests(capsys):
    """Mistral Small 3.2 with rows full of 1540 px images (docs/memory.md quotes this answer)."""
    argv = ["--train_yaml", "example/mistral_small_3.2.yaml", "--model", "mistral-small-3.2-24b", "--gpus", "1",
            "--gpu-memory", "80"]
    assert main([*argv, "--images-per-row", "fill"]) == 0
    out = capsys.readouterr().out
    assert "vision: activations (5 x 1540 px images)" in out and "(built: image data)" in out
    assert "fits: 66.7 GB of 80 GB (83%)" in out
    assert main([*argv, "--images-per-row", "1", "--image-size", "770"]) == 0
    assert "vision: activations (1 x 770 px images)" in capsys.readouterr().out
    for extra, message in (
        (["--images-per-row", "6"], "holds 5"),  # 6 x 3080 tokens > 16384
        (["--images-per-row", "1", "--image-size", "2000"], "from 28 to 1540 px"),
        (["--images-per-row", "some"], "a count or 'fill'"),
        (["--image-size", "512"], "needs image data"),
        (["--images-per-row", "1", "--model", "devstral-small-24b"], "no vision encoder"),
    ):
        assert main([*argv, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


@pytest.mark.parametrize("targets", list(VISION_LORA))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vision_selective_formula_equals_what_the_policy_keeps(targets, dtype):
    """The selective policy on a vision block (as finetune.parallel applies it to the text blocks) keeps
    the linears' outputs but w1's and w3's and each adapter's A x, and, as in a text block, the fused
    attention kernel's output and log-sum-exp."""
    from model.vision import rotations_2d
    from utils.estimate_memory import vision_args

    m, model = _vision_lora_model(VISION_LORA[targets], dtype)
    block = model.vision_encoder.transformer.layers[1]
    grids = [(16, 16), (8, 8), (4, 4)]
    lengths = [h * w for h, w in grids]
    va = vision_args(m)
    freqs = rotations_2d(grids, va.head_dim, 10000.0, torch.device("cpu"))
    x = torch.randn(sum(lengths), va.dim, dtype=dtype, requires_grad=True)
    kept = _kept_by_policy(block, block, x, freqs, lengths)
    c = 2 if dtype == torch.bfloat16 else 4
    block_targets = vision_block_targets(VISION_LORA[targets])
    assert kept == vision_selective_kept_bytes_per_patch(m, block_targets, 8, c) * sum(lengths)
