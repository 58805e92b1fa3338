"""Data sources opened from the cache: one index space of samples per source.

Two phases. ``tokenize_sources`` reads every file once (tokenizing into the cache what is not there
yet) and is what the data check runs; ``to_manifest`` names the cache entry of every file, and
``open_manifest`` opens those entries again, in another process, without reading or hashing the
data files. Training scans on rank 0 and hands the other ranks the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.args import DataArgs
from finetune.data.cache import LineError, TokenizedFile, TokenizerPool, load_tokenized, open_entry
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
        self.has_images = any(f.has_images for f in self.files)

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

    def spans(self, i: int) -> np.ndarray:
        """(pictures, 2) ``[start, end)`` token runs of sample i's pictures."""
        f, k = self.locate(i)
        return f.spans(k)

    def images(self, i: int, which: Iterable[int] | None = None) -> list[np.ndarray]:
        """Sample i's pictures (or those number ``which``), float32 (C, H, W), in the order of their runs."""
        f, k = self.locate(i)
        return f.read_images(k, which)

    def image_runs_longer_than(self, n: int) -> list[str]:
        """``file:line`` of each sample with a picture whose token run is longer than ``n`` positions."""
        out = []
        for f in self.files:
            if f.has_images:
                runs = f.image_spans[:, 1] - f.image_spans[:, 0]
                for j in np.flatnonzero(runs > n):
                    k = int(np.searchsorted(f.image_index, j, side="right")) - 1
                    out.append(f"{f.path}:{f.lines[k]} ({int(runs[j])} image tokens)")
        return out



def tokenize_sources(
    sources: list[DataSource], instruct_tokenizer: Any, *, chunk_instruct: bool, args: DataArgs, pool: TokenizerPool
) -> list[SourceData]:
    """Read every file of every source, tokenizing into the cache what is not there yet."""
    out, cache = [], args.cache_path
    for s in sources:  # load_tokenized applies chunking to instruct sources only
        files = [load_tokenized(f, s.sample_type, instruct_tokenizer, chunk=chunk_instruct, cache_dir=cache, pool=pool)
                 for f in s.files]
        out.append(SourceData(s, files, _shuffled(s, args)))
    return out


def _shuffled(source: DataSource, args: DataArgs) -> bool:
    return args.instruct.shuffle if source.sample_type is SampleType.INSTRUCT else args.shuffle


def to_manifest(data: list[SourceData]) -> list[dict[str, Any]]:
    """JSON naming each source and the cache entry of each of its files."""
    return [
        {
            "spec": d.source.spec, "key": d.source.key, "path": str(d.source.path), "weight": d.source.weight,
            "sample_type": d.source.sample_type.value, "shuffle": d.shuffle,
            "files": [[str(f.path), f.key, f.chunk] for f in d.files],
        }
        for d in data
    ]


def open_manifest(manifest: list[dict[str, Any]], instruct_tokenizer: Any, cache_dir: Path) -> list[SourceData]:
    """The sources of ``to_manifest``, opened from the cache by entry name (a node whose cache folder
    lacks an entry tokenizes that file into it)."""
    out = []
    for m in manifest:
        sample_type = SampleType(m["sample_type"])
        files = [open_entry(Path(path), key, sample_type, instruct_tokenizer, chunk=chunk, cache_dir=cache_dir)
                 for path, key, chunk in m["files"]]
        source = DataSource(m["spec"], m["key"], Path(m["path"]), m["weight"], sample_type,
                            tuple(f.path for f in files))
        out.append(SourceData(source, files, m["shuffle"]))
    return out
