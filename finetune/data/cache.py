"""Tokenize a JSONL file once, store the result on disk, read it back memory-mapped.

One cache entry per (file content, tokenizer file, sample type, chunking), in a folder named by the hash
of those four, holding flat arrays:

    tokens.bin   int32  every sample's tokens, concatenated
    masks.bin    bool   the matching training-target masks
    offsets.npy  int64  sample i is tokens[offsets[i]:offsets[i+1]]   (n_samples + 1)
    lines.npy    int32  1-based line of sample i (chunked samples share their line)
    targets.npy  int32  number of target positions of sample i (sum of masks[1:])
    meta.json           line counts and every invalid line's error

and, for a file whose samples have pictures (docs/vision.md):

    image_index.npy  int64  sample i's pictures are rows image_index[i]:image_index[i+1] below
    image_spans.npy  int64  (pictures, 2): each picture's [start, end) token run within its sample
    images.json             each picture's source: {"path", "size", "mtime_ns"} for a file, or
                            {"blob": [offset, length]} for a data: URI, decoded into images.bin
    images.bin              the encoded bytes (PNG, JPEG, ...) of data: URI pictures

Pixels are not cached: a picture is decoded and resized again by mistral-common's image encoder when
its sample is read (a float32 1024x1024 picture would take 12 MB; its PNG or JPEG a small fraction).
A picture file whose size or modification time changed makes the entry tokenize again.

Opening a cached file loads only ``offsets``/``lines``/``targets`` (a few bytes per sample); the token
arrays are memory-mapped for inspection, and the loader reads each sample it needs with ``pread``, so a
rank's memory does not grow with the data set or with the number of samples read.
Tokenizing runs in a process pool over ~1 MiB blocks of lines; ranks that race on the same entry
serialise on a lock file and the later ones reuse the result.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.errors import DataFormatError
from finetune.data.images import decode_image, image_spans, read_image_bytes
from finetune.data.tokenize import SampleType, _as_instruct_tokenizer, encode_all

logger = logging.getLogger("finetune.data")

CACHE_VERSION = 5  # 5: user image chunks parsed (new verdicts for lines that have them); 4: v7+ text and calls
# Verdicts that depend on image files, which the key (the JSONL file's hash) does not cover.
_IMAGE_KINDS = frozenset({"bad_image", "no_image_encoder"})
_BLOCK_BYTES = 1 << 20  # one pool task
_IN_PROCESS_BYTES = 1 << 20  # smaller files are not worth starting a pool for


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


_TOKENIZER_IDS: dict[tuple[str, int, int], str] = {}


def tokenizer_identity(instruct_tokenizer: Any) -> str:
    """Hash of the tokenizer file and the instruct-tokenizer class (which decides the layout)."""
    it = _as_instruct_tokenizer(instruct_tokenizer)
    path = Path(it.tokenizer.file_path)
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _TOKENIZER_IDS:
        _TOKENIZER_IDS[memo] = file_digest(path)
    return f"{type(it).__name__}:{_TOKENIZER_IDS[memo]}"


@dataclass
class LineError:
    path: str
    line: int  # 1-based
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class TokenizedFile:
    """A file's samples, memory-mapped from the cache."""

    path: Path
    key: str
    tokens: np.ndarray  # int32, memory-mapped
    masks: np.ndarray  # bool, memory-mapped
    offsets: np.ndarray  # int64 (n_samples + 1)
    lines: np.ndarray  # int32 (n_samples)
    targets: np.ndarray  # int32 (n_samples)
    n_lines: int
    n_valid: int
    chunk: bool  # function-calling conversations expanded into one sample per assistant turn
    errors: list[LineError] = field(default_factory=list)

    entry: Path | None = None
    reads_images: bool = False  # some line's verdict depends on picture files (re-checked every scan)
    # Pictures (files with images only): sample i has image_sources[image_index[i]:image_index[i+1]],
    # whose token runs are image_spans[...] (start, end) within the sample.
    image_index: np.ndarray | None = None
    image_spans: np.ndarray | None = None
    image_sources: list[dict[str, Any]] = field(default_factory=list)
    image_encoder: Any = None  # mistral-common's, which turns a decoded picture into the model's pixels

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def has_images(self) -> bool:
        return self.image_index is not None and int(self.image_index[-1]) > 0

    def spans(self, k: int) -> np.ndarray:
        """(pictures, 2) token runs of sample k's pictures, (0, 2) for none."""
        if self.image_index is None:
            return np.zeros((0, 2), np.int64)
        return self.image_spans[self.image_index[k] : self.image_index[k + 1]]

    def read_images(self, k: int, which: Iterable[int] | None = None) -> list[np.ndarray]:
        """Sample k's pictures (or its pictures number ``which``) as the model takes them, float32
        (C, H, W): read, decoded and resized by mistral-common's image encoder, as when tokenized."""
        if self.image_index is None:
            return []
        first = int(self.image_index[k])
        out = []
        for n in range(int(self.image_index[k + 1]) - first) if which is None else which:
            src, where = self.image_sources[first + n], f"{self.path}:{self.lines[k]}: picture {n}"
            if "blob" in src:
                offset, length = src["blob"]
                raw, name = _pread(self.entry / "images.bin", offset, length, np.uint8).tobytes(), "its data: URI"
            else:
                raw, name = read_image_bytes("file://" + src["path"], where)
            encoded = self.image_encoder(decode_image(raw, where, name))
            start, end = self.image_spans[first + n]
            if len(encoded.tokens) != end - start:  # the file changed while training ran
                raise ValueError(
                    f"{where}: {name} now gives {len(encoded.tokens)} image tokens, not the {end - start} it was "
                    "tokenized with; the picture changed during the run. Restore it, or restart to re-tokenize."
                )
            out.append(encoded.image)
        return out

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample k's tokens and masks, read with ``pread``. Unlike touching the memory map, this leaves
        nothing behind in the process: a page fault on the map also maps the pages around the access
        (fault-around), and those count towards the RSS until the map is closed (docs/data.md)."""
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        assert self.entry is not None, "read() needs a cache entry"
        return _pread(self.entry / "tokens.bin", a * 4, b - a, np.int32), _pread(
            self.entry / "masks.bin", a, b - a, np.bool_
        )


# ---------------------------------------------------------------------------------------------- workers

_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    logging.getLogger("mistral_common").setLevel(logging.WARNING)
    _WORKER_TOKENIZER = MistralTokenizer.from_file(tokenizer_path).instruct_tokenizer


def decode_line(raw: bytes, line_no: int) -> Any:
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark written by some editors
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        raise DataFormatError("blank_line", "blank line; delete it (every line must hold one JSON object).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(
            "encoding",
            f"byte {e.start} of the line ({raw[e.start : e.start + 1]!r}) is not valid UTF-8; re-save the file as UTF-8.",
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            "invalid_json",
            f"invalid JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object "
            "(no pretty-printing across lines, no trailing commas).",
        ) from None
    except RecursionError:
        raise DataFormatError("invalid_json", "JSON nested too deeply; flatten the sample.") from None


def tokenize_block(
    raw: bytes,
    first_line: int,
    sample_type: SampleType,
    chunk: bool,
    instruct_tokenizer: Any,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Tokenize the lines in ``raw`` (which starts at line ``first_line``) into flat arrays. ``base_dir``
    (the file's folder) is where relative image paths start."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    tokens: list[int] = []
    masks: list[bool] = []
    lengths: list[int] = []
    line_of: list[int] = []
    targets: list[int] = []
    n_images: list[int] = []  # per sample
    spans: list[np.ndarray] = []
    sources: list[str] = []
    errors: list[tuple[int, str, str]] = []
    n_valid = 0
    special = getattr(_as_instruct_tokenizer(instruct_tokenizer).image_encoder, "special_ids", None)
    for j, line in enumerate(lines):
        line_no = first_line + j
        try:
            samples = encode_all(decode_line(line, line_no), instruct_tokenizer, sample_type, chunk, base_dir)
        except DataFormatError as e:
            errors.append((line_no, e.kind, e.message))
            continue
        n_valid += 1
        for s in samples:
            tokens += s.tokens
            masks += s.masks
            lengths.append(len(s.tokens))
            line_of.append(line_no)
            targets.append(sum(s.masks) - s.masks[0])
            n_images.append(len(s.image_sources))
            if s.image_sources:
                spans.append(image_spans(s.tokens, special))
                assert len(spans[-1]) == len(s.image_sources), "one [IMG] run per picture"
                sources += s.image_sources
    return {
        "n_images": np.asarray(n_images, dtype=np.int64),
        "image_spans": np.concatenate(spans) if spans else np.zeros((0, 2), np.int64),
        "image_sources": sources,
        "tokens": np.asarray(tokens, dtype=np.int32),
        "masks": np.asarray(masks, dtype=np.bool_),
        "lengths": np.asarray(lengths, dtype=np.int64),
        "lines": np.asarray(line_of, dtype=np.int32),
        "targets": np.asarray(targets, dtype=np.int32),
        "errors": errors,
        "n_lines": len(lines),
        "n_valid": n_valid,
    }


def _worker_block(task: tuple[str, int, int, int, str, bool]) -> dict[str, Any]:
    path, start, end, first_line, sample_type, chunk = task
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    return tokenize_block(raw, first_line, SampleType(sample_type), chunk, _WORKER_TOKENIZER, Path(path).parent)


def _blocks(path: Path, block_bytes: int = _BLOCK_BYTES) -> Iterator[tuple[int, int, int]]:
    """(start byte, end byte, first line) of runs of whole lines of about ``block_bytes``."""
    size = path.stat().st_size
    line = 1
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(start)
            raw = f.read(block_bytes)
            while start + len(raw) < size:  # cut after the block's last newline
                cut = raw.rfind(b"\n")
                if cut >= 0:
                    raw = raw[: cut + 1]
                    break
                raw += f.read(block_bytes)  # a line longer than a block
            yield start, start + len(raw), line
            line += raw.count(b"\n")
            start += len(raw)


class TokenizerPool:
    """A process pool started on first use and shared by every file of one data check."""

    def __init__(
        self,
        instruct_tokenizer: Any,
        num_workers: int | None = None,
        *,
        block_bytes: int = _BLOCK_BYTES,
        min_bytes: int = _IN_PROCESS_BYTES,
    ) -> None:
        self.instruct_tokenizer = _as_instruct_tokenizer(instruct_tokenizer)
        self.num_workers = num_workers if num_workers is not None else _default_workers()
        self.block_bytes = block_bytes  # bytes of lines per task
        self.min_bytes = min_bytes  # smaller files are tokenized in this process
        self._pool: Any = None

    def map(self, tasks: list[tuple]) -> Iterator[dict[str, Any]]:
        """Results in task order, with at most two tasks per worker in flight, so that results waiting
        to be written never pile up in memory."""
        if self._pool is None:
            path = str(self.instruct_tokenizer.tokenizer.file_path)
            # spawn: the caller may hold CUDA or threads, which fork does not copy safely.
            self._pool = mp.get_context("spawn").Pool(self.num_workers, _init_worker, (path,))
        pending: deque[Any] = deque()
        todo = iter(tasks)
        for task in itertools.islice(todo, 2 * self.num_workers):
            pending.append(self._pool.apply_async(_worker_block, (task,)))
        while pending:
            result = pending.popleft().get()
            for task in itertools.islice(todo, 1):
                pending.append(self._pool.apply_async(_worker_block, (task,)))
            yield result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: racing writers each build, the atomic rename keeps one
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_key(digest: str, tokenizer_id: str, sample_type: SampleType, chunk: bool) -> str:
    text = json.dumps([CACHE_VERSION, digest, tokenizer_id, sample_type.value, bool(chunk)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_tokenized(
    path: Path,
    sample_type: SampleType,
    instruct_tokenizer: Any,
    *,
    chunk: bool,
    cache_dir: Path,
    pool: TokenizerPool | None = None,
) -> TokenizedFile:
    """The tokenized file from the cache, tokenizing it first when it is not there yet."""
    chunk = chunk and sample_type is SampleType.INSTRUCT
    key = cache_key(file_digest(path), tokenizer_identity(instruct_tokenizer), sample_type, chunk)
    return open_entry(path, key, sample_type, instruct_tokenizer, chunk=chunk, cache_dir=cache_dir, pool=pool)


def open_entry(
    path: Path,
    key: str,
    sample_type: SampleType,
    instruct_tokenizer: Any,
    *,
    chunk: bool,
    cache_dir: Path,
    pool: TokenizerPool | None = None,
) -> TokenizedFile:
    """Cache entry ``key`` (the tokens of ``path``), built first when this cache folder lacks it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / key
    opened = _open_if_current(path, key, entry)
    if opened is None:
        with _lock(cache_dir / f"{key}.lock"):
            opened = _open_if_current(path, key, entry)
            if opened is None:
                _build(path, sample_type, instruct_tokenizer, chunk, entry, pool)
                opened = _open(path, key, entry)
    else:
        logger.debug("Reusing cached tokens for %s from %s", path, entry)
    opened.image_encoder = _as_instruct_tokenizer(instruct_tokenizer).image_encoder
    return opened


