"""RMSNorm forward + backward: ours (model/transformer.py, backward written out) against the same
arithmetic differentiated by autograd, alternating in one process.

    python benchmarks/bench_rms_norm.py --tokens 1024 4096 --dim 512

Prints the median time of each per shape and the peak bytes each saves for backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model.transformer import RMSNorm


def autograd_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def saved_bytes(fn, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.clone().requires_grad_(True))
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    norm = RMSNorm(a.dim, 1e-5).bfloat16().requires_grad_(False)  # frozen gain, as under LoRA
    variants = {"ours": norm, "autograd": lambda x: autograd_rms_norm(x, norm.weight, norm.eps)}
    for tokens in a.tokens:
        x0 = torch.randn(tokens, a.dim).bfloat16()
        grad = torch.randn(tokens, a.dim).bfloat16()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(a.repeats + 1):  # the first round warms up
            for name, fn in variants.items():
                x = x0.clone().requires_grad_(True)
                t0 = time.perf_counter()
                fn(x).backward(grad)
                times[name].append(time.perf_counter() - t0)
        print(json.dumps({"tokens": tokens, "dim": a.dim,
                          **{f"{k}_ms": round(1e3 * statistics.median(v[1:]), 3) for k, v in times.items()},
                          **{f"{k}_saved_bytes": saved_bytes(fn, x0) for k, fn in variants.items()}}))


if __name__ == "__main__":
    main()
