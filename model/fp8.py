"""Mistral's native FP8 releases: read as the training precision, one tensor at a time.

A release quantized to FP8 says so in ``params.json``::

    "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}

and its ``consolidated*.safetensors`` hold, for each quantized linear ``M`` (``layers.N.attention.wq``,
``layers.N.feed_forward.w1``, ...):

- ``M.weight``: ``float8_e4m3fn`` values,
- ``M.qscale_weight``: the dequantization scale, a scalar per tensor (or one per output row), so
  that the real weight is ``M.weight.float() * M.qscale_weight``,
- ``M.qscale_act``: the static input-activation scale of an FP8 x FP8 inference matmul (absent when
  ``qscheme_act`` is ``NO_SCALES``); also ``*.kv_fake_quantizer.qscale_act`` and the like for an
  FP8 KV cache.

This is how vLLM reads them (its Mistral config remapping turns the block into ``quant_method: fp8``
with static or dynamic activations, and its loader maps ``qscale_weight``/``qscale_act`` to
``weight_scale``/``input_scale``, permuting a per-row ``wq``/``wk`` scale with the rows of its weight
for its own layout). Tensors without a scale (embeddings, norms, usually ``output``) stream unchanged.
Mistral Small 4 and Mistral Large 3 use the same names on every stored tensor, one expert at a time
(``layers.N.experts.E.w1.weight`` with ``layers.N.experts.E.w1.qscale_weight``, vLLM's
``MistralLarge3ForCausalLM`` mapping), so each expert is dequantized with its own scale before the
loader stacks it; whatever is stored unquantized (the router ``gate``, latent norms, ...) streams as it is.

Training computes in bf16/fp32 and LoRA needs the base weight in the compute dtype, so every FP8
weight is dequantized in float32 as it streams and the caller casts it to the training dtype: the
frozen base costs the training precision's bytes, not FP8's. Keeping FP8 as the frozen base (FP8
matmuls on GPUs that have them) is not implemented.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FP8_FORMATS = {"fp8_e4m3": torch.float8_e4m3fn}
ACTIVATION_SCHEMES = ("TENSOR", "NO_SCALES")  # static per-tensor scales, or dynamic (none stored)
WEIGHT_SCALE = ".qscale_weight"
ACTIVATION_SCALE = ".qscale_act"
DEQUANTIZED_DTYPE = torch.float32  # what an FP8 weight streams as; callers cast to their dtype
SAFETENSORS_FP8 = "F8_E4M3"  # the safetensors header's name for float8_e4m3fn


def is_scale(key: str) -> bool:
    """A scale tensor of an FP8 release: consumed (weights) or dropped (activations) while streaming."""
    return key.endswith((WEIGHT_SCALE, ACTIVATION_SCALE))


def check_quantization(block: Any, source: str) -> None:
    """Validate ``params.json``'s ``quantization`` block: only Mistral's FP8 weights are understood."""
    if block in (None, {}):
        return
    if not isinstance(block, dict):
        raise ValueError(f"{source}: 'quantization' must be an object, got {block!r}.")
    unknown = sorted(set(block) - {"qformat_weight", "qscheme_act"})
    if unknown:
        raise ValueError(
            f"{source}: 'quantization' has unknown key(s) {unknown}; only 'qformat_weight' and 'qscheme_act' "
            "(Mistral's FP8 releases) are implemented."
        )
    fmt = block.get("qformat_weight")
    if fmt not in FP8_FORMATS:
        raise ValueError(
            f"{source}: 'quantization.qformat_weight' is {fmt!r}; only {sorted(FP8_FORMATS)} weights can be "
            "loaded. Use the release's unquantized (bf16) weights instead."
        )
    scheme = block.get("qscheme_act")
    if scheme is not None and scheme not in ACTIVATION_SCHEMES:
        raise ValueError(
            f"{source}: 'quantization.qscheme_act' is {scheme!r}; only {list(ACTIVATION_SCHEMES)} are known."
        )


def weight_scales(path: Path) -> dict[str, torch.Tensor]:
    """Every ``*.qscale_weight`` of a safetensors file, by weight key, read before streaming: a scale may
    sit in another shard than its weight, and the scales are a few bytes each."""
    if path.suffix != ".safetensors":
        return {}  # FP8 releases are safetensors; a .pth holding FP8 weights fails as "no scale"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k.removesuffix(WEIGHT_SCALE) + ".weight": f.get_tensor(k) for k in f.keys() if k.endswith(WEIGHT_SCALE)}


def dequantize(weight: torch.Tensor, scale: torch.Tensor, key: str) -> torch.Tensor:
    """``weight * scale`` in float32, with a per-tensor scale or one per output row. An e4m3 value has 4
    significant bits, so this rounds once, in float32; the caller's cast to bf16 is the only other rounding."""
    if scale.numel() == 1:
        return weight.to(DEQUANTIZED_DTYPE) * scale.to(DEQUANTIZED_DTYPE).reshape(())
    if scale.numel() == weight.shape[0]:
        rows = scale.to(DEQUANTIZED_DTYPE).reshape(-1, *[1] * (weight.dim() - 1))  # (out, 1)
        return weight.to(DEQUANTIZED_DTYPE) * rows
    raise ValueError(
        f"'{key.removesuffix('.weight')}{WEIGHT_SCALE}' has {scale.numel()} values for a weight of shape "
        f"{tuple(weight.shape)}; expected one per tensor or one per output row."
    )


def dequantized(
    tensors: Iterable[tuple[str, torch.Tensor, Path]], scales: dict[str, torch.Tensor], source: str
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """The checkpoint's tensors with every FP8 weight dequantized to float32 and its scales consumed.

    A pass-through for an unquantized checkpoint. Activation scales (``*.qscale_act``) are dropped:
    they calibrate FP8 inputs of an inference matmul, and training multiplies bf16/fp32 activations.
    ``scales`` is ``weight_scales`` of the checkpoint's files; ``source`` names it in errors.
    """
    used = set()
    for key, tensor, path in tensors:
        if is_scale(key):
            continue
        if tensor.dtype.is_floating_point and tensor.element_size() == 1:  # any float8
            if tensor.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{path}: '{key}' is {tensor.dtype}; only float8_e4m3fn (fp8_e4m3) is supported.")
            if key not in scales:
                raise ValueError(
                    f"{path}: '{key}' is FP8 but the checkpoint has no "
                    f"'{key.removesuffix('.weight')}{WEIGHT_SCALE}'; the download is incomplete or not a "
                    "Mistral FP8 release."
                )
            used.add(key)
            tensor = dequantize(tensor, scales[key], key)
        yield key, tensor, path
    unused = sorted(set(scales) - used)
    if unused:
        raise ValueError(
            f"{source}: '{unused[0].removesuffix('.weight')}{WEIGHT_SCALE}' (and {len(unused) - 1} "
            "more) scale a weight that is not stored in FP8 or not stored at all; the checkpoint is inconsistent."
        )
