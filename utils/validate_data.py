"""Check training data before training, with exactly the rules training applies.

    python -m utils.validate_data --train_yaml CONFIG.yaml [--create_corrected] [--measure]
        [--num_gpus N] [--stats_json FILE] [--max_errors 50]

Every line of every train and eval source is checked by ``finetune.data.validation.check_data``,
the same scan ``train.py`` runs first (and it fills the same token cache, so training does not
tokenize again). Exit status: 0 when every line is valid, 1 when some line is not, 2 for a bad
config or command line.

Errors are grouped by kind, each with file, line, what is wrong and how to fix it; a one-line
summary follows per source. ``--create_corrected`` writes ``<file>.corrected`` next to each file
that has errors: the valid lines byte for byte (tool-call arguments given as JSON objects are
re-encoded as strings), invalid lines left out and listed. Originals are never modified.

Statistics per source and in total, and the training plan of the config: tokens per optimizer step,
total train tokens, epochs per source, packing filler, and an ETA whose assumption is printed.
``--measure`` gives the ETA to rely on: it launches a short real run of the config on this machine
(``utils/measure.py`` under ``torch.distributed.run``, as many processes as the training will use)
and adds up what the run will spend: startup, the first step, the remaining steps, evaluations and
checkpoint saves. Without it, on a machine with GPUs (or with ``--num_gpus``), the ETA scales the
reference's measured 5720 tokens/s per H100 for Mistral 7B by active parameter count and counts
the optimizer steps only; on a machine without a GPU no ETA is guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs, load_train_args
from finetune.build import check_pictures
from finetune.config import ConfigError
from finetune.data.validation import DataReport, check_data, write_corrected
from finetune.monitoring import format_duration
from model.args import ModelArgs

# Reference throughput (mistral-finetune's measurement): Mistral 7B, one H100, seq_len 32768.
_REF_TOKENS_PER_S = 5720.0
_REF_ACTIVE_PARAMS = 7.24e9
_FILLER_BATCHES = 200  # batches drawn to measure the packing filler


def active_params(m: ModelArgs) -> int:
    """Parameters used per token (MoE: only the routed experts), embeddings included."""
    attn = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    ffn = 3 * m.dim * m.hidden_dim * (m.moe.num_experts_per_tok if m.moe else 1)
    return m.n_layers * (attn + ffn) + 2 * m.vocab_size * m.dim


def load_inputs(config: str) -> tuple[TrainArgs, ModelArgs, Any]:
    """The config, the model's params and its tokenizer, read as train.py reads them."""
    from finetune.trainer import read_model_folder

    args = load_train_args(config)
    return args, *read_model_folder(args)


def print_errors(report: DataReport, max_errors: int) -> None:
    by_kind: dict[str, list] = defaultdict(list)
    for e in report.errors:
        by_kind[e.kind].append(e)
    print(f"\n{len(report.errors)} invalid line(s), by kind of error:")
    for kind, errors in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        print(f"\n[{kind}] {len(errors)} line(s)")
        shown = errors if max_errors <= 0 else errors[:max_errors]
        for e in shown:
            print(f"  {e.path}:{e.line}: {e.message}")
        if len(shown) < len(errors):
            print(f"  ... and {len(errors) - len(shown)} more (--max_errors 0 lists all)")


def print_sources(report: DataReport) -> None:
    print("\nSources:")
    for s in report.sources:
        verdict = "ok" if s.invalid == 0 else f"{s.invalid} INVALID"
        print(f"  {s.key} {s.source}: {s.files} file(s), {s.lines} lines, {s.valid} valid, {verdict}")


def create_corrected(report: DataReport, instruct_tokenizer: Any) -> None:
    bad_files = {e.path for e in report.errors}
    print()
    for data in report.train + report.eval:
        for f in data.files:
            if str(f.path) not in bad_files:
                print(f"{f.path}: no errors, no corrected copy needed.")
                continue
            out = f.path.with_name(f.path.name + ".corrected")
            c = write_corrected(f.path, out, data.source.sample_type, instruct_tokenizer, chunk=f.chunk)
            fixed = f", {len(c.fixed)} repaired (lines {_lines(c.fixed)})" if c.fixed else ""
            print(
                f"{out}: {c.kept} line(s) kept{fixed}, {len(c.dropped)} left out "
                f"(lines {_lines([d.line for d in c.dropped])}). The original is unchanged."
            )


