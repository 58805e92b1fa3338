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
_FUSED = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


def fused_parameters(ws: Iterable[str]) -> list[str]:
    """transformers' parameter names (gate_up_proj, down_proj) that hold our expert projections ``ws``."""
    return sorted({_FUSED[w] for w in ws}, reverse=True)  # gate_up_proj first: PEFT's wrapping order


def fuse_expert_weights(
    weights: Iterable[tuple[str, torch.Tensor]], num_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) pairs with each layer's per-expert ``weight`` tensors replaced by transformers'
    ``layers.N.experts.gate_up_proj`` / ``down_proj`` (our name stem, HF leaf), emitted as soon as a
    layer's 3 x ``num_experts`` weights have all arrived; other tensors pass through. Peak extra memory
    is the experts of the layers in flight (one layer when the input is grouped by layer)."""
    pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for key, tensor in weights:
        m = EXPERT_KEY.fullmatch(key)
        if m is None or m.group(4) != "weight":
            yield key, tensor
            continue
        layer, expert, w, _ = m.groups()
        parts = pending.setdefault(layer, {})
        parts[(w, int(expert))] = tensor
        if len(parts) == 3 * num_experts:
            del pending[layer]
            yield from _fused(layer, parts, num_experts)
    if pending:
        layer, parts = next(iter(pending.items()))
        missing = sorted(f"experts.{e}.{w}" for w in ("w1", "w2", "w3") for e in range(num_experts)
                         if (w, e) not in parts)
        raise ValueError(
            f"layer {layer}'s routed experts are incomplete: no weight for {missing[:4]} ({len(missing)} missing) "
            f"of {num_experts} experts; the checkpoint or base folder is truncated."
        )


def _fused(
    layer: str, parts: dict[tuple[str, int], torch.Tensor], num_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    experts = range(num_experts)
    # (experts, 2 * hidden, dim): gate (w1) rows, then up (w3) rows, as Mistral4Experts chunks them.
    gate_up = torch.stack([torch.cat([parts[("w1", e)], parts[("w3", e)]]) for e in experts])
    yield f"layers.{layer}.experts.gate_up_proj", gate_up
    down = torch.stack([parts[("w2", e)] for e in experts])  # (experts, dim, hidden)
    yield f"layers.{layer}.experts.down_proj", down


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
            raise ValueError(f"the adapter of routed experts' {w} is missing for expert(s) {sorted(set(absent))[:4]}; "
                             "the adapter file is incomplete.")
    out = {}
    params = fused_parameters(ws)
    for param in params:
        name = "base_layer." if param != params[-1] else ""  # the inner wrapper (see the module docstring)
        halves = [w for w in (("w1", "w3") if param == "gate_up_proj" else ("w2",)) if w in ws]
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
