"""Tiny Mistral-architecture models for tests, built from the same dataclasses as real ones."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from model.args import ModelArgs, MoeArgs
from model.checkpoint import save_model_folder
from model.configs import params_from_args
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
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """Save a seeded random base model in an official folder layout; returns its state dict.
    With ``tokenizer``, models of the v3 (32768) or Tekken (131072) vocabulary get the matching real
    tokenizer file that mistral-common ships, as an official release folder has."""
    state = random_base_model(args, seed, dtype).state_dict()
    save_model_folder(folder, params_from_args(args), state, layout=layout)
    if tokenizer and args.vocab_size in (32768, 131072):
        src = bundled_tokenizer_file(tekken=args.vocab_size == 131072)
        shutil.copy(src, folder / ("tekken.json" if src.suffix == ".json" else "tokenizer.model.v3"))
    return state


@functools.cache
def bundled_tokenizer_file(tekken: bool = False) -> Path:
    """mistral-common's bundled v3 tokenizer file (SentencePiece, or Tekken)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return Path(MistralTokenizer.v3(is_tekken=tekken).instruct_tokenizer.tokenizer.file_path)


def read_params(folder: Path) -> dict:
    return json.loads((folder / "params.json").read_text())
