"""QLoRA: LoRA adapters on a frozen base stored as 4-bit NormalFloat (NF4) with double quantization.

``NF4LoRALinear`` is a ``LoRALinear`` whose frozen ``weight`` holds the NF4 codes of the
(out, in) base weight, packed two per byte into a flat ``(n, 1)`` tensor of ``storage_dtype``
(the training precision: 8 codes per float32, 4 per bfloat16). Storing codes in the compute dtype
is what lets FSDP2 shard the packed weight like any other frozen parameter and makes its
mixed-precision cast a no-op, so the bits are all-gathered untouched. The quantization statistics
(one uint8 absmax per 64 weights, itself quantized against one float32 scale per 256 absmaxes —
"double quantization") are small non-persistent buffers, replicated on every rank.

Storage, quantization and the matmul (dequantize to the input's dtype, then multiply; the input
gradient dequantizes again rather than keeping a full-precision copy) are bitsandbytes'; it is an
optional dependency (``pip install '.[qlora]'``), imported only when a quantized layer is used.
Adapters stay float32 and their key names do not change, so ``lora.safetensors`` is the same file
as without quantization.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType

import torch
from torch import nn

from model.experts import GroupedLoRALinear, _Stacked, grouped_mm
from model.lora import LoRALinear, lora_modules

BLOCKSIZE = 64  # weights per absmax (the QLoRA paper's choice)
NESTED_BLOCKSIZE = 256  # absmaxes per float32 scale of the double quantization
QUANTIZATIONS = ("none", "nf4")
INSTALL_HINT = "pip install '.[qlora]'  (bitsandbytes>=0.45)"


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or an ImportError that says how to install it."""
    # On CPUs with AVX512-BF16, bitsandbytes logs a warning at import when the optional `kernels`
    # package (a Hub download) is absent; that kernel only serves inference, so keep it quiet.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            f"4-bit quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from e
    return bitsandbytes


