"""Checkpoint files and key names: the one place that knows how weights are laid out on disk.

Supported layouts of an official Mistral folder (next to ``params.json``):
``consolidated.safetensors``; sharded ``consolidated-00001-of-00004.safetensors`` ...;
``consolidated.00.pth`` (older releases such as 7B v0.1). Loading is strict: every base weight
must be present and nothing unknown may be; only adapter (``lora_A``/``lora_B``) weights may be
absent, because they are freshly initialised.

A Hugging Face ``MistralForCausalLM``/``MixtralForCausalLM`` folder (``config.json`` and
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index, no ``params.json``) loads too:
its tensors are renamed and un-permuted one at a time as they stream (see ``model.hf``). A multimodal
checkpoint (native ``vision_encoder`` block, HF ``mistral3``) streams its vision weights under native
names too; they are carried, not loaded, unless the model was built with ``vision=True`` (``model.vision``).

Checkpoint key names are the model's parameter names except in MoE layers (``model.keys``).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from model.configs import args_from_params, load_model_args, read_json_object
from model.fp8 import dequantized, weight_scales
from model.hf import tensors_from_hf
from model.hf_config import args_from_hf_config
from model.keys import checkpoint_layout, file_keys, from_checkpoint_names, to_checkpoint_names  # noqa: F401
from model.lora import is_lora_key, lora_modules, lora_state_dict
from model.multimodal import (
    is_hf_vision_key,
    is_vision_key,
    text_key_from_mistral3,
    vision_block,
    vision_from_hf,
)

logger = logging.getLogger("model")

_SHARD = re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors$")

def is_hf_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return not (folder / "params.json").is_file() and (folder / "config.json").is_file()


def hf_checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: one file, or the shards its index names."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names {absent[:3]}, which are not in {folder}; the download is incomplete.")
        return [folder / n for n in names]
    raise FileNotFoundError(
        f"{folder}: config.json but no model.safetensors or model.safetensors.index.json. Only safetensors "
        "Hugging Face folders are supported; re-save with save_pretrained(..., safe_serialization=True)."
    )


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a Mistral (or Hugging Face) folder, in load order."""
    folder = Path(folder)
    if is_hf_folder(folder):
        return hf_checkpoint_files(folder)
    single = folder / "consolidated.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(p for p in folder.glob("consolidated-*-of-*.safetensors") if _SHARD.search(p.name))
    if shards:
        expected = int(_SHARD.search(shards[0].name).group(2))
        if len(shards) != expected:
            raise FileNotFoundError(
                f"{folder}: found {len(shards)} of {expected} consolidated-*-of-{expected:05d}.safetensors "
                "shards; the download is incomplete."
            )
        return shards
    pth = sorted(folder.glob("consolidated.[0-9][0-9].pth"))
    if len(pth) == 1:
        return pth
    if len(pth) > 1:
        raise ValueError(
            f"{folder}: {len(pth)} model-parallel consolidated.NN.pth files are not supported; "
            "use the release's consolidated.safetensors instead."
        )
    raise FileNotFoundError(
        f"{folder}: no weights found. Expected consolidated.safetensors, "
        "consolidated-0000k-of-0000n.safetensors shards, or consolidated.00.pth next to params.json."
    )


def iter_checkpoint_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (key, CPU tensor, file) one tensor at a time, so peak memory stays at one copy."""
    if is_hf_folder(folder):
        yield from _iter_hf_tensors(Path(folder))
        return
    # FP8 releases (model.fp8): each FP8 weight is dequantized to float32 as it streams, its scales consumed.
    scales: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        with _readable(path):
            scales.update(weight_scales(path))
    yield from dequantized(_iter_native_tensors(folder), scales, source=str(folder))


def _iter_native_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for path in checkpoint_files(folder):
        with _readable(path):
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key), path
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                for key in list(state):
                    yield key, state.pop(key), path


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A truncated or corrupt weights file is one ValueError naming it, not a library traceback."""
    try:
        yield
    except (SafetensorError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} cannot be read ({detail}): the file is truncated or corrupt. Download it again and "
            "compare its size with the release's."
        ) from None


def _iter_hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """HF tensors under Mistral names; unknown keys pass through unchanged so loading reports them."""
    config = read_json_object(folder / "config.json")
    args = args_from_hf_config(config, source=str(folder / "config.json"))
    vision = vision_block(args.extra)
    for path in hf_checkpoint_files(folder):
        with _readable(path), safe_open(str(path), framework="pt", device="cpu") as f:
            for stored_key in f.keys():
                hf_key = text_key_from_mistral3(stored_key) if vision else stored_key
                if args.tied_embeddings and hf_key == "lm_head.weight":
                    continue  # some folders store the tied copy too; the model has one weight
                try:
                    if vision and is_hf_vision_key(hf_key):
                        converted = [vision_from_hf(hf_key, f.get_tensor(stored_key), vision)]
                    else:
                        converted = list(tensors_from_hf(hf_key, f.get_tensor(stored_key), args))
                except KeyError:
                    converted = [(stored_key, f.get_tensor(stored_key))]
                for key, tensor in converted:
                    yield key, tensor, path


