"""Peak memory and step time of LoRA on a full-precision base versus QLoRA on an NF4 base.

Each configuration runs in its own process (peak RSS only grows), built exactly as training builds
it (meta device -> NF4 layers -> freeze -> activation checkpointing -> FSDP2 -> storage), with
random base weights streamed in one tensor at a time as from a checkpoint. Prints one JSON line
per run: the bytes held by the model's parameters and buffers, peak memory (GPU
max_memory_allocated or CPU peak RSS) after the build and over training, and the median step time.

    python benchmarks/bench_qlora.py --preset small --precision fp32      # both, alternating
    python benchmarks/bench_qlora.py --preset 7b --seq_len 8192 --precision bf16 --only nf4   # GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import distributed as D  # noqa: E402
from finetune.args import TrainArgs  # noqa: E402
from finetune.build import _copy_into, build_sharded, resolve_attention, resolve_precision  # noqa: E402
from finetune.monitoring import peak_memory_gb  # noqa: E402
from finetune.trainer import TrainState, train_step  # noqa: E402
from model.args import LoraArgs, ModelArgs  # noqa: E402
from model.lora import is_lora_key, lora_modules  # noqa: E402
from model.quant import NF4LoRALinear, quantize_nf4  # noqa: E402
from utils.bench_train_step import DTYPES, PRESETS, packed_batches  # noqa: E402


@torch.no_grad()
def _random_base(model: torch.nn.Module, device: torch.device) -> None:
    """Random base weights, quantized tensor by tensor like _load_base; non-zero adapters."""
    gen = torch.Generator().manual_seed(0)
    nf4 = {f"{n}.weight": m for n, m in lora_modules(model.transformer).items() if isinstance(m, NF4LoRALinear)}
    for name, p in model.transformer.named_parameters():
        if name.endswith("norm.weight"):
            _copy_into(p, torch.ones(p.shape, device=device))
        elif is_lora_key(name):
            _copy_into(p, (torch.randn(p.shape, generator=gen) * 0.01).to(device))
        elif name in nf4:
            m = nf4[name]
            full = (torch.randn(m.out_features, m.in_features, generator=gen) * 0.02).to(device, torch.bfloat16)
            packed, stats = quantize_nf4(full, storage_dtype=p.dtype)
            m.set_quant_stats(stats)
            _copy_into(p, packed)
        else:
            _copy_into(p, (torch.randn(p.shape, generator=gen) * 0.02).to(device, p.dtype))


def run_one(opts: argparse.Namespace, quantization: str) -> dict:
    device = D.init_distributed()
    model_args = ModelArgs(**PRESETS[opts.preset], norm_eps=1e-5, rope_theta=1e6)
    lora = LoraArgs(rank=opts.rank)
    precision = resolve_precision(opts.precision, device)
    model = build_sharded(
        model_args, lora, device, precision,
        attention_backend=resolve_attention("auto", device, model_args.head_dim),
        checkpoint_mode="full", loss_chunk_size=2048, quantization=quantization,
    )
    _random_base(model, device)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    after_build = peak_memory_gb(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    train_args = TrainArgs(model_id_or_path="-", run_dir="-", lora=lora)
    batches = packed_batches(opts.warmup + opts.steps, opts.seq_len, 1, 64, 512, model_args.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, optimizer, [batch], train_args, TrainState(), precision, device)  # .item() syncs
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    result = {
        "preset": opts.preset, "quantization": quantization, "precision": opts.precision,
        "seq_len": opts.seq_len, "rank": opts.rank, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model_state_gb": held / 1e9, "peak_after_build_gb": after_build, "peak_mem_gb": peak_memory_gb(device), "step_s": float(np.median(times)),
    }
    D.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs of runs")
    parser.add_argument("--only", choices=["none", "nf4"], help="run this configuration in this process")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.only:
        print(json.dumps(run_one(opts, opts.only)), flush=True)
        return
    for _ in range(opts.repeats):
        for quantization in ("none", "nf4"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", quantization], check=True)


if __name__ == "__main__":
    main()
