"""RMSNorm, shared by the blocks (``model.transformer``) and latent attention's inner norms (``model.mla``)."""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out: it saves the input in its own dtype and the
    (tokens, 1) float32 rsqrt, not a float32 copy of the input, and runs fewer element-wise
    passes than autograd would (timings: benchmarks/bench_rms_norm.py, docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 (float64 stays), then cast back before the (model-dtype) gain, as
        # Mistral does.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # float32, this function's own buffer
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.type_as(x)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(rstd.dtype)
        # d/dx (x * rstd) applied to grad_normed: rstd * (g - normed * mean(g * normed)).
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x.type_as(x), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)
