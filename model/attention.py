"""Grouped-query self-attention over a packed batch of documents.

Two kernels behind one switch, both exact and both runnable on CPU:

- ``sdpa``: PyTorch scaled_dot_product_attention run per document with ``is_causal``, so the
  cost follows document lengths rather than the packed row length and no (tokens x tokens) mask
  is ever built. A document longer than the sliding window gets a (len x len) banded mask.
- ``flex``: FlexAttention with a block mask encoding documents, causality and the window; the
  fast path on GPU. The block mask is built once per forward for each distinct window (per-layer
  windows: ``ModelArgs.layer_windows``, Ministral 8B's interleaved full and windowed layers) and
  shared by the layers that use it.

Under ``torch.compile`` (``compile: true``) the per-document loop runs as one opaque custom op,
``mistral_finetune::document_attention``, whose document lengths are a tensor: the compiled
block neither breaks its graph at the kernel nor recompiles for every new list of lengths.

Decoding (``model.generate``) passes a ``CacheStep`` instead: the same projections and rotations,
with the queries attending to a key/value cache (``model/kv_cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.kv_cache import CacheStep
from model.lora import LinearFactory
from model.rope import apply_rope, query_key_rotations

BACKENDS = ("sdpa", "flex")


@dataclass
class AttentionMask:
    """What the kernels need to know about the packed batch; built once per forward."""

    seqlens: list[int]
    sliding_window: int | None
    block_mask: object | None = None  # FlexAttention BlockMask, only for the flex backend
    # The same lengths as a CPU int64 tensor (docs,): what compiled code passes to the custom op.
    lengths: torch.Tensor | None = None
    _bands: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def band(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive (len, len) window mask of a document longer than the window, made once per
        forward: SDPA saves its mask for backward, and would otherwise save a converted copy of a
        boolean mask for every layer."""
        key = (length, dtype)
        if key not in self._bands:
            allowed = _banded_causal_mask(length, self.sliding_window, device)  # (len, len) bool
            self._bands[key] = torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(~allowed, -torch.inf)
        return self._bands[key]

    @classmethod
    def build(
        cls, seqlens: list[int], sliding_window: int | None, backend: str, device: torch.device
    ) -> AttentionMask:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        block_mask = _flex_block_mask(seqlens, sliding_window, device) if backend == "flex" else None
        lengths = torch.tensor(seqlens, dtype=torch.int64)
        # The number of documents varies from batch to batch: compiled code treats it as symbolic.
        torch._dynamo.maybe_mark_dynamic(lengths, 0)
        return cls(list(seqlens), sliding_window, block_mask, lengths)

    @classmethod
    def per_layer(
        cls, seqlens: list[int], layer_windows: tuple[int | None, ...], backend: str, device: torch.device
    ) -> list[AttentionMask]:
        """Layer i's mask for ``layer_windows[i]`` (``ModelArgs.layer_windows``); each distinct
        window's mask is built once and shared by the layers that use it."""
        masks = {w: cls.build(seqlens, w, backend, device) for w in dict.fromkeys(layer_windows)}
        return [masks[w] for w in layer_windows]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, make_linear: LinearFactory) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = make_linear("wq", args.dim, args.n_heads * args.head_dim)
        self.wk = make_linear("wk", args.dim, args.n_kv_heads * args.head_dim)
        self.wv = make_linear("wv", args.dim, args.n_kv_heads * args.head_dim)
        self.wo = make_linear("wo", args.n_heads * args.head_dim, args.dim)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: AttentionMask | None, cache: CacheStep | None = None
    ) -> torch.Tensor:
        """``x`` (tokens, dim) -> (tokens, dim). With a ``cache`` (decoding, ``model.generate``) the
        tokens attend to the cached past instead, and ``mask`` is not used."""
        tokens = x.shape[0]
        q = self.wq(x).view(tokens, self.n_heads, self.head_dim)  # (tokens, heads, head_dim)
        k = self.wk(x).view(tokens, self.n_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        v = self.wv(x).view(tokens, self.n_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        q_freqs, k_freqs = query_key_rotations(freqs)  # differ when queries are scaled by position
        q, k = apply_rope(q, q_freqs), apply_rope(k, k_freqs)
        out = cache.attend(q, k, v) if cache is not None else attend(q, k, v, mask)
        return self.wo(out.reshape(tokens, self.n_heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Per-document causal attention with the mask's kernel: q (tokens, heads, qk_dim), k (tokens,
    kv_heads, qk_dim), v (tokens, kv_heads, v_dim) -> (tokens, heads, v_dim); softmax scale 1/sqrt(qk_dim)."""
    if mask.block_mask is not None:
        return _flex(q, k, v, mask.block_mask)
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        # Values narrower than queries and keys (latent attention): SDPA's fused kernels need one head
        # width, and would fall back to materialising the scores; zero value columns change nothing.
        v = F.pad(v, (0, q.shape[-1] - v_dim))  # (tokens, kv_heads, qk_dim)
    if torch.compiler.is_compiling():
        out = document_attention(q, k, v, mask.lengths, mask.sliding_window)
    else:
        out = _sdpa_per_document(q, k, v, mask.seqlens, mask.sliding_window, mask.band)
    return out[..., :v_dim]  # (tokens, heads, v_dim)


def _sdpa_per_document(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], window: int | None,
    bands: Callable[[int, torch.dtype, torch.device], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Block-diagonal causal attention as one SDPA call per document; returns (tokens, heads, head_dim).
    ``bands`` (``AttentionMask.band``) shares window masks between layers; without it each call makes its own."""
    outputs, start = [], 0
    for length in seqlens:
        end = start + length
        # (1, heads, len, head_dim): SDPA's layout; GQA without repeating K/V.
        qd, kd, vd = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if window is None or length <= window:
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        else:
            band = (  # (len, len), additive or bool
                bands(length, q.dtype, q.device) if bands is not None else _banded_causal_mask(length, window, q.device)
            )
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=band, enable_gqa=True)
        outputs.append(o.squeeze(0).transpose(0, 1))  # (len, heads, head_dim)
        start = end
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


@torch.library.custom_op("mistral_finetune::document_attention", mutates_args=())
def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``_sdpa_per_document`` as one op for compiled code; ``lengths`` (docs,) int64 on the CPU."""
    return _sdpa_per_document(q, k, v, lengths.tolist(), window).contiguous()


@document_attention.register_fake
def _(q, k, v, lengths, window):
    return q.new_empty(*q.shape[:-1], v.shape[-1])  # (tokens, heads, v_dim): v_dim may differ (model.mla)


@torch.library.custom_op("mistral_finetune::document_attention_backward", mutates_args=())
def document_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``document_attention`` for q, k and v, by running the documents' kernels again
    under autograd (one extra attention forward: the compiled path on CPU, where the GPU uses flex)."""
    seqlens = lengths.tolist()
    _, vjp = torch.func.vjp(lambda *qkv: _sdpa_per_document(*qkv, seqlens, window), q, k, v)
    dq, dk, dv = vjp(grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@document_attention_backward.register_fake
def _(grad, q, k, v, lengths, window):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _document_attention_setup(ctx, inputs, output) -> None:
    q, k, v, lengths, window = inputs
    ctx.save_for_backward(q, k, v, lengths)
    ctx.window = window


def _document_attention_grad(ctx, grad):
    q, k, v, lengths = ctx.saved_tensors
    return (*document_attention_backward(grad, q, k, v, lengths, ctx.window), None, None)


document_attention.register_autograd(_document_attention_grad, setup_context=_document_attention_setup)
# The registered op, as dispatch modes (selective checkpointing's policy) see it.
DOCUMENT_ATTENTION_OP = torch.ops.mistral_finetune.document_attention.default


def _banded_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    delta = i[:, None] - i[None, :]  # query minus key position
    return (delta >= 0) & (delta < window)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only memory-efficient compiled; eager mode materialises the scores.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    # (1, heads, tokens, head_dim) in and out. A compiled block traces flex_attention itself.
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = flex(qf, kf, vf, block_mask=block_mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)  # (tokens, heads, head_dim)


def _flex_block_mask(seqlens: list[int], window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor(seqlens, device=device)
    total = int(sum(seqlens))
    doc = torch.repeat_interleave(torch.arange(len(seqlens), device=device), lengths, output_size=total)

    def causal_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def causal_document_window(b, h, q_idx, kv_idx):
        return causal_document(b, h, q_idx, kv_idx) & (q_idx - kv_idx < window)

    mask_mod = causal_document if window is None else causal_document_window
    # Positions are global within the packed row, so the window compares them directly: both
    # tokens are in the same document, hence their distance is their in-document distance.
    return create_block_mask(mask_mod, None, None, total, total, device=device)
