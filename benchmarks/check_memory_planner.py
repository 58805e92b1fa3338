"""How far is utils/estimate_memory.py from measured peaks? (the documented check of docs/memory.md)

    python3 benchmarks/check_memory_planner.py            # CPU: small, seq_len 1024/4096, 3 checkpointing modes
    python3 benchmarks/check_memory_planner.py --processes 2 --seq_lens 1024 4096   # 2 CPU processes (gloo)
    python3 benchmarks/check_memory_planner.py --gpu_only # only the H100 peaks recorded in docs
    python3 benchmarks/check_memory_planner.py --train_yaml quickstart_run/quickstart.yaml --processes 1 2

CPU rows run ``python -m utils.bench_train_step`` (bf16, 2 threads in all) in fresh processes, under
``torch.distributed.run`` when ``--processes`` is more than 1 (the cores shared out), and compare
the largest rank's own peak RSS (VmHWM) with the planner's ``--device cpu`` estimate for that world
size. With ``--train_yaml``, ``train.py`` itself runs that config (30 steps) instead. GPU rows
compare the planner's ``allocated`` (no CUDA context: what ``max_memory_allocated`` reports) with
the H100 peaks of docs/benchmarks.md. The measurements run first, so this process stays small
while they run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.workload import PRESETS as SHAPES  # noqa: E402  (NumPy only: this process stays small)

# docs/benchmarks.md, "GPU: training step (one H100)": (shape, seq_len, checkpoint, peak GB).
H100 = [
    ("7b", 8192, "full", 20.4),
    ("7b", 8192, "none", 65.2),
    ("7b", 32768, "full", 33.6),
    ("nemo", 8192, "full", 35.5),
]
MODES = ("full", "selective", "none")  # the config's 'checkpoint' values, as --checkpoint takes them
CORES = 2  # threads in all, shared out over the processes


def _vmhwm_gb() -> float:
    """This process's own peak RSS (``ru_maxrss`` would start at the parent's peak after fork)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024 / 1e9


def worker(out: Path, what: str, argv: list[str]) -> None:
    """In each process: train (``train.py`` or ``utils.bench_train_step``), then write this rank's peak RSS."""
    if what == "train":
        from finetune.trainer import main as train

        code = train(argv)
    else:
        from utils.bench_train_step import main as bench

        bench(argv)
        code = 0
    rank = os.environ.get("RANK", "0")
    (out / f"rank_{rank}.json").write_text(json.dumps({"code": code, "vmhwm_gb": _vmhwm_gb()}))


def run_ranks(what: str, argv: list[str], processes: int) -> list[float]:
    """Peak RSS of every rank of one run on ``processes`` CPU processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if what == "train":
            argv = [*argv, "--run_dir", str(out / "run")]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        cmd = [sys.executable, *(launcher if processes > 1 else []), __file__, "--worker", str(out), what, *argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, CORES // processes))}
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(processes)]
    assert all(r["code"] == 0 for r in ranks), ranks
    return [r["vmhwm_gb"] for r in ranks]


def bench_argv(preset: str, seq_len: int, checkpoint: str, steps: int, processes: int) -> list[str]:
    return ["--preset", preset, "--seq_len", str(seq_len), "--precision", "bf16",
            "--threads", str(max(1, CORES // processes)), "--steps", str(steps), "--warmup", "1",
            "--peak_tflops", "1", "--checkpoint", checkpoint]


def main_train(config: str, processes: list[int], repeat: int) -> None:
    measured = {n: [run_ranks("train", [config, "--max_steps", "30"], n) for _ in range(repeat)] for n in processes}
    from finetune.args import load_train_args
    from utils.estimate_memory import GB, _load_model_args, estimate

    args = load_train_args(config)
    m = _load_model_args(args.model_id_or_path)
    print("| processes | peak RSS per rank, each run | predicted | error (largest rank) |")
    print("|---|---|---|---|")
    for n, runs in measured.items():
        predicted = estimate(m, args, n_devices=n, device="cpu").total / GB
        errors = ", ".join(f"{100 * (predicted - max(r)) / max(r):+.1f}%" for r in runs)
        peaks = "; ".join(" / ".join(f"{g:.3f}" for g in r) for r in runs)
        print(f"| {n} | {peaks} GB | {predicted:.3f} GB | {errors} |")


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        return worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu_only", action="store_true")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1], help="CPU world sizes to measure")
    parser.add_argument("--train_yaml", help="measure train.py on this config instead (30 steps)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per world size with --train_yaml")
    opts = parser.parse_args()
    if opts.train_yaml:
        return main_train(opts.train_yaml, opts.processes, opts.repeat)
    cpu = []
    if not opts.gpu_only:
        for n in opts.processes:
            for seq_len in opts.seq_lens:
                for ckpt in MODES:
                    peak = max(run_ranks("bench", bench_argv("small", seq_len, ckpt, opts.steps, n), n))
                    cpu.append(("small", n, seq_len, ckpt, peak))
                    print(f"measured small x{n} seq {seq_len} ckpt {ckpt}: {peak:.3f} GB", file=sys.stderr)

    from finetune.args import TrainArgs
    from model.args import ModelArgs
    from utils.estimate_memory import GB, estimate

    print("| shape | device | processes | seq_len | act. ckpt | measured | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(*r, "cpu") for r in cpu] + [(s, 1, q, c, g, "cuda") for s, q, c, g in H100]
    for shape, n, seq_len, ckpt, measured, device in rows:
        m = ModelArgs(**SHAPES[shape], norm_eps=1e-5)
        args = TrainArgs(model_id_or_path="-", run_dir="-", seq_len=seq_len, checkpoint=ckpt, precision="bf16")
        plan = estimate(m, args, n_devices=n, device=device)
        predicted = (plan.total if device == "cpu" else plan.allocated) / GB
        what = "CPU RSS" if device == "cpu" else "H100 allocated"
        print(
            f"| {shape} | {what} | {n} | {seq_len} | {ckpt} | {measured:.2f} GB | "
            f"{predicted:.2f} GB | {100 * (predicted - measured) / measured:+.1f}% |"
        )


if __name__ == "__main__":
    main()
