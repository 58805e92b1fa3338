"""Data sources opened from the cache: one index space of samples per source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.args import DataArgs
from finetune.data.cache import LineError, TokenizedFile, TokenizerPool, load_tokenized
from finetune.data.sources import DataSource, check_no_duplicates, parse_sources
from finetune.data.tokenize import SampleType


def train_sources(args: DataArgs) -> list[DataSource]:
    sources = parse_sources(args.data, "data.data", SampleType.PRETRAIN)
    sources += parse_sources(args.instruct_data, "data.instruct_data", SampleType.INSTRUCT)
    if not sources:
        args.validate()  # raises the "both empty" message
    check_no_duplicates(sources)
    return sources


def eval_sources(args: DataArgs) -> list[DataSource]:
    sources = parse_sources(args.eval_instruct_data, "data.eval_instruct_data", SampleType.INSTRUCT)
    check_no_duplicates(sources)
    return sources


@dataclass
class SourceData:
    """A source's files, concatenated: sample ``i`` of the source, in file order then line order."""

    source: DataSource
    files: list[TokenizedFile]
    shuffle: bool

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        # positions a sample occupies in a row: its tokens minus one (inputs are tokens[:-1])
        self.positions = (
            np.concatenate([np.diff(f.offsets) - 1 for f in self.files])
            if self.files
            else np.zeros(0, np.int64)
        )
        self.targets = (
            np.concatenate([f.targets for f in self.files]) if self.files else np.zeros(0, np.int32)
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def errors(self) -> list[LineError]:
        return [e for f in self.files for e in f.errors]

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.files]

    def locate(self, i: int) -> tuple[TokenizedFile, int]:
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.files[j], i - int(self.starts[j])

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's tokens and masks, read from the cache."""
        f, k = self.locate(i)
        return f.read(k)

    def line_of(self, i: int) -> tuple[Path, int]:
        f, k = self.locate(i)
        return f.path, int(f.lines[k])


def open_sources(
    sources: list[DataSource],
    instruct_tokenizer: Any,
    *,
    chunk_instruct: bool,
    args: DataArgs,
    cache_dir: Path | None,
    pool: TokenizerPool | None = None,
) -> list[SourceData]:
    """Tokenize (or reuse the cache of) every file of every source."""
    own_pool = pool is None
    pool = pool or TokenizerPool(instruct_tokenizer)
    if cache_dir is None and args.cache_dir:
        cache_dir = Path(args.cache_dir).expanduser()
    try:
        out = []
        for s in sources:
            files = [
                load_tokenized(
                    f,
                    s.sample_type,
                    instruct_tokenizer,
                    chunk=chunk_instruct and s.sample_type is SampleType.INSTRUCT,
                    cache_dir=cache_dir,
                    pool=pool,
                )
                for f in s.files
            ]
            shuffle = args.instruct.shuffle if s.sample_type is SampleType.INSTRUCT else args.shuffle
            out.append(SourceData(s, files, shuffle))
        return out
    finally:
        if own_pool:
            pool.close()
