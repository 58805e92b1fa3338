"""Cross-entropy over target tokens, computed chunk by chunk from hidden states.

The output layer and the loss are fused: for each chunk of target rows we compute the logits,
the loss, and right away the gradients with respect to the hidden states (and the output weight
when it trains), then drop the logits. Peak memory is one chunk of float32 logits (plus its
compute-dtype copy) instead of ``tokens x vocab`` (131k for Tekken), and nothing is recomputed
in backward. Only rows that are targets are ever projected onto the vocabulary.

The loss is a *sum* over target tokens; the caller divides by the global number of targets so
micro-batches and ranks are weighted by tokens, not equally.
"""

from __future__ import annotations

import torch
from torch import nn

from model.transformer import Transformer


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = hc @ weight.t()  # (chunk, vocab)
            target_logits = logits.gather(1, tc[:, None]).to(acc)
            # One float32 buffer, transformed in place into the softmax: fewer passes over the
            # chunk than log_softmax followed by exp, and one float32 buffer instead of two
            # (docs/benchmarks.md: the loss's peak 1.76 -> 1.23 GB at vocab 131072).
            probs = logits.to(acc)  # the same tensor when the model computes in float32
            del logits
            row_max = probs.amax(dim=-1, keepdim=True)
            sums = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            # -log softmax(target) = max + log(sum exp(logits - max)) - target logit
            loss += (row_max + sums.log() - target_logits).sum()
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - one_hot, built in place.
                grad_logits = probs.div_(sums)
                grad_logits[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                g = grad_logits.to(h.dtype)  # (chunk, vocab)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).to(acc)
                del grad_logits, g
            # Free this chunk before the next one is computed: peak stays at one chunk.
            del probs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """sum_i CE(h_i @ weight.T, targets_i) in float32, never materialising all logits."""
    return _LinearCrossEntropySum.apply(h, weight, targets, chunk_size)


class CausalLMLoss(nn.Module):
    """The transformer plus its loss as one module.

    Training shards this module as FSDP's root, so the embedding, final norm and output layer are
    gathered by the root's hooks for the whole forward and backward, including the fused loss.
    """

    def __init__(self, model: Transformer, chunk_size: int = 2048) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self, input_ids: torch.Tensor, seqlens: list[int], targets: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """Summed natural-log cross-entropy over the positions where ``target_mask`` is True."""
        h = self.model.hidden_states(input_ids, seqlens)  # (tokens, dim)
        rows = target_mask.nonzero().squeeze(1)  # (targets,)
        return linear_cross_entropy_sum(
            h.index_select(0, rows), self.model.output.weight, targets.index_select(0, rows), self.chunk_size
        )
