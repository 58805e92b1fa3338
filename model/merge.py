"""Folding LoRA adapters into their base weights: W + scaling * B A (``model.lora.merge_delta``).

``merge_weights`` is the one merge. It streams (key, base weight) pairs and folds in the adapter pair
whose keys name the same module (``layers.0.attention.wq.weight`` takes
``layers.0.attention.wq.lora_A.weight`` and ``.lora_B.weight``), checking that each adapter fits its
weight and that none is left over. Its sources:

- checkpoint files: ``merge_checkpoint`` (``utils.merge_lora``) and ``utils.export_hf --merged``; a
  multimodal base's vision weights stream through under their native names, unchanged unless the
  adapter file has a vision adapter for them (``model.args.VISION_TARGETS``);
- a live model: ``merged_weights`` (the merged checkpoint training writes with ``save_adapters: false``,
  gathering shards one at a time under FSDP); a model built with ``vision=True`` yields its vision
  weights too, adapters folded in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model.checkpoint import iter_checkpoint_tensors
from model.keys import file_keys
from model.lora import is_lora_key, lora_modules, lora_state_dict, merge_delta
from model.multimodal import is_vision_key
from model.quant import NF4LoRALinear
from model.streaming import tensor_specs, write_streamed


class MergeError(ValueError):
    """A base/adapter combination that cannot be merged; the message names the file and the fix."""


def adapter_pairs(adapters: Mapping[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (lora_A, lora_B)} of an adapter state dict; a stray key or half a pair is a MergeError."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapters.items():
        if not (is_lora_key(key) and key.endswith(".weight")):
            raise MergeError(
                f"{source}: '{key}' is not an adapter weight (<module>.lora_A.weight or <module>.lora_B.weight); "
                "is it the adapter file written by training?"
            )
        module, kind, _ = key.rsplit(".", 2)
        halves.setdefault(module, {})[kind] = tensor
    pairs = {}
    for module, half in halves.items():
        if len(half) != 2:
            raise MergeError(f"{source}: '{module}' has only one of lora_A/lora_B; the file is incomplete.")
        pairs[module] = (half["lora_A"], half["lora_B"])
    return pairs


def check_fits(module: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...], source: str, base: str) -> None:
    """B A must have the weight's (out, in) shape ((experts, out, in) for stacked experts)."""
    if (*b.shape[:-1], a.shape[-1]) != tuple(shape) or a.shape[-2] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
        raise MergeError(
            f"{source}: '{module}' adapter shapes {tuple(b.shape)} x {tuple(a.shape)} do not fit "
            f"{base}'s weight {tuple(shape)}; use the base model the adapter was trained on."
        )


def merge_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    adapters: Mapping[str, torch.Tensor],
    scaling: float,
    *,
    source: str = "the adapters",
    base: str = "the base model",
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` one at a time, each with its adapter pair (if any) folded in, in float32 and cast
    back to the weight's dtype. ``source`` and ``base`` name the two inputs in error messages."""
    pairs = adapter_pairs(adapters, source)
    for key, weight in weights:
        module = key.removesuffix(".weight")
        pair = pairs.pop(module, None)
        if pair is not None:
            check_fits(module, *pair, tuple(weight.shape), source, base)
            weight = merge_delta(weight, *pair, scaling)
        yield key, weight
    if pairs:
        raise MergeError(
            f"{source}: {len(pairs)} adapter(s) match no weight of {base}, e.g. {sorted(pairs)[:3]}; "
            "is this the base model the adapter was trained on?"
        )


def merged_weights(
    model: nn.Module, full: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights with its adapters folded in, under checkpoint key names, one at a time.

    ``full`` turns a parameter into the whole tensor: the identity on one device, the all-gather of a
    shard under FSDP (a collective, so every rank must run the whole iteration). An NF4 base is
    de-quantized first: the merge is the function the adapters were trained on.
    """
    modules = lora_modules(model)
    scalings = {m.scaling for m in modules.values()}
    assert len(scalings) <= 1, f"adapters with different scalings {scalings}"
    adapters = {key: full(t) for key, t in lora_state_dict(model).items()}  # small: gathered up front
    nf4 = {f"{name}.weight": m for name, m in modules.items() if isinstance(m, NF4LoRALinear)}

    def base() -> Iterator[tuple[str, torch.Tensor]]:
        for key, p in model.named_parameters():
            if is_lora_key(key):
                continue
            weight = full(p.detach())
            yield key, nf4[key].dequantize(weight) if key in nf4 else weight  # packed codes -> (out, in)

    merged = merge_weights(base(), adapters, scalings.pop() if scalings else 0.0,
                           source="the model's adapters", base="the model")
    for key, weight in merged:  # stacked experts are stored one by one
        for file_key, row in file_keys(key, weight.shape[0], model.args):
            yield file_key, weight if row is None else weight[row]


def merge_checkpoint(base: Path, adapter: Path, scaling: float, out: Path, dtype: torch.dtype | None) -> int:
    """Write ``out/consolidated.safetensors``: the base folder's weights (any layout) with the
    ``lora.safetensors`` adapters folded in, streamed; returns the number of merged weights.

    Every adapter is checked against the base's tensor shapes before anything is written."""
    lora = load_file(str(adapter))
    if not lora:
        raise MergeError(f"{adapter} holds no tensors; is it the adapter file written by training?")
    # A multimodal base's vision weights keep their own dtype (model.multimodal): bit for bit, or with
    # a vision adapter folded in and cast back to it.
    def cast(key: str, d: torch.dtype) -> torch.dtype:
        return d if is_vision_key(key) else dtype or d

    specs = [(k, s, cast(k, d)) for k, s, d in tensor_specs(base)]
    shapes = {k: s for k, s, _ in specs}
    pairs = adapter_pairs(lora, str(adapter))
    for module, (a, b) in pairs.items():
        if f"{module}.weight" not in shapes:
            raise MergeError(
                f"{adapter}: '{module}' matches no weight of {base}; is this the base model the adapter was trained on?"
            )
        check_fits(module, a, b, shapes[f"{module}.weight"], str(adapter), str(base))
    weights = ((key, tensor) for key, tensor, _ in iter_checkpoint_tensors(base))
    merged = merge_weights(weights, lora, scaling, source=str(adapter), base=str(base))
    out.mkdir(parents=True, exist_ok=True)
    write_streamed(out / "consolidated.safetensors", specs, ((k, t.to(cast(k, t.dtype))) for k, t in merged))
    return len(pairs)
