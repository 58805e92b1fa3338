"""Show training samples as the model sees them: tokens, with the trained ones highlighted.

    python -m utils.inspect_data --train_yaml CONFIG.yaml [-n 3] [--source 0] [--json] [--eval]

Samples are encoded exactly as training encodes them (``finetune.data.tokenize.encode_all``, the
model's own tokenizer, function-call chunking as configured). On a terminal the trained tokens
(the loss targets) are green and the others dim; otherwise trained spans are wrapped in «...»,
so the output can be pasted or diffed. ``--json`` prints one object per sample with token ids,
pieces and the target mask. Reasoning traces show as ``[THINK]...[/THINK]``; the header counts
the trained tokens inside them (``n_thinking`` in JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs
from finetune.config import ConfigError
from finetune.data.cache import decode_line
from finetune.data.errors import DataFormatError
from finetune.data.tokenize import encode_all

_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def piece(tokenizer: Any, token: int) -> str:
    text = tokenizer.id_to_piece(token)
    return text.replace("▁", " ") if isinstance(text, str) else str(text)


def render(pieces: list[str], trained: list[bool], color: bool) -> str:
    out, inside = [], False
    for text, t in zip(pieces, trained, strict=True):
        if color:
            out.append((_GREEN if t else _DIM) + text + _RESET)
            continue
        if t and not inside:
            out.append("«")
        elif not t and inside:
            out.append("»")
        inside = t
        out.append(text)
    if inside and not color:
        out.append("»")
    return "".join(out)


def thinking_tokens(tokens: list[int], masks: list[bool], instruct_tokenizer: Any) -> int:
    """Trained tokens from [THINK] to [/THINK] (or the EOS of an unclosed one), both included."""
    begin, end = getattr(instruct_tokenizer, "BEGIN_THINK", None), getattr(instruct_tokenizer, "END_THINK", None)
    if begin is None:
        return 0
    count, inside = 0, False
    for t, m in zip(tokens, masks, strict=True):
        inside = inside or t == begin
        count += inside and m
        if t in (end, instruct_tokenizer.tokenizer.eos_id):
            inside = False
    return count


def iter_samples(
    args: TrainArgs, instruct_tokenizer: Any, use_eval: bool, source_index: int | None
) -> Iterator[tuple]:
    """(source, path, line, sample index within the line, TokenSample | DataFormatError)."""
    from finetune.data.dataset import eval_sources, train_sources

    sources = eval_sources(args.data) if use_eval else train_sources(args.data)
    if source_index is not None:
        if not 0 <= source_index < len(sources):
            raise ConfigError(f"--source {source_index}: the config has {len(sources)} source(s) (0-based).")
        sources = [sources[source_index]]
    for s in sources:
        chunk = not use_eval and s.key == "data.instruct_data" and args.data.instruct.dynamic_chunk_fn_call
        for path in s.files:
            with open(path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    try:
                        samples = encode_all(  # relative image paths start at the JSONL file's folder
                            decode_line(raw.rstrip(b"\n"), n), instruct_tokenizer, s.sample_type, chunk,
                            Path(path).parent,
                        )
                    except DataFormatError as e:
                        yield s, path, n, 0, e
                        continue
                    for k, sample in enumerate(samples):
                        yield s, path, n, k, sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.inspect_data", description=__doc__.split("\n")[0])
    parser.add_argument("--train_yaml", required=True)
    parser.add_argument("-n", type=int, default=3, help="samples to show")
    parser.add_argument(
        "--source", type=int, default=None, help="only this source (0-based, in config order)"
    )
    parser.add_argument("--eval", action="store_true", help="show data.eval_instruct_data instead")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    opts = parser.parse_args(argv)
    from utils.validate_data import load_inputs

    try:
        args, _, tokenizer = load_inputs(opts.train_yaml)
        it = tokenizer.instruct_tokenizer
        color = opts.color == "always" or (opts.color == "auto" and sys.stdout.isatty())
        shown = 0
        for s, path, n, k, sample in iter_samples(args, it, opts.eval, opts.source):
            if shown >= opts.n:
                break
            shown += 1
            where = {"source": s.key, "path": str(path), "line": n, "sample": k}
            if isinstance(sample, DataFormatError):
                print(
                    json.dumps({**where, "error": sample.kind, "message": sample.message})
                    if opts.json
                    else f"{path}:{n}: invalid ({sample.kind}): {sample.message}"
                )
                continue
            pieces = [piece(it.tokenizer, t) for t in sample.tokens]
            n_trained = sum(sample.masks)
            n_thinking = thinking_tokens(sample.tokens, sample.masks, it)
            if opts.json:
                print(
                    json.dumps(
                        {
                            **where,
                            "tokens": sample.tokens,
                            "pieces": pieces,
                            "trained": sample.masks,
                            "n_tokens": len(sample.tokens),
                            "n_trained": n_trained,
                            "n_thinking": n_thinking,
                        },
                        ensure_ascii=False,
                    )
                )
                continue
            suffix = f" (chunk {k})" if k else ""
            thinking = f" ({n_thinking} in [THINK])" if n_thinking else ""
            print(f"--- {s.key} {path}:{n}{suffix}: {len(sample.tokens)} tokens, {n_trained} trained{thinking}")
            print(render(pieces, sample.masks, color))
        if shown and not opts.json:
            legend = (
                "green = trained (loss targets), dim = context" if color else "«...» = trained (loss targets)"
            )
            print(f"--- {legend}")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
