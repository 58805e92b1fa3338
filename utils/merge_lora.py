"""Fold a LoRA adapter into its base model: a plain model folder any Mistral tool can load.

    python -m utils.merge_lora --base_model BASE_DIR --lora RUN_DIR/checkpoints/checkpoint_000300 \\
        --out MERGED_DIR [--scaling S] [--dtype bf16|fp16|fp32]

``--lora`` is a checkpoint folder, its ``consolidated/`` folder or the ``lora.safetensors`` file; the
scaling is read from the ``params.json`` next to it (``--scaling`` only for adapters without one).
The output folder gets ``consolidated.safetensors`` (W + scaling * B A, computed in float32 and cast to
the base dtype or ``--dtype``), ``params.json`` and the tokenizer file.

Runs on CPU and streams: the output file's header is computed from the base's tensor shapes first,
then each base tensor is read, merged and written at its offset, so memory holds one tensor (plus the
adapter, which is small) instead of two copies of the model. The reference's flag names
(``--initial_model_ckpt``, ``--lora_ckpt``, ``--dump_ckpt``) are accepted too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.data.tokenizer import tokenizer_file
from model.checkpoint import checkpoint_files, is_hf_folder, iter_checkpoint_tensors
from model.configs import load_model_args, params_from_args
from model.lora import merge_delta

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


class MergeError(ValueError):
    """A base/adapter combination that cannot be merged; the message names the file and the fix."""


def find_adapter(path: str | Path) -> tuple[Path, dict | None]:
    """(lora.safetensors, its params.json contents or None) from a checkpoint, folder or file."""
    path = Path(path)
    for candidate in (path, path / "lora.safetensors", path / "consolidated" / "lora.safetensors"):
        if candidate.is_file() and candidate.name.endswith(".safetensors"):
            params_path = candidate.parent / "params.json"
            params = json.loads(params_path.read_text()) if params_path.is_file() else None
            return candidate, params
    raise FileNotFoundError(
        f"no adapter at {path}: give RUN_DIR/checkpoints/checkpoint_N, its consolidated/ folder or the "
        "lora.safetensors file (a run with save_adapters: false already wrote merged weights)."
    )


def tensor_specs(base: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every base tensor in load order, without reading the data when possible."""
    if not is_hf_folder(base) and all(p.suffix == ".safetensors" for p in checkpoint_files(base)):
        for path in checkpoint_files(base):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    yield key, tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()]
        return
    for key, tensor, _ in iter_checkpoint_tensors(base):  # .pth or HF: one tensor at a time
        yield key, tuple(tensor.shape), tensor.dtype


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, dict[str, int]]:
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


def write_streamed(
    target: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Write a safetensors file whose header is known up front, one tensor at a time (atomically)."""
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


def merge(base: Path, adapter: Path, scaling: float, out: Path, dtype: torch.dtype | None) -> int:
    """Write ``out/consolidated.safetensors``; returns the number of merged weights."""
    lora = load_file(str(adapter))
    if not lora:
        raise MergeError(f"{adapter} holds no tensors; is it the adapter file written by training?")
    specs = [(k, s, dtype or d) for k, s, d in tensor_specs(base)]
    shapes = {k: s for k, s, _ in specs}
    for key in lora:
        module, kind, _ = key.rsplit(".", 2)
        if f"{module}.weight" not in shapes or kind not in ("lora_A", "lora_B"):
            raise MergeError(
                f"{adapter}: '{key}' matches no weight of {base}; is this the base model the adapter was trained on?"
            )
    merged = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor, path in iter_checkpoint_tensors(base):
            module = key.removesuffix(".weight")
            a, b = lora.get(f"{module}.lora_A.weight"), lora.get(f"{module}.lora_B.weight")
            if (a is None) != (b is None):
                raise MergeError(
                    f"{adapter}: '{module}' has only one of lora_A/lora_B; the file is incomplete."
                )
            if a is not None:
                if (b.shape[0], a.shape[1]) != tuple(tensor.shape) or a.shape[0] != b.shape[1]:
                    raise MergeError(
                        f"{adapter}: '{module}' adapter shapes {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                        f"{path.name}'s weight {tuple(tensor.shape)}; use the base model the adapter was trained on."
                    )
                tensor = merge_delta(tensor, a, b, scaling)
                merged.append(module)
            yield key, tensor.to(dtype or tensor.dtype)

    out.mkdir(parents=True, exist_ok=True)
    write_streamed(out / "consolidated.safetensors", specs, tensors())
    return len(merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.merge_lora", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base_model",
        "--initial_model_ckpt",
        dest="base",
        required=True,
        help="base model folder (or its consolidated.safetensors)",
    )
    parser.add_argument(
        "--lora",
        "--lora_ckpt",
        dest="lora",
        required=True,
        help="checkpoint folder, its consolidated/ folder, or lora.safetensors",
    )
    parser.add_argument(
        "--out", "--dump_ckpt", dest="out", required=True, help="new folder for the merged model"
    )
    parser.add_argument("--scaling", type=float, default=None, help="only for an adapter without params.json")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: the base's dtype")
    opts = parser.parse_args(argv)
    try:
        base = Path(opts.base)
        base = base.parent if base.is_file() else base
        if not base.is_dir():
            raise FileNotFoundError(f"--base_model {opts.base} is not a model folder.")
        adapter, params = find_adapter(opts.lora)
        out = Path(opts.out)
        if out.resolve() in (base.resolve(), adapter.parent.resolve()):
            raise MergeError(f"--out {out} is a folder the merge reads from; choose a new folder.")
        lora_params = (params or {}).get("lora") or {}
        scaling = lora_params.get("scaling")
        if opts.scaling is not None:
            if scaling is not None and scaling != opts.scaling:
                print(
                    f"warning: --scaling {opts.scaling} overrides {scaling} from the adapter's params.json",
                    file=sys.stderr,
                )
            scaling = opts.scaling
        if scaling is None:
            raise MergeError(
                f"{adapter.parent}/params.json with a 'lora.scaling' was not found; pass --scaling."
            )
        base_args = load_model_args(base)
        n = merge(base, adapter, float(scaling), out, _DTYPES.get(opts.dtype))
        (out / "params.json").write_text(json.dumps(params_from_args(base_args), indent=4) + "\n")
        tok = tokenizer_file(adapter.parent) or tokenizer_file(base)
        if tok is not None:
            shutil.copy2(tok, out / tok.name)
        else:
            print(f"warning: no tokenizer file in {adapter.parent} or {base}; none copied", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Merged {n} adapter(s) (scaling {scaling}) into {out / 'consolidated.safetensors'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
