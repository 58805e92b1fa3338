"""Mixtral's sparse mixture-of-experts feed-forward layer.

The router ``gate`` scores every expert, the top-k *logits* are softmaxed (in float32) into
mixing weights, and each token's output is the weighted sum of its k experts' SwiGLU outputs.
No auxiliary load-balancing loss, matching mistral-inference and mistral-finetune.
"""

from __future__ import annotations

import torch
from torch import nn

from model.args import ModelArgs
from model.lora import LinearFactory


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
    def __init__(self, args: ModelArgs, make_linear: LinearFactory) -> None:
        super().__init__()
        assert args.moe is not None
        self.num_experts_per_tok = args.moe.num_experts_per_tok
        # The router is never a LoRA target (mistral-inference has no adapter for it).
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(args.dim, args.hidden_dim, make_linear) for _ in range(args.moe.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # (tokens, experts)
        top_logits, top_experts = torch.topk(logits, self.num_experts_per_tok, dim=-1)  # (tokens, k)
        weights = torch.softmax(top_logits.float(), dim=-1).type_as(x)  # (tokens, k)
        out = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_experts == j)  # tokens routed to expert j
            # Every expert runs even with no tokens, so all ranks and checkpointed recomputes take
            # the same path through the parameters (FSDP needs every rank to use each expert).
            y = expert(x[token_idx]) * weights[token_idx, slot, None]  # (routed, dim)
            out.index_add_(0, token_idx, y)
        return out
