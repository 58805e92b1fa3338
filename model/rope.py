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


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (tokens, head_dim // 2), computed only for the positions in this batch."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    # float64 for the angle keeps large positions (128k) exact before the float32 cos/sin.
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (tokens, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (tokens, heads, head_dim) by per-token angles (tokens, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (tokens, heads, head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (tokens, 1, head_dim // 2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (tokens, heads, head_dim)