def _lines(numbers: list[int], n: int = 20) -> str:
    text = ", ".join(map(str, numbers[:n]))
    return text + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def filler_fraction(args: TrainArgs, report: DataReport, world_size: int) -> float:
    """Share of packed positions that are filler, over the first batches rank 0 would train on."""
    from finetune.data.loader import build_train_loader

    loader = build_train_loader(report.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                rank=0, world_size=world_size, long_sample_policy=args.data.long_sample_policy)
    for _ in range(min(_FILLER_BATCHES, args.max_steps * args.num_microbatches)):
        next(loader)
    return loader.filler_fraction


def measure(config: str, processes: int, steps: int) -> dict[str, Any]:
    """Time a short real run of ``config`` on ``processes`` processes (``utils/measure.py``)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="validate_data_measure_") as tmp:
        launched_at = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "utils.measure", config, "--workdir", tmp, "--steps", str(steps),
               "--launched_at", repr(launched_at)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ended_at = time.time()
        out = Path(tmp) / "timings.json"
        if proc.returncode != 0 or not out.is_file():
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            detail = errors[0] if errors else "\n" + "\n".join(lines[-15:])
            raise ValueError(f"--measure: the timed run failed: {detail}")
        result = json.loads(out.read_text())
    result["exit_s"] = ended_at - result.pop("done_at")  # leaving the process group, interpreter exit
    return result


def _count(max_steps: int, freq: int) -> int:
    """Evaluations or checkpoints in a run: every ``freq`` steps (0: never) and at the last step."""
    return (max_steps // freq if freq > 0 else 0) + (0 if freq > 0 and max_steps % freq == 0 else 1)


def measured_eta(args: TrainArgs, m: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Seconds from launch to exit of ``train.py`` with this config, from a measured short run."""
    n_evals = 0 if args.no_eval or not m["eval_batches"] else _count(args.max_steps, args.eval_freq)
    n_ckpts = 0 if args.no_ckpt else _count(args.max_steps, args.ckpt_freq)
    parts = {
        "startup": m["startup_s"],
        "first step": m["first_step_s"],
        f"{args.max_steps - 1} more steps": (args.max_steps - 1) * m["step_s"],
        f"{n_evals} evaluation(s)": n_evals * m["eval_s"],
        f"{n_ckpts} checkpoint(s)": n_ckpts * m["checkpoint_s"],
        "exit": m["exit_s"],
    }
    return sum(parts.values()), parts


