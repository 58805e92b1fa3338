"""Cross-entropy over target tokens, computed chunk by chunk from hidden states.

The output layer and the loss are fused: for each chunk of target rows we compute the logits,
the loss, and right away the gradients with respect to the hidden states (and the output weight
when it trains), then drop the logits. Peak memory is one chunk of compute-dtype logits, which
then hold their own gradient, plus one float32 block of them (``block_rows``), instead of
``tokens x vocab`` float32 logits (131k for Tekken); nothing is recomputed in backward. Only rows
that are targets are ever projected onto the vocabulary.

The loss is a *sum* over target tokens; the caller divides by the global number of targets so
micro-batches and ranks are weighted by tokens, not equally.
"""

from __future__ import annotations

import torch
from torch import nn

from model.transformer import Transformer

# Logits turned into the softmax at once, in float32. The element-wise passes (max, exp, sum,
# divide, casts) are memory-bound: on a CPU a 4 MB block stays in cache between passes, where a
# whole chunk would stream from DRAM at every pass (docs/benchmarks.md); a GPU wants large blocks
# (each pass is a kernel launch), and there the block only bounds the float32 buffer.
BLOCK_LOGITS = {"cpu": 1 << 20}  # 4 MB of float32
DEFAULT_BLOCK_LOGITS = 1 << 24  # 64 MB of float32


def block_rows(device_type: str, vocab_size: int, chunk_size: int) -> int:
    """Rows of a chunk turned into the softmax at once (in float32)."""
    return min(chunk_size, max(1, BLOCK_LOGITS.get(device_type, DEFAULT_BLOCK_LOGITS) // vocab_size))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, block: int
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        # One float32 buffer for every block: allocated per block, it comes back from the kernel as
        # fresh pages, and faulting them in costs the block casts far more than the casts themselves
        # (docs/benchmarks.md).
        buffer = None
        if acc != h.dtype:
            buffer = torch.empty((min(block, h.shape[0]), weight.shape[0]), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = hc @ weight.t()  # (chunk, vocab), compute dtype
            for b in range(0, logits.shape[0], block):
                rows, tb = logits[b : b + block], tc[b : b + block]
                target_logits = rows.gather(1, tb[:, None]).to(acc)
                # The block in float32, turned into the softmax in place:
                # -log softmax(target) = max + log(sum exp(logits - max)) - target logit.
                probs = rows if buffer is None else buffer[: rows.shape[0]].copy_(rows)
                row_max = probs.amax(dim=-1, keepdim=True)
                sums = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
                loss += (row_max + sums.log() - target_logits).sum()
                if need_h or need_w:
                    # d(sum of losses)/d(logits) = softmax - one_hot, written over the logits.
                    probs.div_(sums)
                    probs[torch.arange(tb.shape[0], device=tb.device), tb] -= 1.0
                    if probs is not rows:
                        rows.copy_(probs)
            if need_h or need_w:  # the logits now hold their gradient, in the compute dtype
                if need_h:
                    grad_h[start : start + chunk_size] = logits @ weight
                if need_w:
                    grad_w += (logits.t() @ hc).to(acc)
            # Free this chunk before the next one is computed: peak stays at one chunk.
            del logits
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
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048, block: int | None = None
) -> torch.Tensor:
    """sum_i CE(h_i @ weight.T, targets_i) in float32, never materialising all logits.

    ``chunk_size`` rows are projected onto the vocabulary at once, in the compute dtype; ``block``
    rows of those are turned into the softmax at once in float32 (default: ``block_rows``).
    """
    if block is None:
        block = block_rows(h.device.type, weight.shape[0], chunk_size)
    return _LinearCrossEntropySum.apply(h, weight, targets, chunk_size, block)


class TransformerWithLoss(nn.Module):
    """The transformer plus its loss as one module.

    Training shards this module as FSDP's root, so the embedding, final norm and output layer are
    gathered by the root's hooks for the whole forward and backward, including the fused loss.
    """

    def __init__(self, transformer: Transformer, chunk_size: int = 2048) -> None:
        super().__init__()
        self.transformer = transformer
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        seqlens: list[int],
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        images: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Summed natural-log cross-entropy over the positions where ``target_mask`` is True; ``images``
        are the row's pictures in order of their ``[IMG]`` runs (a model built with ``vision=True``). A
        batch without pictures still runs the vision side, on a blank picture (``always_encode``), so that
        every rank joins the vision encoder's FSDP collectives in the same order whatever its batch holds."""
        h = self.transformer.hidden_states(input_ids, seqlens, images, always_encode=True)  # (tokens, dim)
        rows = target_mask.nonzero().squeeze(1)  # (targets,)
        return linear_cross_entropy_sum(
            h.index_select(0, rows), self.transformer.output.weight, targets.index_select(0, rows), self.chunk_size
        )
