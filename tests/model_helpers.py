"""Tiny Mistral-architecture models for tests, built from the same dataclasses as real ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.args import ModelArgs, MoeArgs
from model.checkpoint import save_model_folder
from model.transformer import Transformer


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
        norm_eps=1e-5, vocab_size=128, rope_theta=10000.0,
    )
    base.update(overrides)
    if isinstance(base.get("moe"), dict):
        base["moe"] = MoeArgs(**base["moe"])
    return ModelArgs(**base)


def random_base_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed)
    return model.to(dtype)


def write_checkpoint(folder: Path, args: ModelArgs, seed: int = 0, layout: str = "safetensors",
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Save a seeded random base model in an official folder layout; returns its state dict."""
    state = random_base_model(args, seed, dtype).state_dict()
    save_model_folder(folder, args.to_dict(), state, layout=layout)
    return state


def read_params(folder: Path) -> dict:
    return json.loads((folder / "params.json").read_text())