def plan(
    args: TrainArgs,
    model_args: ModelArgs,
    report: DataReport,
    devices: int,
    on_gpu: bool,
    measured: dict[str, Any] | None,
    filler: float | None,
) -> dict[str, Any]:
    """The training plan on ``devices`` processes (GPUs, or CPU processes when ``on_gpu`` is false)."""
    tokens_per_step = args.batch_size * args.seq_len * args.num_microbatches * devices
    train_tokens = tokens_per_step * args.max_steps
    train_sources = [s for s in report.sources if s.key != "data.eval_instruct_data"]
    total_weight = sum(s.weight for s in train_sources) or 1.0
    epochs = {}
    for s in train_sources:
        share = train_tokens * s.weight / total_weight
        epochs[f"{s.key} {s.source}"] = share / max(1, s.tokens)
    parts: dict[str, float] = {}
    per_device = None
    if measured is not None:
        seconds, parts = measured_eta(args, measured)
        per_device = measured["tokens_per_step"] / measured["processes"] / measured["step_s"]
        n = measured["processes"]
        assumption = (
            f"from a short real run on this machine: {n} {measured['device']} process{'es' if n > 1 else ''} x "
            f"{measured['threads']} thread(s), "
            f"{measured['precision']}, {measured['steps']} timed steps of {measured['step_s']:.2f} s"
            + (f", the step time of {n} GPU(s) assumed for {devices}" if n != devices else "")
        )
    elif on_gpu:
        per_device = _REF_TOKENS_PER_S * _REF_ACTIVE_PARAMS / active_params(model_args)
        seconds = train_tokens / (per_device * devices)
        assumption = (
            f"assuming {devices} x H100 at {per_device:,.0f} tokens/s each (the reference's 5720 tokens/s for "
            f"Mistral 7B scaled by active parameters, {active_params(model_args) / 1e9:.2f}B); optimizer "
            "steps only, no startup, evaluation or checkpoints: --measure times a real run instead"
        )
    else:
        seconds = None
        assumption = (
            "no GPU on this machine: --measure times a short real run of this config here (the ETA to "
            "rely on), --num_gpus N estimates N x H100 from the reference's throughput"
        )
    return {
        "devices": devices,
        "device_kind": "GPU" if on_gpu else "CPU process",
        "tokens_per_step": tokens_per_step,
        "train_tokens": train_tokens,
        "data_tokens": sum(s.tokens for s in train_sources),
        "data_target_tokens": sum(s.target_tokens for s in train_sources),
        "epochs_per_source": epochs,
        "packing_filler_fraction": filler,
        "eta_seconds": seconds,
        "eta": _eta_text(seconds),
        "eta_parts": parts,
        "eta_assumption": assumption,
        "tokens_per_s_per_device": per_device,
        "measured": measured,
    }


def _eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    return format_duration(seconds) if seconds >= 1 else "under a second"


def _source_table(report: DataReport) -> str:
    """Per-source statistics, names in full (paths are what the user needs to recognise)."""
    rows = [(f"{s.key} {s.source}", s.lines, s.invalid, s.samples, s.tokens, s.target_tokens, s.too_long)
            for s in report.sources]
    train = [s for s in report.sources if s.key != "data.eval_instruct_data"]
    if len(train) > 1:
        rows.append(("total (training sources)", sum(s.lines for s in train), 0, sum(s.samples for s in train),
                     sum(s.tokens for s in train), sum(s.target_tokens for s in train),
                     sum(s.too_long for s in train)))
    w = max(len("source"), *(len(r[0]) for r in rows))
    lines = [f"{'source':<{w}} {'lines':>9} {'invalid':>7} {'samples':>9} {'tokens':>12} {'targets':>12} {'>seq_len':>8}"]
    lines += [f"{r[0]:<{w}} {r[1]:>9} {r[2]:>7} {r[3]:>9} {r[4]:>12} {r[5]:>12} {r[6]:>8}" for r in rows]
    if any(s.images for s in report.sources):
        lines.append("\nPictures (image tokens are part of tokens above, never targets):")
        lines += [
            f"  {s.key} {s.source}: {s.images:,} picture(s), {s.image_tokens:,} image tokens"
            + (f" ({s.image_tokens / s.tokens:.1%} of tokens, {s.image_tokens / s.images:,.0f} per picture)"
               if s.images else "")
            for s in report.sources
        ]
    return "\n".join(lines)


