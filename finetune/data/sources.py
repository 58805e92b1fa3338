"""Parsing of source strings ``"path[:weight],path[:weight]"`` into resolved data sources."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finetune.data.tokenize import SampleType


@dataclass(frozen=True)
class DataSource:
    """One entry of a source string: a file, or a directory's ``.jsonl`` files in sorted order."""

    spec: str  # the entry as written, for messages
    key: str  # the YAML key it came from, e.g. "data.instruct_data"
    path: Path
    weight: float
    sample_type: SampleType
    files: tuple[Path, ...]


def split_source_string(spec: str, key: str) -> list[tuple[str, float]]:
    """Split ``"a.jsonl:2,dir"`` into ``[("a.jsonl", 2.0), ("dir", 1.0)]`` without touching the disk.

    A colon separates a weight only when what follows it parses as a number, so Windows drive letters
    and URLs keep their colons: ``C:\\data\\x.jsonl:2`` is the path ``C:\\data\\x.jsonl`` with weight 2.
    """
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                number = float(tail)
            except ValueError:
                number = None
            if number is not None:
                if not math.isfinite(number) or number <= 0:
                    raise ValueError(
                        f"{key}: source {item!r} has weight {tail!r}; weights must be positive numbers, "
                        f"e.g. {head}:1.0 (or leave the weight out for 1.0)."
                    )
                path, weight = head.strip(), number
        out.append((path, weight))
    return out


def list_jsonl_files(directory: Path) -> list[Path]:
    """Every ``*.jsonl`` file below ``directory``, recursively, sorted by relative path (reproducible)."""
    files = [p for p in directory.rglob("*.jsonl") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def parse_sources(spec: str, key: str, sample_type: SampleType) -> list[DataSource]:
    """Resolve a source string; missing paths, empty directories and duplicates are errors."""
    sources: list[DataSource] = []
    for path_str, weight in split_source_string(spec, key):
        path = Path(path_str).expanduser()
        if path.is_dir():
            files = list_jsonl_files(path)
            if not files:
                raise ValueError(
                    f"{key}: directory {path_str} contains no .jsonl files (searched recursively). "
                    "Put the data in files ending in .jsonl, or point to the file itself."
                )
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(
                f"{key}: {path_str} does not exist. List existing .jsonl files or directories, "
                "separated by commas, each optionally followed by :weight (a positive number)."
            )
        sources.append(DataSource(path_str, key, path, weight, sample_type, tuple(files)))
    return sources


def check_no_duplicates(sources: list[DataSource]) -> None:
    """A file reached twice (listed twice, or inside two listed directories) would be silently upweighted."""
    seen: dict[Path, DataSource] = {}
    for source in sources:
        for f in source.files:
            real = f.resolve()
            if real in seen:
                other = seen[real]
                raise ValueError(
                    f"{f} is used twice: by {other.key} entry {other.spec!r} and by {source.key} entry "
                    f"{source.spec!r}. List each file once; use a weight (path:2) to upsample it."
                )
            seen[real] = source
