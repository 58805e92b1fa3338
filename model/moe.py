"""Mixture-of-experts feed-forward: Mixtral's and the fine-grained one of Mistral Small 4.

The router ``gate`` scores every expert; the scores are softmaxed over all experts (float32), the
top-k experts are chosen (within the best ``num_expert_groups_per_tok`` groups when the experts are
grouped), and their weights renormalised to sum to one and scaled by ``routed_scale``, as
transformers' ``Mistral4TopkRouter`` (and vLLM) compute them. For Mixtral (one group, scale 1) this
equals the softmax of the top-k logits that mistral-inference takes. Shared experts, if any, see
every token and are added. No auxiliary load-balancing loss, matching mistral-inference and
mistral-finetune.

The routed experts run as grouped matrix products over the tokens sorted by expert
(``model.experts``); every expert's weights take part in every forward, so all FSDP ranks and
checkpointed recomputations follow the same path through the parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from model.args import LoraArgs, ModelArgs
from model.experts import GroupedExperts
from model.lora import LinearFactory, linear_factory

# Rows per expert are rounded up to a multiple of this for bf16/fp16 on CPU (``MoeLayer.forward``).
CPU_ROW_MULTIPLE = 16


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.w1 = make_linear("w1", dim, hidden_dim)
        self.w2 = make_linear("w2", hidden_dim, dim)
        self.w3 = make_linear("w3", dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, lora: LoraArgs | None) -> None:
        super().__init__()
        moe = args.moe
        assert moe is not None
        self.num_experts, self.top_k = moe.num_experts, moe.num_experts_per_tok
        self.groups, self.groups_per_tok, self.routed_scale = (
            moe.num_expert_groups, moe.num_expert_groups_per_tok, moe.routed_scale
        )
        # The router is never a LoRA target (mistral-inference has no adapter for it).
        self.gate = nn.Linear(args.dim, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, args.dim, args.expert_hidden_dim, lora)
        if moe.num_shared_experts:
            shared_dim = args.expert_hidden_dim * moe.num_shared_experts
            self.shared_experts = FeedForward(args.dim, shared_dim, linear_factory(lora, scope="shared_experts."))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tokens, k) float32, experts (tokens, k) int64) for x (tokens, dim)."""
        scores = self.gate(x).float().softmax(dim=-1)  # (tokens, experts)
        choosable = scores
        if self.groups > 1:
            grouped = scores.view(-1, self.groups, self.num_experts // self.groups)  # (tokens, groups, per group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (tokens, groups): best two per group
            best = group_scores.topk(self.groups_per_tok, dim=-1).indices  # (tokens, groups_per_tok)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (tokens, groups)
            choosable = (grouped * keep[..., None]).view_as(scores)  # other groups' experts scored 0
        experts = choosable.topk(self.top_k, dim=-1).indices  # (tokens, k)
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scale
        return weights, experts

    def rows_by_expert(self, experts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Where each (token, choice) goes in the expert-sorted rows: order (tokens * k,), the flat
        choices in expert order; slot (tokens * k,), their rows; ends (experts,) int32, cumulative
        rows per expert, each expert's rounded up to a multiple of ``multiple`` (the rows in between
        are padding); and the number of rows. With ``multiple`` 1 the rows are the choices, in order,
        and nothing is read back to the host."""
        flat = experts.flatten()  # (tokens * k,): token t's j-th choice at t * k + j
        order = flat.argsort(stable=True)  # choices grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)  # (experts,)
        if multiple == 1:
            slot = torch.arange(flat.numel(), device=flat.device)
            return order, slot, counts.cumsum(0).to(torch.int32), flat.numel()  # no host synchronisation
        padded = (counts + multiple - 1) // multiple * multiple  # (experts,)
        first, first_padded = counts.cumsum(0) - counts, padded.cumsum(0) - padded  # (experts,) each
        by_expert = flat[order]  # (tokens * k,)
        slot = torch.arange(flat.numel(), device=flat.device) - first[by_expert] + first_padded[by_expert]
        ends = padded.cumsum(0)
        return order, slot, ends.to(torch.int32), int(ends[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, dim) -> (tokens, dim)."""
        weights, experts = self.route(x)
        # bf16/fp16 products on CPU are oneDNN's, which builds a kernel per matrix shape: per-expert
        # row counts that change every step would make it build hundreds per step (its kernel cache
        # is bounded, finetune/distributed.py). Rounded up, few shapes recur. (float32 runs on BLAS.)
        low_precision_cpu = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        order, slot, ends, rows = self.rows_by_expert(experts, CPU_ROW_MULTIPLE if low_precision_cpu else 1)
        tokens = x.shape[0]
        token = order // self.top_k  # (tokens * k,): the token each sorted choice belongs to
        weight = weights.flatten()[order]  # (tokens * k,)
        padded_x = x
        if rows > slot.numel():
            # Row r holds token[r]; padding rows read the zero row appended at index ``tokens`` (so every
            # product of theirs is exactly zero) and are added to it, which is dropped. Without padding
            # (GPUs, float32) the rows are the choices in order and none of this runs.
            token = torch.full((rows,), tokens, device=x.device).index_copy(0, slot, token)  # (rows,)
            weight = weights.new_zeros(rows).index_copy(0, slot, weight)  # (rows,)
            padded_x = torch.cat([x, x.new_zeros(1, x.shape[1])])  # (tokens + 1, dim)
        y = self.experts(padded_x[token], ends)  # (rows, dim)
        y = y * weight[:, None].to(y.dtype)
        out = torch.zeros_like(padded_x).index_add_(0, token, y)[:tokens]  # (tokens, dim)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out