def print_stats(report: DataReport, p: dict[str, Any], args: TrainArgs) -> None:
    print(
        "\nStatistics (samples after function-call chunking; tokens include BOS/EOS; targets = trained tokens):"
    )
    print(_source_table(report))
    print(f"\nTraining plan ({args.max_steps} steps):")
    print(
        f"  tokens per optimizer step   {p['tokens_per_step']:,} (batch_size {args.batch_size} x seq_len "
        f"{args.seq_len} x num_microbatches {args.num_microbatches} x {p['devices']} {p['device_kind']}"
        f"{'s' if p['devices'] != 1 else ''})"
    )
    print(f"  total train tokens          {p['train_tokens']:,}")
    print(f"  data tokens (targets)       {p['data_tokens']:,} ({p['data_target_tokens']:,})")
    print("  epochs per source:")
    for name, e in p["epochs_per_source"].items():
        print(f"    {e:8.2f}  {name}")
    if p["packing_filler_fraction"] is not None:
        print(f"  packing filler              {p['packing_filler_fraction']:.2%} of positions")
    if p["measured"]:
        print(f"  measured peak memory        {p['measured']['peak_mem_gb']:.2f} GB per process")
    print(f"  ETA                         {p['eta']}{' ' if p['eta_seconds'] is not None else ': '}{p['eta_assumption']}")
    if p["eta_parts"]:
        print("    " + ", ".join(f"{k} {v:.1f} s" for k, v in p["eta_parts"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.validate_data", description=__doc__.split("\n")[0])
    parser.add_argument("--train_yaml", required=True, help="the training config")
    parser.add_argument(
        "--create_corrected",
        action="store_true",
        help="write <file>.corrected with only the valid lines next to each file with errors",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="time a few real training steps of this config on this machine for the ETA",
    )
    parser.add_argument("--measure_steps", type=int, default=3, help="timed steps at least (and about 10 s)")
    parser.add_argument(
        "--num_gpus",
        type=int,
        default=None,
        help="processes the training will use: GPUs, or CPU processes on a machine without GPU "
        "(default: this machine's GPUs, else one CPU process)",
    )
    parser.add_argument("--max_errors", type=int, default=50, help="errors listed per kind (0: all)")
    parser.add_argument(
        "--stats_json", default=None, help="also write the report and statistics to this file"
    )
    opts = parser.parse_args(argv)
    try:
        args, model_args, tokenizer = load_inputs(opts.train_yaml)
        t0 = time.perf_counter()
        report = check_data(args.data, tokenizer.instruct_tokenizer, args.seq_len)
        elapsed = time.perf_counter() - t0
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_lines = sum(s.lines for s in report.sources)
    print(
        f"Checked {n_lines:,} lines in {elapsed:.1f} s with {type(tokenizer.instruct_tokenizer).__name__} "
        f"({Path(str(tokenizer.instruct_tokenizer.tokenizer.file_path)).name})."
    )
    if report.errors:
        print_errors(report, opts.max_errors)
    print_sources(report)
    if opts.create_corrected:
        try:
            create_corrected(report, tokenizer.instruct_tokenizer)
        except OSError as e:
            print(f"error: cannot write the corrected copy {e.filename}: {e.strerror}. --create_corrected writes "
                  "FILE.corrected next to each file: copy the data to a folder you can write to and run on the copy.",
                  file=sys.stderr)
            return 2

    p = None
    if report.ok:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = opts.num_gpus or gpus or 1
        # Without a GPU, --num_gpus N plans for N H100s, unless --measure: then N CPU processes here.
        on_gpu = gpus > 0 or (opts.num_gpus is not None and not opts.measure)
        try:
            check_pictures(args, model_args, tokenizer, any(d.has_images for d in report.train + report.eval))
            filler = filler_fraction(args, report, devices)
            measured = measure(opts.train_yaml, min(devices, gpus) if gpus else devices, opts.measure_steps) \
                if opts.measure else None
        except (ConfigError, ValueError) as e:  # e.g. a source whose samples have no trained token
            print(f"error: {e}", file=sys.stderr)
            return 1
        p = plan(args, model_args, report, devices, on_gpu, measured, filler)
        print_stats(report, p, args)
        print("\nNo errors: the data is ready for training.")
    else:
        fix = (
            "point the config at the .corrected files, or fix the originals."
            if opts.create_corrected
            else "fix them, or run again with --create_corrected and point the config at the .corrected files."
        )
        print(f"\n{len(report.errors)} invalid line(s): training would refuse to start. To go on, {fix}")
        if any("utils.reformat_data" in e.message for e in report.errors):
            print("Some of these lines are in a format python -m utils.reformat_data FILE converts (see the "
                  "messages above).")
    if opts.stats_json:
        Path(opts.stats_json).write_text(json.dumps({**report.to_dict(), "plan": p}, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
