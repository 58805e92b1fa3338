"""The Pixtral vision encoder and the vision-language adapter of multimodal checkpoints (Mistral Small
3.x, Ministral 3, Pixtral), built from the params.json ``vision_encoder`` block.

LoRA adapters go where ``lora.target_modules`` names a vision layer in full (``vision_encoder.wq`` ...
``vision_encoder.w3``, ``vision_language_adapter.w_in``/``w_out``, ``patch_merger.merging_layer``:
``model.args.VISION_TARGETS``); everything else here stays a frozen ``nn.Linear``.

Module names are the native checkpoint names (``vision_encoder.*``, ``vision_language_adapter.*``,
``patch_merger.*``, ``pre_mm_projector_norm.*``, see ``model.multimodal``), so a native or converted
Hugging Face folder loads into them strictly. The q/k rows are in the native layout: the 2-D rotary
embedding rotates adjacent pairs, as the text model's does (``model.rope``).

``encode_images(images) -> (image tokens, text dim)``: each (C, H, W) image is cut into patches, the
patches of all images run through one encoder as one sequence in which each image attends only to
itself, and every ``spatial_merge_size``² block of patches becomes one ``[IMG]`` token's embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.args import LoraArgs
from model.lora import LinearFactory, linear_factory
from model.moe import FeedForward
from model.multimodal import token_side
from model.norm import RMSNorm
from model.rope import apply_rope

# Pixtral's encoder norms use 1e-5 whatever the text model's eps (transformers, vLLM, mistral-inference).
_VISION_NORM_EPS = 1e-5


def rotations_2d(
    grids: list[tuple[int, int]], head_dim: int, theta: float, device: torch.device
) -> torch.Tensor:
    """Pixtral's axial rotations, complex64 (patches, head_dim // 2), for the patches of every image in
    row-major order: at (row i, column j) the first head_dim // 4 pairs turn by i times the even-indexed
    frequencies and the last head_dim // 4 by j times the odd-indexed ones (mistral-inference's
    ``precompute_freqs_cis_2d``); positions restart at (0, 0) in every image."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = []
    for h, w in grids:
        rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)  # (h * w,)
        cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)  # (h * w,)
        angles.append(
            torch.cat((rows[:, None] * inv_freq[None, ::2], cols[:, None] * inv_freq[None, 1::2]), -1)
        )
    a = torch.cat(angles)  # (patches, head_dim // 2)
    return torch.complex(a.cos().float(), a.sin().float())


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (make_linear(w, dim, dim) for w in ("wq", "wk", "wv", "wo"))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``x`` (patches, dim) -> (patches, dim); bidirectional within each image of ``lengths`` patches."""
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), freqs)  # (patches, heads, head_dim)
        k = apply_rope(self.wk(x).view(n, self.n_heads, self.head_dim), freqs)  # (patches, heads, head_dim)
        v = self.wv(x).view(n, self.n_heads, self.head_dim)  # (patches, heads, head_dim)
        # One SDPA call per image is the block-diagonal mask without materialising it (images differ in
        # size). Batched 4-D inputs: the fused kernels (flash on CPU and GPU) take only those; 3-D ones
        # fall back to the math path, which builds each image's (heads, patches, patches) scores.
        out = [
            F.scaled_dot_product_attention(
                qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None]
            )[0].transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
        ]  # each (image patches, heads, head_dim)
        return self.wo(torch.cat(out).reshape(n, -1))  # (patches, dim)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_heads: int, lora: LoraArgs | None = None) -> None:
        super().__init__()
        # Adapters only where lora.target_modules names them in full (vision_encoder.wq ...; model.lora.is_target).
        make_linear = linear_factory(lora, scope="vision_encoder.")
        self.attention = VisionAttention(dim, n_heads, make_linear)
        self.attention_norm = RMSNorm(dim, _VISION_NORM_EPS)
        self.ffn_norm = RMSNorm(dim, _VISION_NORM_EPS)
        self.feed_forward = FeedForward(dim, hidden_dim, make_linear)  # SwiGLU: w2(silu(w1 x) * w3 x)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, lengths)
        return h + self.feed_forward(self.ffn_norm(h))


class VisionTransformer(nn.Module):
    def __init__(self, n_layers: int, dim: int, hidden_dim: int, n_heads: int, lora: LoraArgs | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(dim, hidden_dim, n_heads, lora) for _ in range(n_layers))


class VisionEncoder(nn.Module):
    """Pixtral: patch convolution, ``ln_pre``, transformer blocks with 2-D rotary positions."""

    def __init__(self, vision: dict[str, Any], lora: LoraArgs | None = None) -> None:
        super().__init__()
        self.patch_size = vision["patch_size"]
        self.n_heads = vision["num_attention_heads"]
        self.head_dim = vision["hidden_size"] // self.n_heads
        self.rope_theta = float(vision.get("rope_theta", 10000.0))
        dim = vision["hidden_size"]
        self.patch_conv = nn.Conv2d(
            vision["num_channels"], dim, self.patch_size, stride=self.patch_size, bias=False
        )
        self.ln_pre = RMSNorm(dim, _VISION_NORM_EPS)
        self.transformer = VisionTransformer(
            vision["num_hidden_layers"], dim, vision["intermediate_size"], self.n_heads, lora
        )

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(C, H, W) images -> (patches of all images, dim) and each image's (rows, columns) of patches."""
        dtype = self.patch_conv.weight.dtype
        grids_out = [self.patch_conv(img.to(dtype)[None])[0] for img in images]  # each (dim, rows, cols)
        grids = [(g.shape[1], g.shape[2]) for g in grids_out]
        x = torch.cat([g.flatten(1).T for g in grids_out])  # (patches, dim), row-major per image
        x = self.ln_pre(x)
        freqs = rotations_2d(grids, self.head_dim, self.rope_theta, x.device)
        lengths = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x = layer(x, freqs, lengths)
        return x, grids


