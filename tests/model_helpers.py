"""Test helpers around ``model.tiny`` (tiny models and checkpoints): the real tokenizer files."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from model.args import ModelArgs
from model.tiny import random_base_model, tiny_args, write_random_model

__all__ = ["bundled_tokenizer_file", "random_base_model", "read_params", "tiny_args", "write_checkpoint"]


def write_checkpoint(folder: Path, args: ModelArgs, seed: int = 0, layout: str = "safetensors",
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """``model.tiny.write_random_model``; with ``tokenizer``, models of the v3 (32768) or Tekken
    (131072) vocabulary also get the matching real tokenizer file that mistral-common ships, as an
    official release folder has."""
    state = write_random_model(folder, args, seed, layout, dtype)
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
