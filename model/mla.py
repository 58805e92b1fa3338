"""Multi-head latent attention (Mistral Small 4, DeepSeek-V3 style) over a packed batch of documents.

Queries come from ``wq`` or, with a ``q_lora_rank``, from ``wq_b(q_a_norm(wq_a(x)))``. Keys and values
come from one latent per token: ``wkv_a_with_mqa`` gives the rank-``kv_lora_rank`` latent and a single rotary
key part shared by every head; ``wkv_b(kv_a_norm(latent))`` expands the latent to each head's
unrotated key part and its value. Only the last ``qk_rope_head_dim`` dimensions of a query or key
head rotate (partial rotary embedding), in adjacent pairs as everywhere in this library: transformers'
``rope_interleave: true`` layout, so the Hugging Face weights load without a permutation. The names
are Mistral's consolidated ones (``wq_a``, ``q_a_norm``, ``wq_b``, ``wkv_a_with_mqa``, ``kv_a_norm``,
``wkv_b``, ``wo``; vLLM's Mistral Large 3 loader reads the same), so a native checkpoint loads as it
is; ``model.hf`` maps them to transformers' ``Mistral4Attention``.

The attention itself is the shared per-document kernel (``model.attention.attend``); values may be
narrower than queries and keys. Decoding (``model.generate``) caches each token's latent and rotary
key part only, and attends in latent space (``_attend_cached``).
"""

from __future__ import annotations

import torch
from torch import nn

from model.args import ModelArgs
from model.attention import AttentionMask, attend
from model.kv_cache import CacheStep
from model.lora import LinearFactory, LoRALinear, merge_delta
from model.norm import RMSNorm
from model.quant import NF4LoRALinear
from model.rope import apply_rope, query_key_rotations

# The latent norms' epsilon: transformers' Mistral4RMSNorm default, not the model's norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(self, args: ModelArgs, make_linear: LinearFactory) -> None:
        super().__init__()
        mla = args.mla
        assert mla is not None, "LatentAttention needs ModelArgs.mla"
        self.n_heads = args.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.softmax_scale_factor = mla.softmax_scale_factor
        if mla.q_lora_rank is None:
            self.wq = make_linear("wq", args.dim, args.n_heads * qk_dim)
        else:
            self.wq_a = make_linear("wq_a", args.dim, mla.q_lora_rank)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = make_linear("wq_b", mla.q_lora_rank, args.n_heads * qk_dim)
        self.wkv_a_with_mqa = make_linear("wkv_a_with_mqa", args.dim, mla.kv_lora_rank + mla.qk_rope_head_dim)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = make_linear("wkv_b", mla.kv_lora_rank, args.n_heads * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.wo = make_linear("wo", args.n_heads * mla.v_head_dim, args.dim)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: AttentionMask | None, cache: CacheStep | None = None
    ) -> torch.Tensor:
        """``x`` (tokens, dim) -> (tokens, dim). With a ``cache`` (decoding, ``model.generate``) the
        tokens attend to the cached latents instead (``_attend_cached``), and ``mask`` is not used."""
        tokens = x.shape[0]
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.view(tokens, self.n_heads, self.nope_dim + self.rope_dim)  # (tokens, heads, qk_dim)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.wkv_a_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (tokens, rank), (tokens, rope)
        latent = self.kv_a_norm(latent)  # (tokens, rank)

        q_freqs, k_freqs = query_key_rotations(freqs)  # (tokens, rope // 2) each
        # transformers scales the whole query by llama-4's position factor, the unrotated part too:
        # ``rotations`` carries that factor as the ratio of the query's to the key's rotation magnitude.
        position_scale = (_magnitude(q_freqs) / _magnitude(k_freqs))[:, :, None]  # (tokens, 1, 1)
        # The kernel divides by sqrt(qk_dim); transformers' softmax scale is that times the factor.
        q_nope = q_nope * (position_scale * self.softmax_scale_factor).to(q.dtype)
        q_rot = apply_rope(q_rot, q_freqs) * self.softmax_scale_factor  # (tokens, heads, rope)
        k_rot = apply_rope(k_rot[:, None], k_freqs)  # (tokens, 1, rope): one rotary key for all heads
        if cache is not None:
            out = self._attend_cached(q_nope, q_rot, latent, k_rot, cache)  # (tokens, heads, v_dim)
            return self.wo(out.reshape(tokens, self.n_heads * self.v_dim))

        kv = self.wkv_b(latent).view(tokens, self.n_heads, self.nope_dim + self.v_dim)  # (tokens, heads, nope + v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (tokens, heads, nope), (tokens, heads, v_dim)
        q = torch.cat((q_nope, q_rot), dim=-1)  # (tokens, heads, qk_dim)
        k = torch.cat((k_nope, k_rot.expand(tokens, self.n_heads, self.rope_dim)), dim=-1)  # (tokens, heads, qk_dim)
        out = attend(q, k, v, mask)  # (tokens, heads, v_dim)
        return self.wo(out.reshape(tokens, self.n_heads * self.v_dim))

    def _attend_cached(
        self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor, cache: CacheStep
    ) -> torch.Tensor:
        """Attention in latent space (DeepSeek-V2's weight absorption), so that the cache keeps one
        latent per token and no per-head keys or values are ever built from it: with W_k and W_v the
        key and value parts of ``wkv_b``, q_nope . (W_k c) = (W_k^T q_nope) . c puts the query in
        latent space, and sum_j p_j W_v c_j = W_v sum_j p_j c_j applies W_v once, after attention.
        Exact up to rounding. (tokens, heads, nope), (tokens, heads, rope), (tokens, rank),
        (tokens, 1, rope) -> (tokens, heads, v_dim)."""
        w = _dense_weight(self.wkv_b).to(q_nope.dtype)  # (heads * (nope + v_dim), rank)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)  # (heads, nope + v_dim, rank)
        w_k, w_v = w.split([self.nope_dim, self.v_dim], dim=1)  # (heads, nope, rank), (heads, v_dim, rank)
        q = torch.cat((torch.einsum("thn,hnr->thr", q_nope, w_k), q_rot), dim=-1)  # (tokens, heads, rank + rope)
        entry = torch.cat((latent, k_rot[:, 0]), dim=-1)  # (tokens, rank + rope): what the cache stores
        # The softmax scale stays the model's 1/sqrt(qk_dim), not 1/sqrt(rank + rope) of the absorbed query.
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        out = cache.attend_latent(q, entry, self.kv_lora_rank, scale)  # (tokens, heads, rank)
        return torch.einsum("thr,hvr->thv", out, w_v)  # (tokens, heads, v_dim)


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) matrix ``linear`` applies, adapters folded in: absorption multiplies by it
    directly, and by its transpose, which the module itself cannot apply."""
    if isinstance(linear, NF4LoRALinear):
        return merge_delta(linear.dequantize(), linear.lora_A.weight, linear.lora_B.weight, linear.scaling)
    if isinstance(linear, LoRALinear):
        return merge_delta(linear.weight, linear.lora_A.weight, linear.lora_B.weight, linear.scaling)
    return linear.weight


def _magnitude(freqs: torch.Tensor) -> torch.Tensor:
    """|first rotation| (tokens, 1), on real views: inductor generates no code for complex arithmetic."""
    return torch.view_as_real(freqs[:, :1]).square().sum(-1).sqrt()
