"""Checking data files: the one scan shared by training and ``python -m utils.validate_data``.

Scanning a file *is* tokenizing it into the cache (``finetune.data.cache``), so the rules applied here
are exactly the rules training applies, and a file checked once is not tokenized again. The report
holds the opened sources: the loaders are built from them (or from their manifest, on other ranks)
and never read the data files themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.args import DataArgs
from finetune.data.cache import LineError, TokenizerPool, decode_line
from finetune.data.dataset import SourceData, eval_sources, to_manifest, tokenize_sources, train_sources
from finetune.data.errors import DataFormatError
from finetune.data.tokenize import SampleType, check_instruct_version, encode_all

MAX_LISTED_ERRORS = 10


@dataclass
class SourceStats:
    key: str  # YAML key, e.g. "data.instruct_data"
    source: str  # the entry as written
    sample_type: str
    weight: float
    files: int
    lines: int
    valid: int
    invalid: int
    samples: int  # after function-call chunking
    tokens: int
    target_tokens: int
    too_long: int  # samples with more than seq_len positions (len(tokens) - 1 > seq_len)
    no_targets: int  # samples with no trained token (e.g. every assistant turn has weight 0)
    images: int = 0  # pictures in the samples (after chunking: a prefix repeats its pictures)
    image_tokens: int = 0  # their [IMG], [IMG_BREAK] and [IMG_END] tokens, part of ``tokens``

    @classmethod
    def of(cls, data: SourceData, seq_len: int) -> SourceStats:
        s = data.source
        invalid = sum(len(f.errors) for f in data.files)
        return cls(
            key=s.key,
            source=s.spec,
            sample_type=s.sample_type.value,
            weight=s.weight,
            files=len(data.files),
            lines=sum(f.n_lines for f in data.files),
            valid=sum(f.n_valid for f in data.files),
            invalid=invalid,
            samples=len(data),
            tokens=int(data.positions.sum()) + len(data),
            target_tokens=int(data.targets.sum()),
            too_long=int((data.positions > seq_len).sum()),
            no_targets=int((data.targets == 0).sum()),
            images=sum(len(f.image_spans) for f in data.files if f.has_images),
            image_tokens=sum(int(np.diff(f.image_spans).sum()) for f in data.files if f.has_images),
        )


@dataclass
class DataReport:
    seq_len: int
    sources: list[SourceStats] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    # The scanned sources, opened from the cache: what the loaders are built from.
    train: list[SourceData] = field(default_factory=list, repr=False)
    eval: list[SourceData] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [
            f"{'source':<40} {'lines':>9} {'invalid':>7} {'samples':>9} {'tokens':>12} {'targets':>12} {'>seq_len':>8}"
        ]
        for s in self.sources:
            lines.append(
                f"{s.key + ' ' + s.source:<40.40} {s.lines:>9} {s.invalid:>7} {s.samples:>9} {s.tokens:>12} "
                f"{s.target_tokens:>12} {s.too_long:>8}"
            )
        return "\n".join(lines)

    def raise_if_invalid(self, config_path: str | Path) -> None:
        """Refuse to train on invalid data, listing the first errors and the command that fixes them."""
        if self.ok:
            return
        shown = "\n".join(f"  {e}" for e in self.errors[:MAX_LISTED_ERRORS])
        more = len(self.errors) - MAX_LISTED_ERRORS
        raise DataFormatError(
            "invalid_data",
            f"{len(self.errors)} invalid line(s) in the training data; nothing was trained:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix these lines, or write corrected copies (invalid lines left out, each one listed) with:\n"
            f"  python -m utils.validate_data --train_yaml {config_path} --create_corrected",
        )

    def manifest(self) -> dict[str, Any]:
        """JSON from which another process opens the same sources (``open_manifest``)."""
        return {"train": to_manifest(self.train), "eval": to_manifest(self.eval)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "sources": [vars(s) for s in self.sources],
            "errors": [vars(e) for e in self.errors],
        }


def check_data(args: DataArgs, instruct_tokenizer: Any, seq_len: int, *, include_eval: bool = True) -> DataReport:
    """Scan every training (and eval) file line by line into the cache (``args.cache_path``)."""
    train, evals = train_sources(args), eval_sources(args) if include_eval else []
    if any(s.sample_type is SampleType.INSTRUCT for s in train + evals):
        check_instruct_version(instruct_tokenizer)  # once, not once per line
    pool = TokenizerPool(instruct_tokenizer)
    report = DataReport(seq_len)
    try:
        report.train = tokenize_sources(train, instruct_tokenizer,
                                        chunk_instruct=args.instruct.dynamic_chunk_fn_call, args=args, pool=pool)
        if evals:
            report.eval = tokenize_sources(evals, instruct_tokenizer, chunk_instruct=False,
                                           args=args, pool=pool)
    finally:
        pool.close()
    for data in report.train + report.eval:
        report.sources.append(SourceStats.of(data, seq_len))
        report.errors += data.errors
    return report


# ------------------------------------------------------------------------------------------ correction


def _autofix(obj: Any) -> Any:
    """Safe, meaning-preserving repairs: tool-call arguments given as an object become a JSON string."""
    if isinstance(obj, dict):
        for key in ("messages", "interactions"):
            msgs = obj.get(key)
            for msg in msgs if isinstance(msgs, list) else []:
                calls = msg.get("tool_calls") if isinstance(msg, dict) else None
                for call in calls if isinstance(calls, list) else []:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), (dict, list)):
                        fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
    return obj


@dataclass
class Correction:
    path: Path
    out_path: Path
    kept: int
    fixed: list[int]  # lines repaired automatically
    dropped: list[LineError]  # lines left out, with the reason


def write_corrected(
    path: Path, out_path: Path, sample_type: SampleType, instruct_tokenizer: Any, *, chunk: bool = False
) -> Correction:
    """Copy ``path`` to ``out_path`` keeping valid lines byte for byte, repairing what ``_autofix`` can and
    leaving out (and listing) every other invalid line."""
    kept, fixed, dropped = 0, [], []
    with open(path, "rb") as src, open(out_path, "wb") as dst:
        for line_no, raw in enumerate(src, start=1):
            body = raw.rstrip(b"\n")
            try:
                obj = decode_line(body, line_no)
                try:
                    encode_all(obj, instruct_tokenizer, sample_type, chunk, Path(path).parent)
                    dst.write(body.rstrip(b"\r") + b"\n")
                    kept += 1
                    continue
                except DataFormatError as first:
                    repaired = _autofix(obj)
                    try:
                        encode_all(repaired, instruct_tokenizer, sample_type, chunk, Path(path).parent)
                    except DataFormatError:
                        raise first from None
                    dst.write(json.dumps(repaired, ensure_ascii=False).encode() + b"\n")
                    kept += 1
                    fixed.append(line_no)
            except DataFormatError as e:
                dropped.append(LineError(str(path), line_no, e.kind, e.message))
    return Correction(path, out_path, kept, fixed, dropped)
