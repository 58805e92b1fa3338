"""Rotary position embeddings in Mistral's native layout.

Mistral (like the original Llama) rotates *adjacent* pairs ``(x[2i], x[2i+1])``; Hugging Face
rotates the two halves of the head instead and permutes ``wq``/``wk`` rows to compensate. The
math runs in float32 and is cast back to the input dtype.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from model.args import ModelArgs, YarnArgs


def positions_from_seqlens(seqlens: list[int], device: torch.device) -> torch.Tensor:
    """Positions restarting at 0 for every packed document: [3, 2] -> [0, 1, 2, 0, 1]."""
    lengths = torch.tensor(seqlens, device=device)
    starts = torch.cumsum(lengths, 0) - lengths  # (docs,)
    total = int(sum(seqlens))
    return torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths, output_size=total)


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations (tokens, head_dim // 2), only for the positions in this batch.

    Complex64 rather than (cos, sin) float32 pairs: a mixed-precision wrapper that casts a module's
    floating-point inputs to bfloat16 leaves complex tensors alone, so the rotations stay exact."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    # float64 angles and cos/sin keep large positions (128k) exact; the result is complex64.
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (tokens, head_dim // 2)
    return torch.complex(angles.cos().float(), angles.sin().float())


@lru_cache(maxsize=8)
def yarn_inv_freq(head_dim: int, theta: float, yarn: YarnArgs) -> torch.Tensor:
    """YaRN's inverse frequencies (head_dim // 2,) in float64, as transformers'
    ``_compute_yarn_parameters`` (and vLLM) compute them: dimensions that rotate more than
    ``beta_fast`` times over the original context keep their frequency, those rotating fewer than
    ``beta_slow`` times are interpolated (divided by ``factor``), and a linear ramp blends between.
    Cached: a model's arguments never change, and every forward (every decoded token) asks again;
    callers must not modify the returned tensor."""
    plain = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def dimension(rotations: float) -> float:  # the dimension that turns ``rotations`` times
        return head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta)
        )

    # transformers' bounds: truncated to whole dimensions, clamped to [0, head_dim - 1] (not head_dim // 2).
    low = max(math.floor(dimension(yarn.beta_fast)), 0)
    high = min(math.ceil(dimension(yarn.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return plain / yarn.factor * ramp + plain * (1 - ramp)


def rotations(positions: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The model's rotary variant for ``positions`` (tokens,): complex64 (tokens, rope_dim // 2) that
    rotates queries and keys alike, or (tokens, 2, head_dim // 2) [keys, queries] when the queries
    are also scaled by position (``llama_4_scaling``): a real factor on a query's rotation is that
    factor on the rotated query, as transformers applies it."""
    if args.yarn is None:
        freqs = rope_frequencies(positions, args.rope_dim, args.rope_theta)
    else:
        inv_freq = yarn_inv_freq(args.rope_dim, args.rope_theta, args.yarn).to(positions.device)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (tokens, head_dim // 2)
        # transformers multiplies cos and sin by the attention factor: the rotation's magnitude.
        scale = args.yarn.attention_factor
        freqs = torch.complex((angles.cos() * scale).float(), (angles.sin() * scale).float())
    if args.llama_4_scaling is None:
        return freqs
    l4 = args.llama_4_scaling
    # 1 + beta * log(1 + floor(p / original)), computed in float32 as transformers does.
    q_scale = 1 + l4.beta * torch.log(1 + torch.floor(positions.float() / l4.original_max_position_embeddings))
    return torch.stack((freqs, freqs * q_scale[:, None]), dim=1)  # (tokens, 2, head_dim // 2)


def query_key_rotations(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries', keys') rotations (tokens, head_dim // 2) from what ``rotations`` returns."""
    if freqs.dim() == 3:
        return freqs[:, 1], freqs[:, 0]
    return freqs, freqs


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x (tokens, heads, head_dim) by per-token rotations (tokens, head_dim // 2).

    Adjacent pairs are one complex number; one complex multiply is one fused kernel (several
    times faster on CPU than rotating real and imaginary halves separately). Compiled code rotates
    the halves instead: inductor generates no code for complex arithmetic, and fuses these."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (tokens, heads, head_dim // 2, 2)
    if torch.compiler.is_compiling():
        rotation = torch.view_as_real(freqs)[:, None]  # (tokens, 1, head_dim // 2, 2): cos, sin
        cos, sin = rotation[..., 0], rotation[..., 1]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * freqs[:, None, :])
    return rotated.flatten(-2).type_as(x)  # (tokens, heads, head_dim)
