"""Checkpoint key names <-> the model's parameter names.

They are the same except in MoE layers, whose experts the model stacks (``model.experts``): a file
names each expert (``layers.N.feed_forward.experts.E.w1.weight``, Mixtral), and fine-grained MoE
layers (Mistral Small 4) keep router, experts and shared experts at the layer level
(``layers.N.gate.weight``, ``layers.N.experts.E.w1.weight``, ``layers.N.shared_experts.w1.weight``),
as Mistral publishes them and vLLM's Mistral Large 3 loader reads them. Adapter files
(``lora.safetensors``) follow the same names, one adapter per expert.
"""

from __future__ import annotations

import re

import torch

from model.args import ModelArgs

# A parameter or adapter of stacked experts, and the router or shared experts of an MoE layer.
_STACKED = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])\.(weight|lora_A\.weight|lora_B\.weight)")
_MOE_PART = re.compile(r"layers\.(\d+)\.feed_forward\.((?:gate|shared_experts)\..+)")


def file_keys(key: str, rows: int, args: ModelArgs) -> list[tuple[str, int | None]]:
    """The checkpoint key(s) of model parameter ``key``: one (key, row) per expert for a stacked
    expert tensor of ``rows`` experts, else [(key, None)]."""
    fine = args.moe is not None and args.moe.fine_grained
    stacked = _STACKED.fullmatch(key)
    if stacked:
        layer, w, leaf = stacked.groups()
        scope = "" if fine else "feed_forward."
        return [(f"layers.{layer}.{scope}experts.{e}.{w}.{leaf}", e) for e in range(rows)]
    part = _MOE_PART.fullmatch(key) if fine else None
    if part:
        return [(f"layers.{part.group(1)}.{part.group(2)}", None)]
    return [(key, None)]


def checkpoint_layout(shapes: dict[str, tuple[int, ...]], args: ModelArgs) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """{checkpoint key: (model key, expert row or None, the stored tensor's shape)} for model ``shapes``."""
    layout = {}
    for key, shape in shapes.items():
        for file_key, row in file_keys(key, shape[0] if shape else 0, args):
            layout[file_key] = (key, row, tuple(shape[1:]) if row is not None else tuple(shape))
    return layout


def to_checkpoint_names(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Model-named tensors -> checkpoint-named ones (stacked experts split into views, one per expert)."""
    out = {}
    for key, tensor in state.items():
        for file_key, row in file_keys(key, tensor.shape[0] if tensor.dim() else 0, args):
            out[file_key] = tensor if row is None else tensor[row]
    return out


def from_checkpoint_names(
    state: dict[str, torch.Tensor], layout: dict[str, tuple[str, int | None, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors (every key of ``layout`` present) -> model-named ones, experts stacked."""
    rows: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for file_key, (key, row, _) in layout.items():
        if row is None:
            out[key] = state[file_key]
        else:
            rows.setdefault(key, {})[row] = state[file_key]
    for key, by_row in rows.items():
        out[key] = torch.stack([by_row[e] for e in range(len(by_row))])  # (experts, ...)
    return out
