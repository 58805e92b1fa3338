"""Rotary position embeddings in Mistral's native layout.

Mistral (like the original Llama) rotates *adjacent* pairs ``(x[2i], x[2i+1])``; Hugging Face
rotates the two halves of the head instead and permutes ``wq``/``wk`` rows to compensate. The
math runs in float32 and is cast back to the input dtype.
"""

from __future__ import annotations

import torch


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
