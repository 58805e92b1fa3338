"""Vision attention before and after batching its per-image SDPA calls to 4-D (issue 18): the old 3-D
call, which takes SDPA's math path (each picture's (heads, patches, patches) scores, float32), against
model/vision.py's 4-D call (the fused flash kernel on CPU), forward + backward of one
``VisionAttention`` (frozen weights, input needing a gradient, as in a trained encoder) on one picture.

    python benchmarks/bench_vision_attention.py --patches 1024 4096 --dtypes fp32 bf16

Each (patches, dtype, path) runs in a fresh process: the median time of ``--repeats`` steps after a
warm-up, the peak RSS of the first step above the RSS before it (VmHWM, reset through
/proc/self/clear_refs), and the bytes autograd saves for backward (weights not counted). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.lora import linear_factory
from model.rope import apply_rope
from model.vision import VisionAttention, rotations_2d


class MathPathAttention(VisionAttention):
    """model/vision.py's attention before the change: per-image SDPA on 3-D (heads, patches, head_dim)."""

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), freqs)  # (patches, heads, head_dim)
        k = apply_rope(self.wk(x).view(n, self.n_heads, self.head_dim), freqs)  # (patches, heads, head_dim)
        v = self.wv(x).view(n, self.n_heads, self.head_dim)  # (patches, heads, head_dim)
        out = [
            F.scaled_dot_product_attention(
                qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)
            ).transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
        ]  # each (image patches, heads, head_dim)
        return self.wo(torch.cat(out).reshape(n, -1))  # (patches, dim)


def _kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024


def run_one(patches: int, dtype: str, path: str, dim: int, heads: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cls = MathPathAttention if path == "3-D (math)" else VisionAttention
    attention = cls(dim, heads, linear_factory(None)).to(dt).requires_grad_(False)
    side = int(patches**0.5)
    freqs = rotations_2d([(side, side)], dim // heads, 10000.0, torch.device("cpu"))
    x = torch.randn(side * side, dim, dtype=dt, requires_grad=True)
    grad = torch.randn(side * side, dim, dtype=dt)
    lengths = [side * side]

    def step() -> None:
        attention(x, freqs, lengths).backward(grad)
        x.grad = None

    saved: dict[int, int] = {}
    weights = {w.untyped_storage().data_ptr() for w in attention.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(x, freqs, lengths)  # recorded, then freed
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    step()  # first step: its peak memory; also the warm-up
    peak = _kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "patches": side * side,
        "dtype": dtype,
        "path": path,
        "ms": 1e3 * statistics.median(times),
        "peak_gb": peak / 1e9,
        "saved_gb": sum(saved.values()) / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--patches", type=int, nargs="+", default=[1024, 4096], help="square pictures: rounded to a square"
    )
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--dim", type=int, default=1024, help="vision hidden size (Pixtral's: 1024)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument(
        "--paths",
        nargs="+",
        default=["3-D (math)", "4-D (fused)"],
        choices=["3-D (math)", "4-D (fused)"],
        help="the math path's scores take 12 H P^2 bytes and more: 1540 px (12100 patches) needs 28 GB",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=3, metavar=("PATCHES", "DTYPE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(int(a.one[0]), a.one[1], a.one[2], a.dim, a.heads, a.repeats, a.threads)))
        return
    for patches in a.patches:
        for dtype in a.dtypes:
            for path in a.paths:
                argv = [
                    sys.executable,
                    __file__,
                    "--one",
                    str(patches),
                    dtype,
                    path,
                    "--dim",
                    str(a.dim),
                    "--heads",
                    str(a.heads),
                    "--repeats",
                    str(a.repeats),
                    "--threads",
                    str(a.threads),
                ]
                out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
