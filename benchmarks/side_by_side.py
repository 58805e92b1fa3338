"""Ours versus Hugging Face transformers + PEFT, in the same run, alternating.

    python3 benchmarks/side_by_side.py                       # the issue's comparison, ~10 min on 2 idle cores
    python3 benchmarks/side_by_side.py --seq_lens 1024 --checkpoint off --repeats 5 --ours_args="--loss_chunk_size 512"

For every config (seq_len x activation checkpointing) it runs ``--repeats`` pairs, one ours
(python -m utils.bench_train_step) and one theirs (benchmarks/bench_hf.py, in its own venv), each in
its own fresh process so peak RSS is that run's own, in alternating order (ours first, then theirs
first, ...) with the repeat loop outermost so slow drifts of the machine's load hit every config
alike. Both get the same packed rows (same document-length distribution and seed; checked by a
fingerprint before timing) and the same thread count. It prints, per config, the median over pairs
of the per-pair ratios ours/theirs for tokens/s and for peak RSS (never a ratio of two medians
measured at different moments), with the 1-minute load average seen before each run.

This driver imports neither torch nor the project: a child process starts with its parent's peak
RSS already in its ``ru_maxrss`` (Linux carries it across fork+exec), so the parent must stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_HF = HERE / "bench_hf.py"

_CHECK = """
import json, sys
sys.path[:0] = [{root!r}, {here!r}]
import bench_hf
from utils import bench_train_step as ours
assert ours.PRESETS[{preset!r}] == bench_hf.PRESETS[{preset!r}], "preset tables differ"
rows = [(b.x, b.y, b.y_mask, b.seqlens) for b in ours.packed_batches({n}, {seq_len}, 1, {doc_min}, {doc_max},
        ours.PRESETS[{preset!r}]["vocab_size"])]
print(json.dumps({{"batches": bench_hf.fingerprint(rows)}}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _run_json(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _hf_python() -> str:
    subprocess.run([sys.executable, str(BENCH_HF), "--setup"], cwd=ROOT, check=True)
    return str(HERE / ".venv-hf" / "bin" / "python")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument(
        "--checkpoint",
        choices=["off", "on", "both"],
        default="both",
        help="activation checkpointing (HF: gradient checkpointing)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="pairs (ours, theirs) per config")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc_min", type=int, default=64)
    parser.add_argument("--doc_max", type=int, default=512)
    parser.add_argument(
        "--ours_args", default="", help="extra flags for bench_train_step.py, e.g. '--loss_chunk_size 512'"
    )
    parser.add_argument(
        "--hf_args", default="", help="extra flags for bench_hf.py, e.g. '--attn_implementation eager'"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json_out", type=Path, help="write every run's result here")
    opts = parser.parse_args()

    hf_python = _hf_python()
    iso = _run_json([hf_python, str(BENCH_HF), "--check_isolation"], opts.timeout)
    if not iso["isolated"]["sdpa"]:
        sys.exit(f"HF does not isolate packed documents with sdpa: {iso}")
    print(f"HF isolation check (max |packed - per-document| logits): {json.dumps(iso)}", flush=True)

    common = [
        "--preset",
        opts.preset,
        "--threads",
        str(opts.threads),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
        "--doc_min",
        str(opts.doc_min),
        "--doc_max",
        str(opts.doc_max),
    ]
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[opts.checkpoint]
    configs = [(s, c) for s in opts.seq_lens for c in ckpts]
    expected = {}
    for seq_len in opts.seq_lens:
        code = _CHECK.format(
            root=str(ROOT),
            here=str(HERE),
            preset=opts.preset,
            n=opts.warmup + opts.steps,
            seq_len=seq_len,
            doc_min=opts.doc_min,
            doc_max=opts.doc_max,
        )
        expected[seq_len] = _run_json([sys.executable, "-c", code], opts.timeout)["batches"]

    def cmd(stack: str, seq_len: int, ckpt: bool) -> list[str]:
        flags = [*common, "--seq_len", str(seq_len)] + ([] if ckpt else ["--no_checkpoint"])
        if stack == "ours":
            return [sys.executable, "-m", "utils.bench_train_step", *flags, "--precision", "bf16", *opts.ours_args.split()]
        return [hf_python, str(BENCH_HF), *flags, "--precision", "bf16", *opts.hf_args.split()]

    results: list[dict] = []
    t_start = time.time()
    for rep in range(opts.repeats):
        for seq_len, ckpt in configs:
            order = ("ours", "hf") if rep % 2 == 0 else ("hf", "ours")
            pair = {}
            for stack in order:
                load = os.getloadavg()[0]
                r = _run_json(cmd(stack, seq_len, ckpt), opts.timeout)
                r.update(stack=stack, repeat=rep, load1=load)
                if stack == "hf" and r["batches"] != expected[seq_len]:
                    sys.exit(f"HF saw other batches than ours ({r['batches']} != {expected[seq_len]})")
                pair[stack] = r
                results.append(r)
                print(
                    f"[{time.time() - t_start:6.0f}s] rep {rep} seq {seq_len} ckpt {'on ' if ckpt else 'off'} "
                    f"{stack:4s} {r['tokens_per_s']:8.1f} tok/s  {r['peak_mem_gb']:.2f} GB  load {load:.2f}",
                    flush=True,
                )
    if opts.json_out:
        opts.json_out.write_text(json.dumps(results, indent=1))

    print(
        f"\n{opts.preset}, bf16, {opts.threads} threads, {opts.repeats} pairs x {opts.steps} steps "
        f"(+{opts.warmup} warm-up), ours_args='{opts.ours_args}', hf_args='{opts.hf_args}'"
    )
    print(
        "| seq_len | act. ckpt | ours tok/s | HF tok/s | **tok/s ours/HF** | ours peak RSS | HF peak RSS "
        "| **RSS ours/HF** | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seq_len, ckpt in configs:
        # Ours reports the checkpointing mode ("full"/"none"), HF a bool.
        runs = [r for r in results if r["seq_len"] == seq_len and (r["checkpoint"] not in (False, "none")) == ckpt]
        by = {s: [r for r in runs if r["stack"] == s] for s in ("ours", "hf")}
        pairs = list(
            zip(
                sorted(by["ours"], key=lambda r: r["repeat"]),
                sorted(by["hf"], key=lambda r: r["repeat"]),
                strict=True,
            )
        )
        speed = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in pairs]
        mem = [o["peak_mem_gb"] / h["peak_mem_gb"] for o, h in pairs]
        loads = [r["load1"] for r in runs]

        def med(stack: str, key: str, by=by) -> float:
            return statistics.median(r[key] for r in by[stack])

        print(
            f"| {seq_len} | {'on' if ckpt else 'off'} | {med('ours', 'tokens_per_s'):.0f} | "
            f"{med('hf', 'tokens_per_s'):.0f} | **{statistics.median(speed):.2f}×** ({min(speed):.2f}–{max(speed):.2f}) | "
            f"{med('ours', 'peak_mem_gb'):.2f} GB | {med('hf', 'peak_mem_gb'):.2f} GB | "
            f"**{statistics.median(mem):.2f}×** ({min(mem):.2f}–{max(mem):.2f}) | {min(loads):.1f}–{max(loads):.1f} |"
        )
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