def _open_if_current(path: Path, key: str, entry: Path) -> TokenizedFile | None:
    """The entry, opened, when it is built, holds no verdict about image files (those may have been added
    or fixed since, so such a file is checked again on every scan) and every picture file it refers to is
    as it was when tokenized; None when it must be built (again)."""
    if not (entry / "meta.json").is_file():
        return None
    opened = _open(path, key, entry)
    if opened.reads_images or not _pictures_unchanged(opened.image_sources):
        return None
    return opened


def _build(
    path: Path,
    sample_type: SampleType,
    instruct_tokenizer: Any,
    chunk: bool,
    entry: Path,
    pool: TokenizerPool | None,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        if pool is not None and path.stat().st_size >= pool.min_bytes and pool.num_workers > 1:
            blocks = _blocks(path, pool.block_bytes)
            tasks = [(str(path), a, b, line, sample_type.value, chunk) for a, b, line in blocks]
            results: Iterator[dict[str, Any]] = pool.map(tasks)
        else:
            it = _as_instruct_tokenizer(instruct_tokenizer)
            results = (
                tokenize_block(_read(path, a, b), line, sample_type, chunk, it, path.parent)
                for a, b, line in _blocks(path)
            )
        lengths, lines, targets, errors = [], [], [], []
        pictures = _PictureWriter(tmp)
        n_lines = n_valid = 0
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "masks.bin", "wb") as fm:
            for r in results:
                ft.write(r["tokens"].tobytes())
                fm.write(r["masks"].tobytes())
                pictures.add(r)
                lengths.append(r["lengths"])
                lines.append(r["lines"])
                targets.append(r["targets"])
                errors += r["errors"]
                n_lines += r["n_lines"]
                n_valid += r["n_valid"]
        offsets = np.zeros(1 + sum(len(x) for x in lengths), dtype=np.int64)
        if len(offsets) > 1:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "lines.npy", np.concatenate(lines) if lines else np.zeros(0, np.int32))
        np.save(tmp / "targets.npy", np.concatenate(targets) if targets else np.zeros(0, np.int32))
        pictures.finish()
        meta = {
            "version": CACHE_VERSION,
            "source_path": str(path),
            "sample_type": sample_type.value,
            "chunk": chunk,
            "n_lines": n_lines,
            "n_valid": n_valid,
            "errors": errors,
            "reads_images": any(kind in _IMAGE_KINDS for _, kind, _ in errors),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():  # a half-written entry from a crashed run
            shutil.rmtree(entry)
        os.replace(tmp, entry)
        logger.info(
            "Tokenized %s: %d lines, %d samples, %d tokens, %d invalid lines",
            path,
            n_lines,
            len(offsets) - 1,
            int(offsets[-1]),
            len(errors),
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _PictureWriter:
    """Writes the image files of a cache entry as results arrive (nothing when no sample has one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.counts: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []
        self.sources: list[dict[str, Any]] = []
        self.blob: Any = None  # images.bin, opened at the first data: URI
        self.blob_size = 0

    def add(self, result: dict[str, Any]) -> None:
        self.counts.append(result["n_images"])
        self.spans.append(result["image_spans"])
        for url in result["image_sources"]:
            if url.startswith("data:"):  # already decoded once by the tokenizer: the payload is valid
                raw = base64.b64decode(url.partition(",")[2])
                if self.blob is None:
                    self.blob = open(self.folder / "images.bin", "wb")  # noqa: SIM115 (closed by finish)
                self.blob.write(raw)
                self.sources.append({"blob": [self.blob_size, len(raw)]})
                self.blob_size += len(raw)
            else:
                path = url.removeprefix("file://")
                st = os.stat(path)
                self.sources.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns})

    def finish(self) -> None:
        if self.blob is not None:
            self.blob.close()
        if not self.sources:
            return
        index = np.zeros(1 + sum(len(c) for c in self.counts), dtype=np.int64)
        np.cumsum(np.concatenate(self.counts), out=index[1:])
        np.save(self.folder / "image_index.npy", index)
        np.save(self.folder / "image_spans.npy", np.concatenate(self.spans))
        (self.folder / "images.json").write_text(json.dumps(self.sources))


def _pictures_unchanged(sources: list[dict[str, Any]]) -> bool:
    """Every picture file of an entry's ``images.json`` still has the size and modification time it had."""
    for src in sources:
        if "path" in src:
            try:
                st = os.stat(src["path"])
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != (src["size"], src["mtime_ns"]):
                return False
    return True


def _read(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _pread(path: Path, offset: int, count: int, dtype: Any) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, count * np.dtype(dtype).itemsize, offset)
    finally:
        os.close(fd)
    return np.frombuffer(raw, dtype=dtype)


def _memmap(path: Path, dtype: Any) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _open(path: Path, key: str, entry: Path) -> TokenizedFile:
    meta = json.loads((entry / "meta.json").read_text())
    return TokenizedFile(
        path=path,
        key=key,
        tokens=_memmap(entry / "tokens.bin", np.int32),
        masks=_memmap(entry / "masks.bin", np.bool_),
        offsets=np.load(entry / "offsets.npy"),
        lines=np.load(entry / "lines.npy"),
        targets=np.load(entry / "targets.npy"),
        n_lines=meta["n_lines"],
        n_valid=meta["n_valid"],
        chunk=meta["chunk"],
        errors=[LineError(str(path), line, kind, msg) for line, kind, msg in meta["errors"]],
        entry=entry,
        reads_images=meta.get("reads_images", False),
        **_open_pictures(entry),
    )


def _open_pictures(entry: Path) -> dict[str, Any]:
    if not (entry / "images.json").is_file():
        return {}
    return {
        "image_index": np.load(entry / "image_index.npy"),
        "image_spans": np.load(entry / "image_spans.npy"),
        "image_sources": json.loads((entry / "images.json").read_text()),
    }
