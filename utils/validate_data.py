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
total train tokens, epochs per source, packing filler, and an ETA whose assumption is printed. By
default the ETA scales the reference's measured 5720 tokens/s per H100 for Mistral 7B by active
parameter count; ``--measure`` instead runs a few real training steps of the configured model on
this machine (``finetune.build.build_model`` + ``finetune.trainer.train_step``) and uses the
measured tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs, load_train_args
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
    from finetune.data.tokenizer import load_tokenizer

    args = load_train_args(config)
    folder = Path(args.model_id_or_path)
    if not folder.is_dir():
        raise ConfigError(
            f"{config}: model_id_or_path '{folder}' is not a folder; the data is checked with the model's own "
            "tokenizer, so point it at the downloaded model (params.json + weights + tokenizer file)."
        )
    model_args = ModelArgs.from_folder(folder)
    from finetune.build import check_trainable_vocab

    check_trainable_vocab(model_args, str(folder))  # a v1 model: points at utils.extend_model_vocab
    return args, model_args, load_tokenizer(folder, model_args.vocab_size)


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


def create_corrected(args: TrainArgs, report: DataReport, instruct_tokenizer: Any) -> None:
    from finetune.data.dataset import eval_sources, train_sources

    bad_files = {e.path for e in report.errors}
    sources = train_sources(args.data)
    if args.data.eval_instruct_data.strip():
        sources += eval_sources(args.data)
    print()
    for source in sources:
        chunk = source.key == "data.instruct_data" and args.data.instruct.dynamic_chunk_fn_call
        for path in source.files:
            if str(path) not in bad_files:
                print(f"{path}: no errors, no corrected copy needed.")
                continue
            out = path.with_name(path.name + ".corrected")
            c = write_corrected(path, out, source.sample_type, instruct_tokenizer, chunk=chunk)
            fixed = f", {len(c.fixed)} repaired (lines {_lines(c.fixed)})" if c.fixed else ""
            print(
                f"{out}: {c.kept} line(s) kept{fixed}, {len(c.dropped)} left out "
                f"(lines {_lines([d.line for d in c.dropped])}). The original is unchanged."
            )


def _lines(numbers: list[int], n: int = 20) -> str:
    text = ", ".join(map(str, numbers[:n]))
    return text + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def filler_fraction(args: TrainArgs, instruct_tokenizer: Any, world_size: int) -> float:
    """Share of packed positions that are filler, over the first batches rank 0 would train on."""
    from finetune.data.loader import build_train_loader

    cache = Path(args.data.cache_dir) if args.data.cache_dir else None
    loader = build_train_loader(
        args.data,
        instruct_tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        rank=0,
        world_size=world_size,
        cache_dir=cache,
    )
    for _ in range(min(_FILLER_BATCHES, args.max_steps * args.num_microbatches)):
        next(loader)
    return loader.filler_fraction


def measure(args: TrainArgs, steps: int) -> dict[str, Any]:
    """Run ``steps`` real optimizer steps (after one warm-up step) of this config on this machine."""
    import torch

    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.data.loader import build_train_loader
    from finetune.data.tokenizer import load_tokenizer
    from finetune.monitoring import peak_memory_gb
    from finetune.trainer import TrainState, build_optimizer, train_step

    device = D.init_distributed()
    try:
        precision = resolve_precision(args.precision, device)
        model_args = ModelArgs.from_folder(args.model_id_or_path)
        tokenizer = load_tokenizer(args.model_id_or_path, model_args.vocab_size)
        cache = Path(args.data.cache_dir) if args.data.cache_dir else None
        loader = build_train_loader(
            args.data,
            tokenizer.instruct_tokenizer,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
            rank=0,
            world_size=1,
            cache_dir=cache,
        )
        model, _ = build_model(args, device, precision)
        optimizer = build_optimizer(model, args)  # the training optimizer, so memory is the same
        state = TrainState()
        model.train()
        elapsed = 0.0
        for i in range(steps + 1):
            batches = [next(loader) for _ in range(args.num_microbatches)]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            train_step(model, optimizer, batches, args, state, precision, device)  # .item() syncs
            if i > 0:  # the first step pays for allocation and kernel selection
                elapsed += time.perf_counter() - t0
        tokens = steps * args.batch_size * args.seq_len * args.num_microbatches
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        return {
            "device": name,
            "tokens_per_s": tokens / elapsed,
            "peak_mem_gb": peak_memory_gb(device),
            "steps": steps,
            "precision": precision.name,
        }
    finally:
        D.destroy()


