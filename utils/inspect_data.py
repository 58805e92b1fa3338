"""Show training samples as the model sees them: tokens, with the trained ones highlighted.

    python -m utils.inspect_data --train_yaml CONFIG.yaml [-n 3] [--source 0] [--json] [--eval]

Samples are encoded exactly as training encodes them (``finetune.data.tokenize.encode_all``, the
model's own tokenizer, function-call chunking as configured). On a terminal the trained tokens
(the loss targets) are green and the others dim; otherwise trained spans are wrapped in «...»,
so the output can be pasted or diffed. ``--json`` prints one object per sample with token ids,
pieces and the target mask. Reasoning traces show as ``[THINK]...[/THINK]``; the header counts
the trained tokens inside them (``n_thinking`` in JSON).

Each picture's run of ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` tokens is shown as one marker where it
sits, with the counts read from the tokens themselves (``--json`` lists the runs under ``images``):

    [image 1: 32x48 px -> 3 rows x 2 = 6 [IMG] + 2 [IMG_BREAK] + [IMG_END], 9 tokens]

(the size is the picture's after the encoder resized it; the grid is of tokens, so with a spatial merge
of 2 each [IMG] stands for 2x2 patches).
Image tokens are never trained, so a marker is never inside «...»; if one is, the marker says how many
of its tokens are targets.
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
from finetune.data.images import image_spans
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


def image_runs(tokens: list[int], instruct_tokenizer: Any) -> list[tuple[int, int]]:
    """``[start, end)`` of each picture's tokens, as the loader finds them (none for a text-only tokenizer)."""
    encoder = getattr(instruct_tokenizer, "image_encoder", None)
    if encoder is None:
        return []
    return [(int(a), int(b)) for a, b in image_spans(tokens, encoder.special_ids)]


def describe_image(tokens: list[int], masks: list[bool], instruct_tokenizer: Any, image: Any) -> dict:
    """What a picture's token run holds, counted from the tokens: the grid of [IMG] rows (each row but
    the last closed by [IMG_BREAK], the last by [IMG_END]) and the picture's size as the encoder
    resized it (``image``: (C, H, W), or None)."""
    ids = instruct_tokenizer.image_encoder.special_ids
    rows, row = [], 0
    for t in tokens:
        if t == ids.img:
            row += 1
        else:
            rows.append(row)
            row = 0
    if row:
        rows.append(row)  # no closing token
    out = {
        "n_tokens": len(tokens),
        "n_img": tokens.count(ids.img),
        "n_img_break": tokens.count(ids.img_break),
        "n_img_end": tokens.count(ids.img_end),
        "rows": len(rows),
        "cols": rows[0] if rows and len(set(rows)) == 1 else None,  # None: not a rectangle
        "n_trained": sum(masks),
    }
    if image is not None:
        out["height"], out["width"] = int(image.shape[-2]), int(image.shape[-1])
    return out


def image_marker(k: int, d: dict) -> str:
    """``[image 1: 32x48 px -> 3 rows x 2 = 6 [IMG] + 2 [IMG_BREAK] + [IMG_END], 9 tokens]``."""
    size = f"{d['width']}x{d['height']} px -> " if "width" in d else ""
    rows = f"{d['rows']} row{'s' if d['rows'] != 1 else ''}"
    grid = f"{rows} x {d['cols']}" if d["cols"] is not None else f"{rows}, uneven"
    end = "[IMG_END]" if d["n_img_end"] == 1 else f"{d['n_img_end']} [IMG_END]"
    trained = f", {d['n_trained']} TRAINED" if d["n_trained"] else ""
    return (
        f"[image {k}: {size}{grid} = {d['n_img']} [IMG] + {d['n_img_break']} [IMG_BREAK] + {end}, "
        f"{d['n_tokens']} tokens{trained}]"
    )


def collapse_images(
    pieces: list[str], masks: list[bool], runs: list[tuple[int, int]], markers: list[str]
) -> tuple[list[str], list[bool]]:
    """The pieces with each image run replaced by its marker (trained if any of its tokens is)."""
    out_pieces, out_masks, i = [], [], 0
    for (start, end), marker in zip(runs, markers, strict=True):
        out_pieces += pieces[i:start] + [marker]
        out_masks += masks[i:start] + [any(masks[start:end])]
        i = end
    return out_pieces + pieces[i:], out_masks + masks[i:]


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
            runs = image_runs(sample.tokens, it)
            pictures = list(sample.images) if len(sample.images) == len(runs) else [None] * len(runs)
            images = [
                {"start": a, "end": b, **describe_image(sample.tokens[a:b], sample.masks[a:b], it, im)}
                for (a, b), im in zip(runs, pictures, strict=True)
            ]
            n_image_tokens = sum(d["n_tokens"] for d in images)
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
                            "images": images,
                            "n_image_tokens": n_image_tokens,
                        },
                        ensure_ascii=False,
                    )
                )
                continue
            suffix = f" (chunk {k})" if k else ""
            thinking = f" ({n_thinking} in [THINK])" if n_thinking else ""
            pics = f", {len(images)} image(s) ({n_image_tokens} image tokens)" if images else ""
            print(
                f"--- {s.key} {path}:{n}{suffix}: {len(sample.tokens)} tokens, {n_trained} trained{thinking}{pics}"
            )
            markers = [image_marker(k, d) for k, d in enumerate(images, start=1)]
            print(render(*collapse_images(pieces, sample.masks, runs, markers), color))
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