def iter_base_weights(
    folder: str | Path, shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the checkpoint's tensors, checked against the model's base weights ``shapes``.

    Strict: a tensor the model does not have, a wrong shape, or (at the end) a base weight the
    checkpoint lacks is a ValueError naming it. Adapter weights are never expected.
    """
    seen: set[str] = set()
    # A multimodal checkpoint's vision weights are carried into merged outputs, not loaded (model.multimodal),
    # unless the model was built with its vision side (``vision=True``): then they load strictly as the rest.
    text_only = not any(is_vision_key(k) for k in shapes)
    carried = is_vision_key if text_only and vision_block(load_model_args(folder).extra) else (lambda key: False)
    for key, tensor, path in iter_checkpoint_tensors(folder):
        if carried(key):
            continue
        if key not in shapes:
            raise ValueError(
                f"{path}: weight '{key}' is not part of this model. Is this a Mistral-format "
                "(consolidated) or Hugging Face checkpoint of the model params.json describes?"
            )
        if tuple(tensor.shape) != tuple(shapes[key]):
            raise ValueError(
                f"{path}: '{key}' has shape {tuple(tensor.shape)} but params.json implies "
                f"{tuple(shapes[key])}; params.json and the weights do not belong together."
            )
        seen.add(key)
        yield key, tensor
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ValueError(
            f"{folder}: checkpoint is missing {len(missing)} weight(s) the model needs, e.g. "
            f"{', '.join(missing[:5])}. Check that params.json matches the weights (n_layers, moe)."
        )


def base_weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Model key -> shape of the base weights; a tied weight (``output`` = ``tok_embeddings``) is stored
    once, under its first name."""
    aliases = tied_aliases(model)
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if not is_lora_key(k) and k not in aliases
    }


def base_weight_layout(model: nn.Module) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """``checkpoint_layout`` of ``model``'s base weights (``model.args`` says how MoE layers are named)."""
    return checkpoint_layout(base_weight_shapes(model), model.args)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} of parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point every alias back at its first name's parameter (after ``assign``/``to_empty`` replaced it)."""
    for alias, name in aliases.items():
        module, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(module), leaf, model.get_parameter(name))


def load_base_weights(
    model: nn.Module, folder: str | Path, *, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Assign checkpoint tensors into a (meta-device) model, strictly."""
    aliases = tied_aliases(model)
    layout = base_weight_layout(model)
    shapes = base_weight_shapes(model)
    loaded: dict[str, torch.Tensor] = {}
    for file_key, tensor in iter_base_weights(folder, {k: shape for k, (_, _, shape) in layout.items()}):
        key, row, _ = layout[file_key]
        if row is None:
            loaded[key] = tensor.to(device=device, dtype=dtype)
        else:  # one expert of a stacked tensor
            if key not in loaded:
                loaded[key] = torch.empty(shapes[key], device=device, dtype=dtype)
            loaded[key][row].copy_(tensor)
    model.load_state_dict(loaded, strict=False, assign=True)
    retie(model, aliases)  # assign replaced the first name's parameter only


def init_adapters(model: nn.Module, *, device: torch.device | str, dtype: torch.dtype) -> None:
    """Materialise and initialise every adapter still on the meta device (lora_B = 0)."""
    for module in lora_modules(model).values():
        if module.lora_A.weight.is_meta:
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
            module.lora_A.to(dtype)
            module.lora_B.to(dtype)
            module.reset_lora_parameters()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not still_meta, f"parameters left on meta after loading: {still_meta[:5]}"


def find_adapter(path: str | Path) -> tuple[Path, dict | None]:
    """(lora.safetensors, its params.json contents or None) from a training checkpoint folder, its
    ``consolidated/`` folder or the file itself."""
    path = Path(path)
    for candidate in (path, path / "lora.safetensors", path / "consolidated" / "lora.safetensors"):
        if candidate.is_file() and candidate.name.endswith(".safetensors"):
            params_path = candidate.parent / "params.json"
            params = read_json_object(params_path) if params_path.is_file() else None
            return candidate, params
    raise FileNotFoundError(
        f"no adapter at {path}: give RUN_DIR/checkpoints/checkpoint_N, its consolidated/ folder or the "
        "lora.safetensors file (a run with save_adapters: false already wrote merged weights)."
    )


def load_adapters_state(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``lora.safetensors``, check it fits the model's adapters (keys and ranks) and return its
    tensors under the model's names (experts' adapters stacked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found (expected a lora.safetensors).")
    state = load_file(str(path))
    layout = checkpoint_layout({key: tuple(t.shape) for key, t in lora_state_dict(model).items()}, model.args)
    shapes = {key: shape for key, (_, _, shape) in layout.items()}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"{path}: adapter keys do not match the model's LoRA layers "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check lora.rank and "
            "lora.target_modules against the adapter's params.json."
        )
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{path}: '{key}' has shape {tuple(state[key].shape)}, the model expects "
                f"{shape}; set lora.rank to the rank the adapter was trained with."
            )
    return from_checkpoint_names(state, layout)


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load a ``lora.safetensors`` into the model's adapters (on one device)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_adapters_state(model, path).items():
            params[key].copy_(value)


def save_model_folder(
    folder: str | Path,
    params: dict,
    state_dict: dict[str, torch.Tensor],
    *,
    layout: str = "safetensors",
    num_shards: int = 2,
) -> None:
    """Write ``params.json`` and weights in one of the official layouts
    ("safetensors", "sharded" or "pth"). Used for merged exports and for tiny test models."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    # A model's own state dict is stored under checkpoint names (experts one by one).
    state_dict = to_checkpoint_names(state_dict, args_from_params(params))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if params.get("tied_embeddings"):
        tensors.pop("output.weight", None)  # the embedding is the output layer; stored once
    if layout == "safetensors":
        save_file(tensors, str(folder / "consolidated.safetensors"))
    elif layout == "pth":
        torch.save(tensors, folder / "consolidated.00.pth")
    elif layout == "sharded":
        keys = sorted(tensors)
        for i in range(num_shards):
            part = {k: tensors[k] for k in keys[i::num_shards]}
            save_file(part, str(folder / f"consolidated-{i + 1:05d}-of-{num_shards:05d}.safetensors"))
    else:
        raise ValueError(f"unknown layout {layout!r}; choose safetensors, sharded or pth")
