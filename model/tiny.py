"""Tiny Mistral-architecture models, built from the same dataclasses as real ones: what the tests,
the GPU checks (``benchmarks/cuda_checks.py``) and the benchmarks run when the shape does not matter."""

from __future__ import annotations

from pathlib import Path

import torch

from model.args import ModelArgs, MoeArgs
from model.checkpoint import save_model_folder
from model.configs import params_from_args
from model.transformer import Transformer


def tiny_args(**overrides) -> ModelArgs:
    """A 2-layer, 64-dim model with grouped-query attention (4 heads, 2 KV heads); ``moe`` may be a dict."""
    base = dict(
        dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
        norm_eps=1e-5, vocab_size=128, rope_theta=10000.0,
    )
    base.update(overrides)
    if isinstance(base.get("moe"), dict):
        base["moe"] = MoeArgs(**base["moe"])
    return ModelArgs(**base)


def random_base_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """Seeded random base weights (``Transformer.init_weights``), in ``dtype``."""
    model = Transformer(args)
    model.init_weights(seed)
    return model.to(dtype)


def write_random_model(folder: str | Path, args: ModelArgs, seed: int = 0, layout: str = "safetensors",
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A seeded random base model saved as an official folder (``params.json`` + weights in ``layout``:
    safetensors, sharded or pth); returns its state dict. No tokenizer file is written."""
    state = random_base_model(args, seed, dtype).state_dict()
    save_model_folder(folder, params_from_args(args), state, layout=layout)
    return state


def tiny_vision_args(
    merge: int = 2, image_token_ids: tuple[int, int, int] = (10, 12, 13), **overrides
) -> ModelArgs:
    """``tiny_args`` plus a 2-layer, 32-dim Pixtral encoder with patch 16: with ``merge`` 2, a 2x2 patch
    merger and the pre-projector norm (Mistral Small 3.1's layout), with 1 neither (Pixtral 12B's).
    ``image_token_ids`` are the tokenizer's ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]`` (mistral-common's
    bundled tekken files: 10, 12, 13); its image config must have the same patch size and merge."""
    img, brk, end = image_token_ids
    args = tiny_args(**overrides)
    args.extra["vision_encoder"] = {
        "hidden_size": 32, "num_channels": 3, "max_image_size": 1024, "patch_size": 16, "rope_theta": 10000.0,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "image_token_id": img,
        "image_break_token_id": brk, "image_end_token_id": end, "adapter_bias": False,
    }
    if merge > 1:
        args.extra["vision_encoder"].update(
            spatial_merge_size=merge, mm_projector_id="patch_merge", add_pre_mm_projector_layer_norm=True
        )
    return args


def write_random_vision_model(folder: str | Path, args: ModelArgs, seed: int = 0) -> None:
    """A seeded random multimodal model (text model and vision side) saved as a native folder."""
    model = Transformer(args, vision=True)
    model.init_weights(seed)
    save_model_folder(folder, params_from_args(args), model.state_dict())
