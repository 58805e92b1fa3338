"""Rewriting a checkpoint one tensor at a time: a merged or re-shaped model never exists twice in memory.

``tensor_specs`` lists a checkpoint's tensors (key, shape, dtype) without reading their data when the
files are safetensors; ``write_streamed`` computes a safetensors header from such a list up front, then
writes each tensor at its offset as it arrives (``utils.merge_lora``, ``utils.extend_model_vocab``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoint import checkpoint_files, is_hf_folder, iter_checkpoint_tensors
from model.fp8 import DEQUANTIZED_DTYPE, SAFETENSORS_FP8, is_scale

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # (key, shape, dtype)

_ST_NAMES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}


def tensor_specs(base: str | Path) -> Iterator[TensorSpec]:
    """(key, shape, dtype) of every tensor of a model folder, in load order; only the headers are read
    for safetensors files, a ``.pth`` or Hugging Face folder is streamed one tensor at a time."""
    base = Path(base)
    if not is_hf_folder(base) and all(p.suffix == ".safetensors" for p in checkpoint_files(base)):
        for path in checkpoint_files(base):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if is_scale(key):
                        continue  # an FP8 release's scales are consumed by the reader (model.fp8)
                    sl = f.get_slice(key)
                    fp8 = sl.get_dtype() == SAFETENSORS_FP8  # streams dequantized
                    yield key, tuple(sl.get_shape()), DEQUANTIZED_DTYPE if fp8 else _ST_DTYPES[sl.get_dtype()]
        return
    for key, tensor, _ in iter_checkpoint_tensors(base):
        yield key, tuple(tensor.shape), tensor.dtype


def _header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """safetensors header (8-byte little-endian length + JSON padded to 8 bytes) and each key's data offset."""
    meta: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offsets, at = {}, 0
    for key, shape, dtype in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        meta[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        offsets[key] = at
        at += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def write_streamed(target: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file whose header is known up front, one tensor at a time (atomically:
    under ``target.tmp``, renamed when every tensor of ``specs`` was written; removed on an error)."""
    header, offsets = _header(specs)
    expected = {k: (s, d) for k, s, d in specs}
    tmp = target.with_name(target.name + ".tmp")
    written = set()
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for key, tensor in tensors:
                tensor = tensor.contiguous()
                assert (tuple(tensor.shape), tensor.dtype) == expected[key], key
                f.seek(len(header) + offsets[key])
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                written.add(key)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    assert written == set(expected), sorted(set(expected) - written)[:3]
    tmp.rename(target)
