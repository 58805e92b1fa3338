"""The key/value cache of autoregressive decoding (``model.generate``): the attention kernel that
replaces the packed-row kernels when a batch of sequences attends to its past instead of to itself.

Layout: each sequence b owns row b of every layer's cache; its token at position p is stored at slot
p. A prompt batch is prefilled right-padded: padding is written past a prompt's end, but a query only
attends to slots <= its own position (and within its layer's sliding window), and decoding overwrites slot p
before any query can see it.

What a slot holds follows the layer's attention: keys and values per kv head (``model.attention``),
or, for multi-head latent attention (``model.mla``), one normed latent and one rotated key part per
token, shared by every head: ``kv_lora_rank + qk_rope_head_dim`` numbers instead of
``heads * (qk_head_dim + v_head_dim)``. That layer attends in latent space (``attend_latent``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CacheStep:
    """One layer's cache during one forward: where this step's tokens go and what they may see."""

    # (batch, kv_heads, max_len, head_dim) keys; latent attention: (batch, 1, max_len, kv_lora_rank + rope_dim)
    k: torch.Tensor
    # (batch, kv_heads, max_len, head_dim) values; None under latent attention, whose values are the latent
    v: torch.Tensor | None
    positions: torch.Tensor  # (batch, T): the positions of this step's tokens
    allowed: torch.Tensor  # (batch, 1, T, max_len) bool: which slots each query attends to

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's ``k``/``v`` (batch*T, kv_heads, head_dim) at their positions, then attend
        ``q`` (batch*T, heads, head_dim) to the whole cache; returns (batch*T, heads, head_dim)."""
        assert self.v is not None, "a latent-attention cache holds no values: use attend_latent"
        self._write(self.k, k)
        self._write(self.v, v)
        return self._attend(q, self.k, self.v)

    def attend_latent(self, q: torch.Tensor, latent: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
        """Latent attention as multi-query attention over the cached latents: write this step's
        ``latent`` (batch*T, rank + rope_dim), the normed latent then the rotated key part, and attend
        ``q`` (batch*T, heads, rank + rope_dim), already absorbed into latent space (``model.mla``), to
        the whole cache with the latents' first ``rank`` columns as values; returns (batch*T, heads, rank).
        ``scale`` is the softmax scale of the model's own head width, not of the absorbed one."""
        assert self.v is None, "a key/value cache holds no latents: use attend"
        self._write(self.k, latent[:, None])  # (batch*T, 1, rank + rope_dim): one shared "kv head"
        return self._attend(q, self.k, self.k[..., :rank], scale)

    def _write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` (batch*T, kv_heads, dim) in ``cache`` (batch, kv_heads, max_len, dim) at each
        token's own slot."""
        b, t = self.positions.shape
        rows = torch.arange(b, device=new.device)[:, None].expand(b, t)  # (batch, T)
        cache[rows, :, self.positions] = new.view(b, t, *new.shape[1:])  # (batch, T, kv_heads, dim) at [row, :, position, :]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """``q`` (batch*T, heads, qk_dim) to cached ``k``/``v`` (batch, kv_heads, max_len, qk_dim / v_dim)
        under this step's mask; returns (batch*T, heads, v_dim). ``scale`` None: 1/sqrt(qk_dim)."""
        b, t = self.positions.shape
        qh = q.view(b, t, *q.shape[1:]).transpose(1, 2)  # (batch, heads, T, qk_dim)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=self.allowed, enable_gqa=True, scale=scale)
        return out.transpose(1, 2).reshape(b * t, q.shape[1], v.shape[-1])  # (batch*T, heads, v_dim)


@dataclass
class KVCache:
    # per layer (batch, kv_heads, max_len, head_dim); latent attention: (batch, 1, max_len, kv_lora_rank + rope_dim)
    k: list[torch.Tensor]
    v: list[torch.Tensor | None]  # per layer (batch, kv_heads, max_len, head_dim); None under latent attention
    layer_windows: tuple[int | None, ...]  # ModelArgs.layer_windows: each layer's window, None = full

    @classmethod
    def empty(cls, model: nn.Module, batch: int, max_len: int) -> KVCache:
        """Zeros for ``batch`` sequences of up to ``max_len`` tokens, in the model's dtype and device,
        shaped for the model's attention (see the module docstring)."""
        a = model.args
        p = next(model.parameters())

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=p.dtype, device=p.device)

        if a.mla is not None:
            width = a.mla.kv_lora_rank + a.mla.qk_rope_head_dim
            return cls([zeros(batch, 1, max_len, width) for _ in range(a.n_layers)], [None] * a.n_layers, a.layer_windows)
        shape = (batch, a.n_kv_heads, max_len, a.head_dim)
        return cls(
            [zeros(*shape) for _ in range(a.n_layers)], [zeros(*shape) for _ in range(a.n_layers)], a.layer_windows
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
