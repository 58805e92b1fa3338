"""Routed experts of fine-grained MoE layers (Mistral Small 4) in transformers' fused layout.

transformers' ``Mistral4Experts`` holds a layer's routed experts as two parameters, ``gate_up_proj``
(experts, 2 * hidden, dim: w1's rows, then w3's) and ``down_proj`` (experts, dim, hidden), and has no
conversion mapping for mistral4: its checkpoints store those tensors, so an export writes them fused.
Our files name one expert per key (``layers.N.experts.E.w1.weight``, ``model.keys``).

PEFT adapts such a parameter with ``target_parameters`` (``lora.ParamWrapper``): one adapter per
parameter, ``lora_A`` (experts * r, in) read as (experts, r, in) and ``lora_B`` (out, r * experts)
read as (out, r, experts), expert e's update being ``lora_B[:, :, e] @ lora_A[e]`` times alpha / r
(``ParamWrapper.get_delta_weight``). Our w1 and w3 adapters (rank r each) become one gate_up adapter:
A1 stacked over A3 (rank 2r) and B block-diagonal [[B1, 0], [0, B3]], so the fused update is
[B1 A1; B3 A3] exactly; the adapter config gives it rank 2r and alpha 2 alpha (same scaling). With
only one of w1/w3 trained it keeps rank r, B padded with zero rows for the other half.

PEFT wraps the parameters of one module in registration order, gate_up_proj first, so when both are
targeted down_proj's wrapper is the outer one: its adapter is ``mlp.experts.lora_A.weight`` and
gate_up_proj's ``mlp.experts.base_layer.lora_A.weight``; a lone target is the outer one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

# A routed expert's weight or adapter in a fine-grained MoE file: layers.N.experts.E.w1.lora_A.weight
EXPERT_KEY = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(w[123])\.(weight|lora_A\.weight|lora_B\.weight)")
# transformers' fused parameter -> our projections it holds, in its row order.
_HALVES = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
_FUSED = {w: param for param, ws in _HALVES.items() for w in ws}


def fused_parameters(ws: Iterable[str]) -> list[str]:
    """transformers' parameter names (gate_up_proj, down_proj) that hold our expert projections ``ws``."""
    return sorted({_FUSED[w] for w in ws}, reverse=True)  # gate_up_proj first: PEFT's wrapping order


class _Fused:
    """One layer's fused parameter being filled: every expert's tensor is copied into its slot on arrival
    (and can be freed), so a layer costs the fused tensor, not a second copy of its pieces."""

    def __init__(self, ws: tuple[str, ...], num_experts: int) -> None:
        self.ws, self.num_experts = ws, num_experts
        self.tensor: torch.Tensor | None = None
        self.filled: set[tuple[str, int]] = set()

    def add(self, w: str, expert: int, piece: torch.Tensor) -> bool:
        """Copy ``piece`` (out, in) into its rows; True once every slot is filled."""
        if self.tensor is None:  # (experts, len(ws) * out, in), shaped by the first piece
            self.tensor = piece.new_empty(self.num_experts, len(self.ws) * piece.shape[0], piece.shape[1])
        rows = self.tensor.shape[1] // len(self.ws)
        at = self.ws.index(w) * rows
        slot = self.tensor[expert, at:at + rows]
        if slot.shape != piece.shape:
            raise ValueError(f"routed expert {expert}'s {w} weight is {tuple(piece.shape)} but the layer's other "
                             f"experts' are {tuple(slot.shape)}; the checkpoint or base folder is damaged.")
        slot.copy_(piece)
        self.filled.add((w, expert))
        return len(self.filled) == len(self.ws) * self.num_experts


def fuse_expert_weights(
    weights: Iterable[tuple[str, torch.Tensor]], num_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) pairs with each layer's per-expert ``weight`` tensors replaced by transformers'
    ``layers.N.experts.gate_up_proj`` (experts, 2 * hidden, dim: gate (w1) rows, then up (w3) rows, as
    Mistral4Experts chunks them) and ``down_proj`` (experts, dim, hidden), named with our stem and HF's
    leaf; each is emitted as soon as its last expert has arrived, other tensors pass through. Extra memory:
    the fused tensors being filled (one or two when the input is grouped by layer)."""
    pending: dict[tuple[str, str], _Fused] = {}
    for key, tensor in weights:
        m = EXPERT_KEY.fullmatch(key)
        if m is None or m.group(4) != "weight":
            yield key, tensor
            continue
        layer, expert, w, _ = m.groups()
        param = _FUSED[w]
        if (layer, param) not in pending:
            pending[(layer, param)] = _Fused(_HALVES[param], num_experts)
        fused = pending[(layer, param)]
        if fused.add(w, int(expert), tensor):
            del pending[(layer, param)]
            yield f"layers.{layer}.experts.{param}", fused.tensor
    if pending:
        (layer, param), fused = next(iter(pending.items()))
        missing = sorted(f"experts.{e}.{w}" for w in fused.ws for e in range(num_experts)
                         if (w, e) not in fused.filled)
        raise ValueError(
            f"layer {layer}'s routed experts are incomplete: no weight for {missing[:4]} ({len(missing)} missing) "
            f"of {num_experts} experts; the checkpoint or base folder is truncated."
        )


def peft_expert_adapters(
    adapters: dict[tuple[str, int, str], torch.Tensor], num_experts: int
) -> dict[str, torch.Tensor]:
    """One layer's per-expert adapters {(w, expert, "A"|"B"): tensor} -> PEFT's ParamWrapper tensors, named
    under the layer's ``mlp.experts`` module (``base_layer.lora_A.weight``: (experts * r', dim) for
    gate_up_proj, r' = r, or 2r when both w1 and w3 are trained). Every expert of a trained projection
    must be present."""
    ws = sorted({w for w, _, _ in adapters})
    for w in ws:
        absent = [e for e in range(num_experts) for ab in "AB" if (w, e, ab) not in adapters]
        if absent:
            raise ValueError(f"the adapter of routed experts' {w} is missing for expert(s) "
                             f"{sorted(set(absent))[:4]}; the adapter file is incomplete.")
    out = {}
    params = fused_parameters(ws)
    for param in params:
        name = "base_layer." if param != params[-1] else ""  # the inner wrapper (see the module docstring)
        halves = [w for w in _HALVES[param] if w in ws]
        a_rows, b_cols = [], []
        for e in range(num_experts):
            a_parts = [adapters[(w, e, "A")] for w in halves]  # each (r, in)
            b_parts = [adapters[(w, e, "B")] for w in halves]  # each (out, r)
            if param == "gate_up_proj" and len(halves) == 1:  # the untrained half: zero rows of the fused output
                zero = torch.zeros_like(b_parts[0])
                b_parts = [b_parts[0], zero] if halves == ["w1"] else [zero, b_parts[0]]
                b_cols.append(torch.cat(b_parts))  # (2 * hidden, r)
            else:
                b_cols.append(torch.block_diag(*b_parts))  # (out, r'), block-diagonal for w1 + w3
            a_rows.append(torch.cat(a_parts))  # (r', in)
        a = torch.stack(a_rows)  # (experts, r', in)
        b = torch.stack(b_cols)  # (experts, out, r')
        out[f"{name}lora_A.weight"] = a.reshape(-1, a.shape[-1])  # (experts * r', in)
        out[f"{name}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)  # (out, r' * experts)
    return out
