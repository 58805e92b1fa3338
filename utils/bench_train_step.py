"""Training-step throughput, peak memory and model-FLOPs utilisation of our stack.

Builds the model exactly as training does (meta device -> freeze -> activation checkpointing ->
FSDP2 -> fused chunked loss), with random weights of a named shape, and times optimizer steps on
packed rows of random documents (``utils/workload.py``, shared with ``benchmarks/bench_hf.py``). Runs
as one process (a group of one) unless launched by torchrun.

    python -m utils.bench_train_step --preset small --seq_len 1024 --precision bf16 --no_checkpoint
    python -m utils.bench_train_step --preset 7b --seq_len 32768 --precision bf16   # on a GPU
    python -m utils.bench_train_step --model FOLDER --seq_len 2048   # FOLDER/params.json or config.json's shape

``python benchmarks/bench_train_step.py`` is the same command (the benchmark scripts call this module).

Prints one JSON line: tokens/s, peak memory (GPU max_memory_allocated or CPU RSS), model FLOPs
per token and MFU against --peak_tflops (default: a measured matmul rate, --matmul_n).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from finetune import distributed as D
from finetune.args import CHECKPOINT_MODES, TrainArgs
from finetune.build import build_sharded, resolve_attention, resolve_precision
from finetune.data.loader import Batch
from finetune.monitoring import peak_memory_gb
from finetune.trainer import TrainState, build_optimizer, train_step
from model.args import LoraArgs, ModelArgs, MoeArgs
from model.configs import load_model_args
from model.lora import LoRALinear, lora_modules
from utils.workload import PRESETS, packed_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def packed_batches(n: int, seq_len: int, batch_size: int, doc_min: int, doc_max: int, vocab: int, seed: int = 0):
    return [Batch(*row) for row in packed_rows(n, seq_len, batch_size, doc_min, doc_max, vocab, seed)]


def model_flops_per_token(args: ModelArgs, lora: LoraArgs, batches: list[Batch]) -> float:
    """Model FLOPs of one training token, recomputation not counted.

    Frozen matmuls cost 2 (forward) + 2 (input gradient) FLOPs per weight, trainable ones (adapters)
    also 2 for the weight gradient; causal attention costs 2 * 2 * heads * head_dim per (query, key)
    pair forward, three times that with backward.
    """
    kv = args.n_kv_heads * args.head_dim
    attn_w = args.dim * args.n_heads * args.head_dim * 2 + args.dim * kv * 2
    ffn_w = 3 * args.dim * args.hidden_dim * (args.moe.num_experts_per_tok if args.moe else 1)
    frozen = args.n_layers * (attn_w + ffn_w) + args.dim * args.vocab_size
    shapes = {"wq": (args.dim, args.n_heads * args.head_dim), "wk": (args.dim, kv), "wv": (args.dim, kv),
              "wo": (args.n_heads * args.head_dim, args.dim), "w1": (args.dim, args.hidden_dim),
              "w2": (args.hidden_dim, args.dim), "w3": (args.dim, args.hidden_dim)}
    per_expert = args.moe.num_experts_per_tok if args.moe else 1
    lora_w = sum(lora.rank * sum(shapes[t]) * (per_expert if t.startswith("w") and t[1].isdigit() else 1)
                 for t in lora.target_modules if t in shapes) * args.n_layers  # other names match nothing here
    pairs = tokens = 0
    for b in batches:
        real = [n for n, start in zip(b.seqlens, np.cumsum([0] + b.seqlens[:-1]), strict=True) if b.y_mask[start: start + n].any()]
        for window in args.layer_windows:  # (query, key) pairs of every layer
            pairs += sum(sum(min(i + 1, window or 1 << 60) for i in range(n)) for n in real)
        tokens += len(b.x)
    attn = 4 * args.n_heads * args.head_dim * pairs / tokens
    return 4 * frozen + 6 * lora_w + 3 * attn


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, trials: int = 7) -> float:
    """The machine's matmul ceiling: the best of ``trials`` timings of an n x n x n product (a
    shared, noisy machine only ever makes a product slower, so the best is the ceiling)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, t0 = 3, time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def _random_init(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        elif "lora_B" in name:
            local.normal_(0, 0.01)  # non-zero so every gradient path does real work
        else:
            local.normal_(0, 0.02)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--model", metavar="FOLDER",
                        help="a folder with params.json or a Hugging Face config.json (no weights needed): its "
                             "shape instead of --preset's (latent attention, fine-grained MoE)")
    parser.add_argument("--n_layers", type=int, help="override the preset's layer count")
    parser.add_argument("--moe", type=int, nargs=2, metavar=("EXPERTS", "PER_TOKEN"))
    parser.add_argument("--sliding_window", type=int)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--doc_min", type=int, default=64)
    parser.add_argument("--doc_max", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_MODES, default="full",
                        help="activation checkpointing mode (the config's 'checkpoint')")
    parser.add_argument("--no_checkpoint", action="store_const", dest="checkpoint", const="none",
                        help="same as --checkpoint none")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block (the config's 'compile')")
    parser.add_argument("--loss_chunk_size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--peak_tflops", type=float, help="matmul peak for MFU (default: measured)")
    parser.add_argument("--matmul_n", type=int, default=2048, help="size of the measured matmul")
    parser.add_argument("--profile", type=int, metavar="ROWS",
                        help="profile one more step after the timed ones; print its top ROWS ops by self time "
                             "(GPU time on CUDA) to stderr")
    opts = parser.parse_args(argv)
    if opts.steps < 1:  # the step time is the median of the timed steps
        parser.error(f"--steps must be at least 1, got {opts.steps}")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    device = D.init_distributed()
    if opts.model:
        if opts.moe or opts.sliding_window:
            parser.error("--moe and --sliding_window change a preset's shape; --model's folder says its own")
        model_args = load_model_args(opts.model)
        if opts.n_layers:
            model_args = replace(model_args, n_layers=opts.n_layers)
    else:
        shape = dict(PRESETS[opts.preset])
        if opts.n_layers:
            shape["n_layers"] = opts.n_layers
        model_args = ModelArgs(**shape, norm_eps=1e-5, rope_theta=1e6, sliding_window=opts.sliding_window,
                               moe=MoeArgs(*opts.moe) if opts.moe else None)
    lora = LoraArgs(rank=opts.rank)
    dtype = DTYPES[opts.precision]
    precision = resolve_precision(opts.precision, device)
    attention = resolve_attention(opts.attention, device, model_args.head_dim)
    model = build_sharded(model_args, lora, device, precision, attention_backend=attention,
                          checkpoint_mode=opts.checkpoint, loss_chunk_size=opts.loss_chunk_size, compile=opts.compile)
    _random_init(model)
    assert all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    train_args = TrainArgs(model_id_or_path="-", run_dir="-", num_microbatches=1, lora=lora)
    optimizer = build_optimizer(model, train_args)  # exactly the training optimizer
    batches = packed_batches(opts.warmup + opts.steps + (1 if opts.profile else 0), opts.seq_len, opts.batch_size, opts.doc_min,
                             opts.doc_max, model_args.vocab_size)
    state = TrainState()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, warmup_times = [], []
    for i, batch in enumerate(batches):
        profiling = bool(opts.profile) and i == len(batches) - 1
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext() as profiler:
            t0 = time.perf_counter()
            train_step(model, optimizer, [batch], train_args, state, precision, device)  # .item() syncs
            elapsed = time.perf_counter() - t0
        if profiling:
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort, row_limit=opts.profile), file=sys.stderr)
        elif i >= opts.warmup:
            times.append(elapsed)
        else:
            warmup_times.append(elapsed)
    step_time = float(np.median(times))
    tokens = opts.seq_len * opts.batch_size * D.world_size()
    # The FLOP count knows grouped-query attention and Mixtral's experts only: no MFU for the others.
    known = model_args.mla is None and (model_args.moe is None or not model_args.moe.fine_grained)
    flops = model_flops_per_token(model_args, lora, batches) if known else None
    peak = opts.peak_tflops * 1e12 if opts.peak_tflops else measure_matmul_peak(device, dtype, opts.matmul_n)
    tok_s = tokens / step_time
    result = {
        "preset": opts.preset, "model": opts.model, "n_layers": model_args.n_layers, "seq_len": opts.seq_len,
        "batch_size": opts.batch_size, "precision": opts.precision, "attention": attention,
        "checkpoint": opts.checkpoint, "compile": opts.compile, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "world_size": D.world_size(), "step_s": step_time,
        "first_step_s": warmup_times[0] if warmup_times else None,
        "tokens_per_s": tok_s, "peak_mem_gb": peak_memory_gb(device), "model_mflop_per_token": flops / 1e6 if flops else None,
        "matmul_peak_tflops": peak / 1e12, "mfu": tok_s * flops / D.world_size() / peak if flops else None,
    }
    if D.is_main():
        print(json.dumps(result))
    D.destroy()


if __name__ == "__main__":
    main()
