"""Reading ``torch.distributed.checkpoint`` folders without unpickling arbitrary objects.

Run folders are copied between machines and shared, so a checkpoint is untrusted input. DCP's
stock reader unpickles ``.metadata`` with ``pickle.load`` and its default load planner reads
non-tensor entries (the optimizer's ``param_groups``: floats, tuples, bools) with
``torch.load(weights_only=False)``: either would run code planted in the file. This module reads
the metadata with an unpickler that only builds DCP's own metadata classes, ``torch.Size``,
dtypes, layouts and paths, and reads non-tensor entries with ``weights_only=True``. Tensors are
already read with ``weights_only=True`` by DCP itself.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# (module, name) pairs the metadata pickle may name; anything else is refused.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names a Python object that is not plain checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA and not name.startswith("__"):
            return super().find_class(module, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which a checkpoint's metadata never contains")


def read_metadata_file(path: str) -> Metadata:
    """Unpickle a DCP ``.metadata`` file, allowing only metadata classes."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path} {e}; refusing to load it (was it tampered with?).") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} does not hold checkpoint metadata ({type(metadata).__name__}).")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(str(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``.

    The stock ``load_bytes`` calls ``torch.load(weights_only=False)``; here the entry is loaded
    safely first and what the parent then unpickles is our own re-serialisation of that plain
    value (floats, tuples, lists, bools: a few bytes each)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data, refusing to load it: {e}"
            ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
