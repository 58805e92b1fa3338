"""How far is utils/estimate_memory.py from measured peaks? (the documented check of docs/memory.md)

    python3 benchmarks/check_memory_planner.py            # CPU: small, seq_len 1024/4096, 3 checkpointing modes
    python3 benchmarks/check_memory_planner.py --gpu_only # only the H100 peaks recorded in docs

CPU rows run benchmarks/bench_train_step.py (bf16, 2 threads) each in a fresh process and compare
its peak RSS with the planner's ``--device cpu`` estimate. GPU rows compare the planner's
``allocated`` (no CUDA context: what ``max_memory_allocated`` reports) with the H100 peaks of
docs/benchmarks.md. The measurements run first, so this process stays small while they run (a
child's ru_maxrss starts at its parent's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from workload import PRESETS as SHAPES  # noqa: E402  (NumPy only: this process stays small)

# docs/benchmarks.md, "GPU: training step (one H100)": (shape, seq_len, checkpoint, peak GB).
H100 = [
    ("7b", 8192, "full", 20.4),
    ("7b", 8192, "none", 65.2),
    ("7b", 32768, "full", 33.6),
    ("nemo", 8192, "full", 35.5),
]
MODES = ("full", "selective", "none")  # the config's 'checkpoint' values, as --checkpoint takes them


def measure_cpu(preset: str, seq_len: int, checkpoint: str, steps: int) -> float:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train_step.py"),
        "--preset",
        preset,
        "--seq_len",
        str(seq_len),
        "--precision",
        "bf16",
        "--threads",
        "2",
        "--steps",
        str(steps),
        "--warmup",
        "1",
        "--peak_tflops",
        "1",
        "--checkpoint",
        checkpoint,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mem_gb"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu_only", action="store_true")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=2)
    opts = parser.parse_args()
    cpu = []
    if not opts.gpu_only:
        for seq_len in opts.seq_lens:
            for ckpt in MODES:
                cpu.append(("small", seq_len, ckpt, measure_cpu("small", seq_len, ckpt, opts.steps)))
                print(f"measured small seq {seq_len} ckpt {ckpt}: {cpu[-1][3]:.3f} GB", file=sys.stderr)

    sys.path.insert(0, str(ROOT))
    from finetune.args import TrainArgs
    from model.args import ModelArgs
    from utils.estimate_memory import GB, estimate

    print("| shape | device | seq_len | act. ckpt | measured | predicted | error |")
    print("|---|---|---|---|---|---|---|")
    for rows, device in ((cpu, "cpu"), (H100, "cuda")):
        for shape, seq_len, ckpt, measured in rows:
            m = ModelArgs(**SHAPES[shape], norm_eps=1e-5)
            args = TrainArgs(
                model_id_or_path="-", run_dir="-", seq_len=seq_len, checkpoint=ckpt, precision="bf16"
            )
            plan = estimate(m, args, n_devices=1, device=device)
            predicted = (plan.total if device == "cpu" else plan.allocated) / GB
            what = "CPU RSS" if device == "cpu" else "H100 allocated"
            print(
                f"| {shape} | {what} | {seq_len} | {ckpt} | {measured:.2f} GB | "
                f"{predicted:.2f} GB | {100 * (predicted - measured) / measured:+.1f}% |"
            )


if __name__ == "__main__":
    main()
