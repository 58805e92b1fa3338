"""Routed experts as stacked weights, computed with grouped matrix products.

An MoE layer's experts are three ``(experts, out, in)`` tensors (``w1``, ``w2``, ``w3``) rather than
one module per expert: tokens are sorted by expert and every expert's product runs in one
``torch._grouped_mm`` call (torch's grouped GEMM: CUTLASS kernels on recent GPUs, its own loop
elsewhere, CPU included), never a Python loop over 128 experts. Stacked, the experts are also what
FSDP2 shards along the expert dimension like any other parameter.

LoRA on experts is stacked the same way: ``lora_A`` (experts, rank, in) and ``lora_B`` (experts,
out, rank), one adapter per expert, applied with two more grouped products. Checkpoint files name
each expert separately (``layers.N.experts.E.w1.weight``); ``model.checkpoint`` maps those keys to
rows of the stacked tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.args import LoraArgs
from model.lora import LoRALinear, is_target

# torch._grouped_mm needs every row stride to be a multiple of 16 bytes, and one of these dtypes: its
# CPU implementation takes the three, its CUDA kernels (and its shape checks) bfloat16 only.
_ALIGN_BYTES = 16
_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``x[ends[e-1]:ends[e]]`` times ``weight[e].T`` for every expert e: x (rows, in) sorted by
    expert, weight (experts, out, in), ``ends`` (experts,) int32 cumulative row counts -> (rows, out).
    The counts stay on the device: no host synchronisation."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()):
        # float64 (reference checks), float32/float16 on a GPU: one product per expert, the row counts
        # read on the host (a synchronisation, and a loop over experts: train in bf16 on GPUs).
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        return torch.cat([rows @ w.T for rows, w in zip(x.split(counts), weight, strict=True)])
    out_features, in_features = weight.shape[-2:]
    step = _ALIGN_BYTES // x.element_size()
    pad_in, pad_out = -in_features % step, -out_features % step
    if pad_in or pad_out:
        # Widths that are not a multiple of 16 bytes (tiny test models, a small LoRA rank in bf16):
        # zero columns change no product. Released models' widths are multiples of 128.
        x = F.pad(x, (0, pad_in))  # (rows, in + pad_in)
        weight = F.pad(weight, (0, pad_in, 0, pad_out))  # (experts, out + pad_out, in + pad_in)
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)  # (rows, out + pad_out)
    return y[:, :out_features] if pad_out else y


class _Stacked(nn.Module):
    """Holds one (experts, a, b) tensor as ``weight``: the ``lora_A.weight`` name of a LoRA layer."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class GroupedLinear(nn.Module):
    """Frozen-or-trained stacked expert weights without an adapter."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x, self.weight, ends)


class GroupedLoRALinear(LoRALinear):
    """``LoRALinear`` for stacked experts: y = W_e x + scaling * B_e A_e dropout(x) for the rows of
    expert e. A ``LoRALinear`` to everything that collects adapters (``lora_modules``), with 3-D
    weights; NF4 replaces it by ``model.quant.NF4GroupedLoRALinear``."""

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, *, rank: int, scaling: float, dropout: float = 0.0
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.scaling = num_experts, rank, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)
        self.lora_A = _Stacked(num_experts, rank, in_features)
        self.lora_B = _Stacked(num_experts, out_features, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, ends: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``u``: ``A dropout(x)`` (rows, rank) if the caller computed it already (``GroupedExperts``)."""
        base = grouped_mm(x, self.weight, ends)  # (rows, out)
        a, b = self.lora_A.weight, self.lora_B.weight
        # Adapters in another dtype than the base (outside FSDP's mixed precision) compute in theirs.
        if u is None:
            u = grouped_mm(self.dropout(x).to(a.dtype), a, ends)  # (rows, rank)
        update = grouped_mm(u, b, ends)  # (rows, out)
        return torch.add(base, update.to(base.dtype), alpha=self.scaling)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, {super().extra_repr()}"


def grouped_linear(
    lora: LoraArgs | None, name: str, num_experts: int, in_features: int, out_features: int
) -> nn.Module:
    """A ``GroupedLoRALinear`` if ``lora`` targets ``name`` (``experts.w1`` ...), else a ``GroupedLinear``."""
    if is_target(lora, name):
        return GroupedLoRALinear(num_experts, in_features, out_features, rank=lora.rank, scaling=lora.scaling,
                                 dropout=lora.dropout)
    return GroupedLinear(num_experts, in_features, out_features)


class GroupedExperts(nn.Module):
    """SwiGLU experts ``w2_e(silu(w1_e x) * w3_e x)`` over rows already sorted by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, lora: LoraArgs | None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = grouped_linear(lora, "experts.w1", num_experts, dim, hidden_dim)
        self.w2 = grouped_linear(lora, "experts.w2", num_experts, hidden_dim, dim)
        self.w3 = grouped_linear(lora, "experts.w3", num_experts, dim, hidden_dim)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x (rows, dim) sorted by expert, ``ends`` (experts,) int32 -> (rows, dim)."""
        w1, w3 = self.w1, self.w3
        if (isinstance(w1, GroupedLoRALinear) and isinstance(w3, GroupedLoRALinear) and w1.rank == w3.rank
                and isinstance(w1.dropout, nn.Identity) and isinstance(w3.dropout, nn.Identity)
                and w1.lora_A.weight.dtype == w3.lora_A.weight.dtype):
            # Both adapters read the same rows: one grouped product for both A's (each grouped call
            # costs a kernel call per expert, which dominates at a small rank on CPU).
            a = torch.cat([w1.lora_A.weight, w3.lora_A.weight], dim=1)  # (experts, 2 rank, dim)
            u1, u3 = grouped_mm(x.to(a.dtype), a, ends).split(w1.rank, dim=-1)  # (rows, rank) each
            h1, h3 = w1(x, ends, u1), w3(x, ends, u3)
        else:
            h1, h3 = w1(x, ends), w3(x, ends)
        return self.w2(F.silu(h1) * h3, ends)

