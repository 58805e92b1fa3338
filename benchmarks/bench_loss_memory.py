"""Peak memory of the loss at a large vocabulary: fused chunked cross-entropy vs materialised logits.

Each variant runs in a fresh process (peak RSS is per process) on the same hidden states: the
forward and backward of the output layer + cross-entropy for ``--tokens`` target rows.

    python benchmarks/bench_loss_memory.py --tokens 4096 --dim 512 --vocab 131072
    python benchmarks/bench_loss_memory.py --tokens 1024 --vocab 32768 --time_blocks 1024,32

"materialised" is what a plain implementation does: bf16 logits for the whole row, upcast to
float32, ``F.cross_entropy``, backward through both. ``--time_blocks`` instead times the fused
loss's forward + backward with each float32 block size (rows turned into the softmax at once),
alternating them in one process, and prints the median of ``--repeats`` timings of each.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _inputs(tokens: int, dim: int, vocab: int):
    """bf16 hidden states (requiring grad), a bf16 output weight and targets, from one seed;
    torch is imported here so the parent process stays small."""
    import torch

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.02).bfloat16()
    return h, w, torch.randint(0, vocab, (tokens,), generator=g)


def _run(variant: str, tokens: int, dim: int, vocab: int, chunk: int) -> dict:
    import torch.nn.functional as F

    from finetune.loss import linear_cross_entropy_sum

    h, w, y = _inputs(tokens, dim, vocab)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "fused":
        loss = linear_cross_entropy_sum(h, w, y, chunk)
    else:
        loss = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "loss": loss.item(), "seconds": seconds,
            "loss_peak_gb": (peak - base) * 1024 / 1e9, "process_peak_gb": peak * 1024 / 1e9}


def _time_blocks(blocks: list[int], tokens: int, dim: int, vocab: int, chunk: int, repeats: int) -> None:
    import statistics

    from finetune.loss import linear_cross_entropy_sum

    h, w, y = _inputs(tokens, dim, vocab)
    times: dict[int, list[float]] = {b: [] for b in blocks}
    for _ in range(repeats + 1):  # the first round warms up
        for b in blocks:
            t0 = time.perf_counter()
            linear_cross_entropy_sum(h, w, y, chunk, b).backward()
            times[b].append(time.perf_counter() - t0)
    for b in blocks:
        print(json.dumps({"block_rows": b, "median_ms": 1e3 * statistics.median(times[b][1:]),
                          "min_ms": 1e3 * min(times[b][1:])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--variant", choices=["fused", "materialised"])
    p.add_argument("--time_blocks", help="comma-separated float32 block sizes (rows) to time")
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    if a.time_blocks:
        _time_blocks([int(b) for b in a.time_blocks.split(",")], a.tokens, a.dim, a.vocab, a.chunk, a.repeats)
        return
    if a.variant:  # child process
        print(json.dumps(_run(a.variant, a.tokens, a.dim, a.vocab, a.chunk)))
        return
    results = {}
    for variant in ("materialised", "fused"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(a.tokens),
                              "--dim", str(a.dim), "--vocab", str(a.vocab), "--chunk", str(a.chunk)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    ratio = results["fused"]["loss_peak_gb"] / results["materialised"]["loss_peak_gb"]
    print(f"loss peak memory fused/materialised: {ratio:.2f}x "
          f"(losses {results['fused']['loss']:.1f} vs {results['materialised']['loss']:.1f})")


if __name__ == "__main__":
    main()
