"""Time the parts of a training run: the worker that ``validate_data --measure`` launches.

    python -m torch.distributed.run --standalone --nproc-per-node N -m utils.measure CONFIG.yaml \\
        --workdir DIR [--steps 3] [--seconds 10] [--launched_at UNIX_TIME]

It does what ``train.py`` does, in the same launcher and on as many processes as the training will
use (so process count, threads per process and collectives are those of the real run), and times
each part an ETA needs: startup (from ``--launched_at``: launcher, imports, process group, the
data check, loaders, model), the first optimizer step (allocation, kernel selection), then at
least ``--steps`` steps and about ``--seconds`` of them, one evaluation over the eval set (at most
8 batches timed, scaled to all of them) and one checkpoint save into ``DIR``. Rank 0 writes
``DIR/timings.json``. Nothing is written to the config's run_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from finetune import distributed as D
from finetune.args import load_train_args
from finetune.build import resolve_precision
from finetune.monitoring import peak_memory_gb
from finetune.trainer import evaluate, load_inputs, save, setup, tokens_per_step, train_step

MAX_STEPS = 100  # the time budget's cap on timed steps
EVAL_BATCHES = 8  # eval batches timed; the rest are assumed to cost the same


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run(config: str, workdir: Path, steps: int, seconds: float, launched_at: float | None) -> dict:
    """Seconds per part of train.py's run of ``config`` on this process group (rank 0's clock)."""
    device = D.init_distributed()
    args = load_train_args(config)
    precision = resolve_precision(args.precision, device)
    # train.py's own setup: the data scanned on rank 0 (from the cache when set), the same model,
    # loaders and optimizer (so memory is the same); all ranks stop on an error.
    t = setup(args, load_inputs(args, config, device), device, precision)
    t.model.train()
    D.barrier()
    ready_at = time.time()

    times: list[float] = []
    spent = 0.0
    while len(times) < steps + 1 or (spent < seconds and len(times) < MAX_STEPS + 1):
        batches = [next(t.loader) for _ in range(args.num_microbatches)]
        t0 = _sync(device)
        train_step(t.model, t.optimizer, batches, args, t.state, precision, device)  # .item() syncs all ranks
        times.append(_sync(device) - t0)
        spent += times[-1] if len(times) > 1 else 0.0
        # Every rank must take the same number of steps: stop when any rank's budget is spent.
        done = len(times) >= steps + 1 and (spent >= seconds or len(times) >= MAX_STEPS + 1)
        if D.all_reduce_max(1.0 if done else 0.0, device):
            break

    eval_s, n_eval = 0.0, len(t.eval_batches)
    if n_eval:
        timed = t.eval_batches[:EVAL_BATCHES]  # every rank has the same number of eval batches
        t0 = _sync(device)
        evaluate(t.model, timed, device)
        eval_s = (_sync(device) - t0) * n_eval / len(timed)

    ckpt_s = 0.0
    if not args.no_ckpt:
        t.state.step = len(times)
        t0 = _sync(device)
        save(t, workdir / "run")
        ckpt_s = _sync(device) - t0

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "processes": D.world_size(),
        "threads": torch.get_num_threads(),
        "precision": precision.name,
        "startup_s": ready_at - launched_at if launched_at is not None else None,
        "first_step_s": times[0],
        "step_s": statistics.mean(times[1:]),
        "steps": len(times) - 1,
        "step_times_s": [round(t, 4) for t in times],
        "eval_s": eval_s,
        "eval_batches": n_eval,
        "checkpoint_s": ckpt_s,
        "peak_mem_gb": peak_memory_gb(device),
        "tokens_per_step": tokens_per_step(args),
        "done_at": time.time(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.measure", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--workdir", required=True, help="where timings.json and the test checkpoint go")
    parser.add_argument("--steps", type=int, default=3, help="timed steps at least (after the first)")
    parser.add_argument("--seconds", type=float, default=10.0, help="and about this long, up to 100 steps")
    parser.add_argument("--launched_at", type=float, default=None, help="time.time() when the launch began")
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir)
    try:
        try:
            result = run(opts.config, workdir, opts.steps, opts.seconds, opts.launched_at)
            if D.is_main():
                (workdir / "timings.json").write_text(json.dumps(result, indent=2) + "\n")
        finally:
            D.destroy()
    except (ValueError, OSError) as e:  # ConfigError is a ValueError: the user's to fix, one line
        if os.environ.get("RANK", "0") == "0":  # the group is gone: rank from the launcher
            print(f"error: {e}", file=sys.stderr)
            D.report_to_torchrun(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
