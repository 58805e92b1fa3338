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
