"""The key/value cache of autoregressive decoding (``model.generate``): the attention kernel that
replaces the packed-row kernels when a batch of sequences attends to its past instead of to itself.

Layout: each sequence b owns row b of every layer's cache; its token at position p is stored at slot
p. A prompt batch is prefilled right-padded: padding is written past a prompt's end, but a query only
attends to slots <= its own position (and within its layer's sliding window), and decoding overwrites slot p
before any query can see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CacheStep:
    """One layer's cache during one forward: where this step's tokens go and what they may see."""

    k: torch.Tensor  # (batch, kv_heads, max_len, head_dim), this layer's keys
    v: torch.Tensor  # (batch, kv_heads, max_len, head_dim), this layer's values
    positions: torch.Tensor  # (batch, T): the positions of this step's tokens
    allowed: torch.Tensor  # (batch, 1, T, max_len) bool: which slots each query attends to

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's ``k``/``v`` (batch*T, kv_heads, head_dim) at their positions, then attend
        ``q`` (batch*T, heads, head_dim) to the whole cache; returns (batch*T, heads, head_dim)."""
        b, t = self.positions.shape
        rows = torch.arange(b, device=q.device)[:, None].expand(b, t)  # (batch, T)
        # (batch, T, kv_heads, head_dim) written at [row, :, position, :]
        self.k[rows, :, self.positions] = k.view(b, t, *k.shape[1:])
        self.v[rows, :, self.positions] = v.view(b, t, *v.shape[1:])
        qh = q.view(b, t, *q.shape[1:]).transpose(1, 2)  # (batch, heads, T, head_dim)
        out = F.scaled_dot_product_attention(qh, self.k, self.v, attn_mask=self.allowed, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * t, *q.shape[1:])  # (batch*T, heads, head_dim)


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer (batch, kv_heads, max_len, head_dim)
    v: list[torch.Tensor]  # per layer (batch, kv_heads, max_len, head_dim)
    layer_windows: tuple[int | None, ...]  # ModelArgs.layer_windows: each layer's window, None = full

    @classmethod
    def empty(cls, model: nn.Module, batch: int, max_len: int) -> KVCache:
        """Zeros for ``batch`` sequences of up to ``max_len`` tokens, in the model's dtype and device."""
        a = model.args
        p = next(model.parameters())
        shape = (batch, a.n_kv_heads, max_len, a.head_dim)
        return cls(
            [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.n_layers)],
            [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.n_layers)],
            a.layer_windows,
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def steps(self, positions: torch.Tensor) -> list[CacheStep]:
        """Each layer's ``CacheStep`` for tokens at ``positions`` (batch, T); layers with the same
        window share one mask."""
        slots = torch.arange(self.max_len, device=positions.device)  # (max_len,)
        delta = positions[:, :, None] - slots[None, None, :]  # (batch, T, max_len): query minus key position
        causal = delta >= 0
        allowed = {  # window -> (batch, 1, T, max_len) bool
            w: (causal if w is None else causal & (delta < w))[:, None] for w in dict.fromkeys(self.layer_windows)
        }
        return [
            CacheStep(k, v, positions, allowed[w])
            for k, v, w in zip(self.k, self.v, self.layer_windows, strict=True)
        ]