class PatchMerger(nn.Module):
    """Each ``merge``×``merge`` block of patches -> one feature, by a linear map of the block's patches."""

    def __init__(self, dim: int, merge: int, lora: LoraArgs | None = None) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = linear_factory(lora, scope="patch_merger.")("merging_layer", dim * merge**2, dim)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """``x`` (patches, dim) -> (merged tokens, dim), each image's tokens row-major."""
        d, m = x.shape[-1], self.merge
        out = []
        for patches, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
            grid = patches.view(h, w, d).permute(2, 0, 1)[None]  # (1, dim, rows, cols)
            # unfold lays each block out channel-major: feature index = c * m² + (block row) * m + (block col).
            blocks = F.unfold(grid, kernel_size=m, stride=m)  # (1, dim * m², tokens)
            out.append(blocks.view(d * m * m, -1).T)  # (tokens, dim * m²)
        return self.merging_layer(torch.cat(out))  # (merged tokens, dim)


class VisionLanguageAdapter(nn.Module):
    def __init__(self, vision_dim: int, dim: int, bias: bool, lora: LoraArgs | None = None) -> None:
        super().__init__()
        make_linear = linear_factory(lora, scope="vision_language_adapter.")
        self.w_in = make_linear("w_in", vision_dim, dim, bias=bias)
        self.w_out = make_linear("w_out", dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))  # exact (erf) GELU, as native and transformers


def check_images(images: list[torch.Tensor], vision: dict[str, Any]) -> None:
    """A user's image of the wrong shape is a ValueError naming it, not an unfold or conv error."""
    step = token_side(vision)
    for i, img in enumerate(images):
        if (
            img.dim() != 3
            or img.shape[0] != vision["num_channels"]
            or img.shape[1] % step
            or img.shape[2] % step
        ):
            raise ValueError(
                f"image {i} has shape {tuple(img.shape)}; images must be float (C={vision['num_channels']}, H, W) "
                f"tensors with H and W multiples of {step} (patch_size x spatial_merge_size), as mistral-common's "
                "image encoder returns them."
            )
