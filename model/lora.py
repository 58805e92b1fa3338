"""LoRA adapters on linear layers.

``LoRALinear`` keeps the frozen base weight (and bias, if the layer has one: the vision-language
adapter's) under the plain names ``weight`` and ``bias`` so a base checkpoint loads without hooks, and
adds ``lora_A`` (rank x in, Kaiming-uniform) and ``lora_B`` (out x rank, zeros):
``y = W x + b + scaling * B A dropout(x)``. The adapter key names (``layers.0.attention.wq.lora_A.weight``)
are the ones mistral-inference loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.args import LoraArgs

# (layer name such as "wq", in_features, out_features, bias=False) -> a linear layer
LinearFactory = Callable[..., nn.Module]

# Scopes of the vision side's targets (``vision_encoder.wq``, ``patch_merger.merging_layer``): matched by
# their full name only, so the plain names of the default list (``wq``, ``w1``) adapt the language model alone.
VISION_SCOPES = ("vision_encoder", "vision_language_adapter", "patch_merger")


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scaling = rank, scaling
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False
        )
        # Frozen like the weight: only lora_A and lora_B train.
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        init_lora_A_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype != base.dtype:
            # Adapters stored in another dtype than the base (fp32 adapters on a bf16 base outside
            # FSDP's mixed precision): compute the branch in the adapter dtype. Out of place, so
            # selective checkpointing can keep the base product as it was computed.
            update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b)
            return torch.add(base, update.to(base.dtype), alpha=self.scaling)
        u = F.linear(self.dropout(x), a)  # (..., rank)
        # B u accumulated onto the base output by the matmul itself (in place: the base output is
        # not needed for backward), so the (..., out) update is never materialised and re-read.
        # Return what addmm_ returns: under selective activation checkpointing a recomputed
        # addmm_ hands back its saved output instead of running (finetune/parallel.py).
        if torch.compiler.is_compiling():
            # Compiled code is functional anyway (inductor decides what is reused), and a
            # checkpointed region traced by torch.compile must not mutate.
            flat = torch.addmm(base.view(-1, self.out_features), u.reshape(-1, self.rank), b.t(), alpha=self.scaling)
            return flat.view(base.shape)
        if base.dim() == 2:  # (tokens, out): no view, whose in-place update autograd would copy
            return base.addmm_(u, b.t(), alpha=self.scaling)
        flat = base.view(-1, self.out_features).addmm_(u.reshape(-1, self.rank), b.t(), alpha=self.scaling)
        return flat.view(base.shape)

    def extra_repr(self) -> str:
        bias = ", bias" if getattr(self, "bias", None) is not None else ""  # stacked experts (model.experts) have none
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}{bias}"


def init_lora_A_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """lora_A's initialisation, in place: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    as nn.Linear and mistral-finetune do (lora_B starts at zero). A stacked (experts, rank, in)
    ``lora_A`` (``model.experts``) gets the same bound for every expert's matrix."""
    if weight.dim() == 2:
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    # kaiming_uniform_'s own arithmetic, with fan_in = in (it would count rank * in for a 3-D tensor).
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + 5)) / math.sqrt(weight.shape[-1])
    with torch.no_grad():
        return weight.uniform_(-bound, bound, generator=generator)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")


def freeze_all_but_lora(model: nn.Module) -> None:
    """Only adapter matrices train; base weights, norms, embeddings and the MoE gate stay frozen."""
    adapters = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter file's tensors (``lora.safetensors``), keyed ``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``: the names are a public contract (``tests/test_model.py``)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def lora_file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``lora_state_dict`` of a model on one device under the adapter file's names: one adapter per
    expert (``model.keys``), as training writes ``lora.safetensors``."""
    from model.keys import to_checkpoint_names

    return to_checkpoint_names(lora_state_dict(model), model.args)


def merge_delta(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, computed in float32 and cast to W's dtype (every merge: ``model.merge``)."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def is_target(lora: LoraArgs | None, name: str) -> bool:
    """Whether ``lora.target_modules`` selects layer ``name``: a leaf name (``wq``, ``w1``) or a scoped
    one (``experts.w1``, ``shared_experts.w1``), matched by itself or by its leaf. A vision layer
    (``vision_encoder.wq``, ``VISION_SCOPES``) is matched by its full name only."""
    if lora is None or not lora.enable:
        return False
    scope, _, leaf = name.rpartition(".")
    return name in lora.target_modules or (scope not in VISION_SCOPES and leaf in lora.target_modules)


def linear_factory(lora: LoraArgs | None, scope: str = "") -> LinearFactory:
    """Builds LoRALinear for the targeted layer names, plain nn.Linear for the rest; ``scope``
    (``shared_experts.``) prefixes the names matched against ``lora.target_modules``."""

    def make(name: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        if is_target(lora, scope + name):
            return LoRALinear(in_features, out_features, rank=lora.rank, scaling=lora.scaling, dropout=lora.dropout,
                              bias=bias)
        return nn.Linear(in_features, out_features, bias=bias)

    return make