def quantized_weight_bytes(numel: int) -> int:
    """Bytes that one NF4 weight of ``numel`` elements occupies, statistics included.

    4 bits per weight, one uint8 absmax per 64 weights, one float32 per 256 absmaxes, the 256-entry
    float32 code book of the absmax quantization, the 16-entry NF4 code book and the offset:
    about 0.516 bytes per weight (4.13 bits), versus 2 for bfloat16.
    """
    blocks = math.ceil(numel / BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * (256 + 16 + 1)


def quantize_nf4(
    weight: torch.Tensor, storage_dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NF4 codes of an (out, in) weight packed into ``(n, 1)`` elements of ``storage_dtype``, and the
    statistics that dequantize them (the buffers of ``NF4LoRALinear``)."""
    F = import_bitsandbytes().functional
    packed, state = F.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4", quant_storage=storage_dtype
    )
    stats = {
        "absmax": state.absmax,  # uint8, one per block of 64 weights
        "offset": state.offset.reshape(
            ()
        ),  # float32 mean subtracted from the absmaxes before quantizing them
        "code": state.code,  # float32 (16,): the NF4 values
        "nested_absmax": state.state2.absmax,  # float32, one per 256 absmaxes
        "nested_code": state.state2.code,  # float32 (256,): the 8-bit code book of the absmaxes
    }
    return packed, stats


class NF4LoRALinear(LoRALinear):
    """y = dequant(W_nf4) x + b + scaling * B A dropout(x), computed in the dtype of x; the bias, if any
    (the vision-language adapter's), stays unquantized and frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        bias: bool = False,
        storage_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if in_features % BLOCKSIZE:
            # Every released Mistral model qualifies (dims are multiples of 128). Blocks must not
            # straddle rows: bitsandbytes 0.50's CPU dequantization assumes they do not.
            raise ValueError(
                f"NF4 needs in_features to be a multiple of {BLOCKSIZE}, got {in_features}; "
                "use quantization: none for this model."
            )
        device = torch.empty(0).device if device is None else device  # honours a `with torch.device(...)`
        with torch.device("meta"):  # no full-precision weight is ever allocated
            super().__init__(in_features, out_features, rank=rank, scaling=scaling, dropout=dropout, bias=bias)
        if bias:  # the bias (vision-language adapter) stays full precision and frozen, as in LoRALinear
            self.bias = nn.Parameter(torch.empty(out_features, dtype=storage_dtype, device=device), requires_grad=False)
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        self.reset_lora_parameters()
        numel = in_features * out_features
        codes_per_element = 2 * storage_dtype.itemsize
        blocks = numel // BLOCKSIZE
        self.weight = nn.Parameter(
            torch.empty(numel // codes_per_element, 1, dtype=storage_dtype, device=device),
            requires_grad=False,
        )
        # Non-persistent: state dicts (and so DCP resume state) hold only the adapters' keys.
        shapes = {
            "absmax": ((blocks,), torch.uint8),
            "offset": ((), torch.float32),
            "code": ((16,), torch.float32),
            "nested_absmax": ((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32),
            "nested_code": ((256,), torch.float32),
        }
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device), persistent=False)

    @torch.no_grad()
    def set_quant_stats(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            getattr(self, name).copy_(value)

    def quant_state(self, dtype: torch.dtype):
        """A bitsandbytes QuantState over this layer's buffers; ``dtype`` is what dequantization returns."""
        F = import_bitsandbytes().functional
        nested = F.QuantState(
            absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        return F.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=BLOCKSIZE,
            quant_type="nf4",
            dtype=dtype,
            offset=self.offset,
            state2=nested,
        )

    def dequantize(
        self, packed: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The (out, in) base weight; ``packed`` defaults to ``weight`` (pass the gathered full tensor
        when ``weight`` is a shard)."""
        packed = self.weight if packed is None else packed
        dtype = dtype or packed.dtype
        return import_bitsandbytes().functional.dequantize_4bit(packed.detach(), self.quant_state(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = import_bitsandbytes()
        # (tokens, in) @ dequant(W)^T -> (tokens, out); bitsandbytes takes the packed weight transposed.
        base = bnb.matmul_4bit(x, self.weight.t(), quant_state=self.quant_state(x.dtype))
        a = self.lora_A.weight
        update = nn.functional.linear(
            nn.functional.linear(self.dropout(x).to(a.dtype), a), self.lora_B.weight
        )
        if self.bias is not None:
            base = base + self.bias.to(base.dtype)
        return base + (update * self.scaling).to(base.dtype)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The shape of the base weight the codes stand for (the checkpoint's)."""
        return (self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nf4 (storage {self.weight.dtype})"


class NF4GroupedLoRALinear(NF4LoRALinear):
    """``GroupedLoRALinear`` (stacked experts, ``model.experts``) over an NF4 base: the (experts, out, in)
    stack is quantized as one (experts * out, in) weight, its codes stored as (experts, n) rows so
    that FSDP shards them by expert like the unquantized stack. Each forward dequantizes the whole
    stack once (every expert gets tokens in a training batch) for one grouped product; backward
    dequantizes again instead of keeping the full-precision stack (``_NF4GroupedMM``)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        storage_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        # The parent's layout for one (experts * out, in) weight; the adapters are then stacked.
        super().__init__(in_features, num_experts * out_features, rank=rank, scaling=scaling, dropout=dropout,
                         storage_dtype=storage_dtype, device=device)
        device = self.weight.device
        self.num_experts, self.out_features = num_experts, out_features
        self.weight = nn.Parameter(self.weight.view(num_experts, -1), requires_grad=False)  # (experts, codes)
        self.lora_A = _Stacked(num_experts, rank, in_features).to(device)
        self.lora_B = _Stacked(num_experts, out_features, rank).to(device)
        self.reset_lora_parameters()

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.out_features, self.in_features)

    def quant_state(self, dtype: torch.dtype):
        state = super().quant_state(dtype)
        state.shape = torch.Size((self.num_experts * self.out_features, self.in_features))
        return state

    def dequantize(self, packed: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (experts, out, in) base stack; ``packed`` defaults to ``weight`` (pass the gathered codes
        when ``weight`` is a shard)."""
        packed = self.weight if packed is None else packed
        flat = super().dequantize(packed.reshape(-1, 1), dtype)  # (experts * out, in)
        return flat.view(self.full_shape)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        base = _NF4GroupedMM.apply(x, self.weight, ends, self)  # (rows, out)
        a, b = self.lora_A.weight, self.lora_B.weight
        update = grouped_mm(grouped_mm(self.dropout(x).to(a.dtype), a, ends), b, ends)  # (rows, out)
        return torch.add(base, update.to(base.dtype), alpha=self.scaling)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + super().extra_repr()


class _NF4GroupedMM(torch.autograd.Function):
    """``grouped_mm(x, dequant(codes), ends)`` whose backward dequantizes the frozen stack again rather
    than autograd saving the (experts, out, in) full-precision copy for every layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, ends: torch.Tensor, layer: NF4GroupedLoRALinear):
        ctx.save_for_backward(codes, ends)
        ctx.layer = layer
        return grouped_mm(x, layer.dequantize(codes, x.dtype), ends)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, ends = ctx.saved_tensors
        weight = ctx.layer.dequantize(codes, grad.dtype)  # (experts, out, in)
        # dx rows of expert e = grad rows @ W_e: the grouped product with each W_e^T's transpose.
        return grouped_mm(grad.contiguous(), weight.transpose(-2, -1), ends), None, None, None


def quantize_lora_layers(model: nn.Module, storage_dtype: torch.dtype) -> None:
    """Replace every LoRALinear of ``model`` by an NF4LoRALinear (stacked experts: NF4GroupedLoRALinear),
    in place.

    On the meta device (training builds) the new layers are empty, to be filled while the
    checkpoint streams in; otherwise each base weight is quantized and the adapters are copied.
    """
    for name, old in lora_modules(model).items():
        if isinstance(old, NF4LoRALinear):
            continue
        meta = old.weight.is_meta
        common = dict(rank=old.rank, scaling=old.scaling, dropout=getattr(old.dropout, "p", 0.0),
                      storage_dtype=storage_dtype, device="meta" if meta else old.weight.device)
        if isinstance(old, GroupedLoRALinear):  # stacked experts
            new = NF4GroupedLoRALinear(old.num_experts, old.in_features, old.out_features, **common)
        else:
            new = NF4LoRALinear(old.in_features, old.out_features, bias=old.bias is not None, **common)
        if not meta:
            packed, stats = quantize_nf4(old.weight.detach().reshape(-1, old.in_features), storage_dtype)
            with torch.no_grad():
                new.weight.copy_(packed.view(new.weight.shape))
                new.lora_A.weight.copy_(old.lora_A.weight)
                new.lora_B.weight.copy_(old.lora_B.weight)
                if getattr(old, "bias", None) is not None:  # stacked experts have none
                    new.bias.copy_(old.bias)
            new.set_quant_stats(stats)
        new.train(old.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