def plan(
    args: TrainArgs,
    model_args: ModelArgs,
    report: DataReport,
    num_gpus: int,
    measured: dict[str, Any] | None,
    filler: float | None,
) -> dict[str, Any]:
    tokens_per_step = args.batch_size * args.seq_len * args.num_microbatches * num_gpus
    train_tokens = tokens_per_step * args.max_steps
    train_sources = [s for s in report.sources if s.key != "data.eval_instruct_data"]
    total_weight = sum(s.weight for s in train_sources) or 1.0
    epochs = {}
    for s in train_sources:
        share = train_tokens * s.weight / total_weight
        epochs[f"{s.key} {s.source}"] = share / max(1, s.tokens)
    if measured is not None:
        per_gpu = measured["tokens_per_s"]
        assumption = (
            f"{per_gpu:,.0f} tokens/s per device measured on this machine ({measured['device']}, "
            f"{measured['precision']}, {measured['steps']} steps) x {num_gpus} device(s), linear scaling"
        )
    else:
        per_gpu = _REF_TOKENS_PER_S * _REF_ACTIVE_PARAMS / active_params(model_args)
        assumption = (
            f"{num_gpus} x H100 at {per_gpu:,.0f} tokens/s each (the reference's 5720 tokens/s for "
            f"Mistral 7B scaled by active parameters, {active_params(model_args) / 1e9:.2f}B); "
            "use --measure to time this machine instead"
        )
    seconds = train_tokens / (per_gpu * num_gpus)
    return {
        "tokens_per_step": tokens_per_step,
        "train_tokens": train_tokens,
        "data_tokens": sum(s.tokens for s in train_sources),
        "data_target_tokens": sum(s.target_tokens for s in train_sources),
        "epochs_per_source": epochs,
        "packing_filler_fraction": filler,
        "eta_seconds": seconds,
        "eta": format_duration(seconds),
        "eta_assumption": assumption,
        "tokens_per_s_per_device": per_gpu,
        "measured": measured,
    }


def print_stats(report: DataReport, p: dict[str, Any], args: TrainArgs) -> None:
    print(
        "\nStatistics (samples after function-call chunking; tokens include BOS/EOS; targets = trained tokens):"
    )
    print(report.summary())
    train = [s for s in report.sources if s.key != "data.eval_instruct_data"]
    if len(train) > 1:
        print(
            f"{'total (training sources)':<40} {sum(s.lines for s in train):>9} {0:>7} "
            f"{sum(s.samples for s in train):>9} {sum(s.tokens for s in train):>12} "
            f"{sum(s.target_tokens for s in train):>12} {sum(s.too_long for s in train):>8}"
        )
    print(f"\nTraining plan ({args.max_steps} steps):")
    print(
        f"  tokens per optimizer step   {p['tokens_per_step']:,} (batch_size {args.batch_size} x seq_len "
        f"{args.seq_len} x num_microbatches {args.num_microbatches} x devices)"
    )
    print(f"  total train tokens          {p['train_tokens']:,}")
    print(f"  data tokens (targets)       {p['data_tokens']:,} ({p['data_target_tokens']:,})")
    for name, e in p["epochs_per_source"].items():
        print(f"  epochs of {name:<40.40} {e:.2f}")
    if p["packing_filler_fraction"] is not None:
        print(f"  packing filler              {p['packing_filler_fraction']:.2%} of positions")
    if p["measured"]:
        print(f"  measured peak memory        {p['measured']['peak_mem_gb']:.2f} GB per device")
    print(f"  ETA                         {p['eta']} assuming {p['eta_assumption']}")


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
    parser.add_argument("--measure_steps", type=int, default=3)
    parser.add_argument(
        "--num_gpus",
        type=int,
        default=None,
        help="devices the training will use (default: this machine's GPUs, else 8)",
    )
    parser.add_argument("--max_errors", type=int, default=50, help="errors listed per kind (0: all)")
    parser.add_argument(
        "--stats_json", default=None, help="also write the report and statistics to this file"
    )
    opts = parser.parse_args(argv)
    try:
        args, model_args, tokenizer = load_inputs(opts.train_yaml)
        t0 = time.perf_counter()
        cache = Path(args.data.cache_dir) if args.data.cache_dir else None
        report = check_data(
            args.data,
            tokenizer.instruct_tokenizer,
            args.seq_len,
            cache_dir=cache,
            include_eval=bool(args.data.eval_instruct_data.strip()),
        )
        elapsed = time.perf_counter() - t0
    except (ConfigError, ValueError, FileNotFoundError) as e:
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
        create_corrected(args, report, tokenizer.instruct_tokenizer)

    p = None
    if report.ok:
        import torch

        num_gpus = opts.num_gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 8)
        try:
            measured = measure(args, opts.measure_steps) if opts.measure else None
            filler = filler_fraction(args, tokenizer.instruct_tokenizer, num_gpus)
        except (ConfigError, ValueError) as e:  # e.g. a source whose samples have no trained token
            print(f"error: {e}", file=sys.stderr)
            return 1
        p = plan(args, model_args, report, num_gpus, measured, filler)
        print_stats(report, p, args)
        print("\nNo errors: the data is ready for training.")
    else:
        fix = (
            "point the config at the .corrected files, or fix the originals."
            if opts.create_corrected
            else "fix them, or run again with --create_corrected and point the config at the .corrected files."
        )
        print(f"\n{len(report.errors)} invalid line(s): training would refuse to start. To go on, {fix}")
        if any(e.kind == "last_role" for e in report.errors):
            print("Chat exports that end on a user turn (e.g. UltraChat): python -m utils.reformat_data FILE")
    if opts.stats_json:
        Path(opts.stats_json).write_text(json.dumps({**report.to_dict(), "plan": p}, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
