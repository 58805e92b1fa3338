"""Split a JSONL file into reproducible train / eval / test files, lines copied byte for byte.

    python -m utils.split_data FILE [--eval 0.1] [--test 0.1] [--seed 0] [--output_dir DIR]

Writes ``FILE.train.jsonl``, ``FILE.eval.jsonl`` and (when ``--test`` > 0) ``FILE.test.jsonl``
(``FILE`` without its suffix), each keeping the original order of its lines. Which line goes where
depends only on the seed and the number of lines. The eval file plugs straight into
``data.eval_instruct_data``; keep the test file out of training and model selection.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def split_indices(n: int, eval_share: float, test_share: float, seed: int) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval, n_test = round(n * eval_share), round(n * test_share)
    parts = {
        "eval": order[:n_eval],
        "test": order[n_eval : n_eval + n_test],
        "train": order[n_eval + n_test :],
    }
    return {k: sorted(v) for k, v in parts.items()}


def relative_pictures(lines: list[bytes]) -> int:
    """Lines with a picture given by a relative path: it resolves from the JSONL file's folder, so a
    copy of the line in another folder no longer finds it."""
    count = 0
    for raw in lines:
        if b'"image' not in raw:
            continue
        try:
            messages = json.loads(raw).get("messages") or []
        except (ValueError, AttributeError):
            continue  # validate_data reports it
        refs = [
            chunk.get(chunk.get("type")) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
            for chunk in m["content"] if isinstance(chunk, dict) and chunk.get("type") in ("image_url", "image")
        ]
        refs = [r.get("url") if isinstance(r, dict) else r for r in refs]
        count += any(
            isinstance(r, str) and not r.startswith(("data:", "http://", "https://"))
            and not Path(r.removeprefix("file://")).expanduser().is_absolute() and len(r) < 4096
            for r in refs
        )
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.split_data", description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--eval", type=float, default=0.1, help="share of lines for evaluation")
    parser.add_argument("--test", type=float, default=0.1, help="share of lines held out for the final test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default: next to FILE")
    opts = parser.parse_args(argv)
    path = Path(opts.file)
    if not path.is_file():
        print(f"error: {path} is not a file.", file=sys.stderr)
        return 1
    if opts.eval < 0 or opts.test < 0 or opts.eval + opts.test >= 1:
        print(
            f"error: --eval {opts.eval} and --test {opts.test} must be >= 0 and sum to less than 1.",
            file=sys.stderr,
        )
        return 1
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    lines = [line if line.endswith(b"\n") else line + b"\n" for line in lines]
    parts = split_indices(len(lines), opts.eval, opts.test, opts.seed)
    folder = Path(opts.output_dir) if opts.output_dir else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    moved = folder.resolve() != path.parent.resolve()
    n_relative = relative_pictures(lines) if moved else 0
    if n_relative:
        print(
            f"warning: {n_relative} line(s) name pictures by paths relative to {path.parent}, which training "
            f"resolves from the folder of the JSONL file that holds them: copy the pictures to {folder} too "
            "(keeping their relative paths), or leave out --output_dir.",
            file=sys.stderr,
        )
    for name in ("train", "eval", "test"):
        if name == "test" and opts.test == 0:
            continue
        out = folder / f"{path.stem}.{name}.jsonl"
        out.write_bytes(b"".join(lines[i] for i in parts[name]))
        print(f"{out}: {len(parts[name])} line(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
