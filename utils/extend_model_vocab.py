"""Extend a 32000-token (v1 tokenizer) Mistral checkpoint to the 32768-token v3 vocabulary.

    python -m utils.extend_model_vocab --original_model_ckpt DIR --extended_model_ckpt NEW_DIR [--seed 0]

The v3 SentencePiece vocabulary is the v1 vocabulary with 768 control tokens ([INST], [/INST],
[TOOL_CALLS], ...) inserted after <unk>, <s>, </s>: old token i >= 3 becomes token i + 768. So the
embedding and output matrices are re-laid out as

    rows 0-2        old rows 0-2 (unk, bos, eos)
    rows 3-770      new control tokens: random rows with the per-dimension mean and standard
                    deviation of the old rows (distinct, because LoRA keeps embeddings frozen)
    rows 771-32767  old rows 3-31999

and every other tensor is copied. The new folder gets ``consolidated.safetensors`` (streamed, one
tensor in memory at a time), ``params.json`` with ``vocab_size: 32768`` and mistral-common's v3
tokenizer as ``tokenizer.model.v3``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from model.checkpoint import iter_checkpoint_tensors
from model.configs import load_model_args, params_from_args
from model.streaming import tensor_specs, write_streamed

OLD_VOCAB, NEW_VOCAB, N_SPECIAL, N_CONTROL = 32000, 32768, 3, 768
_VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")


def v3_tokenizer_path() -> Path:
    """mistral-common's bundled v3 tokenizer, after checking it is laid out as described above."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.v3().instruct_tokenizer.tokenizer
    if (
        tok.n_words != NEW_VOCAB
        or tok.id_to_piece(N_SPECIAL + N_CONTROL) != "<0x00>"
        or tok.id_to_piece(2) != "</s>"
    ):
        raise RuntimeError(
            f"mistral-common's bundled v3 tokenizer ({tok.file_path}) does not have the expected layout "
            f"(n_words {tok.n_words}, token 771 {tok.id_to_piece(771)!r}); update mistral-common."
        )
    return Path(tok.file_path)


def extend_rows(old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(32000, dim) -> (32768, dim) in the v3 layout."""
    old32 = old.float()
    mean, std = old32.mean(0), old32.std(0)  # (dim,)
    new_rows = mean + std * torch.randn(N_CONTROL, old.shape[1], generator=generator)  # (768, dim)
    return torch.cat([old32[:N_SPECIAL], new_rows, old32[N_SPECIAL:]]).to(old.dtype)


def extend(src: Path, dst: Path, seed: int) -> None:
    args = load_model_args(src)
    if args.vocab_size != OLD_VOCAB:
        raise ValueError(
            f"{src}/params.json has vocab_size {args.vocab_size}; only {OLD_VOCAB}-token (v1) checkpoints need "
            f"extending. A {NEW_VOCAB}-token model can be fine-tuned as it is."
        )
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"--extended_model_ckpt {dst} is not empty; choose a new folder.")
    tokenizer = v3_tokenizer_path()
    specs = []
    for key, shape, dtype in tensor_specs(src):
        if key in _VOCAB_KEYS:
            if shape != (OLD_VOCAB, args.dim):
                raise ValueError(f"{src}: '{key}' has shape {shape}, expected ({OLD_VOCAB}, {args.dim}).")
            shape = (NEW_VOCAB, args.dim)
        specs.append((key, shape, dtype))
    generator = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor, _ in iter_checkpoint_tensors(src):
            yield key, extend_rows(tensor, generator) if key in _VOCAB_KEYS else tensor

    dst.mkdir(parents=True, exist_ok=True)
    write_streamed(dst / "consolidated.safetensors", specs, tensors())
    params = params_from_args(args)
    params["vocab_size"] = NEW_VOCAB
    (dst / "params.json").write_text(json.dumps(params, indent=4) + "\n")
    shutil.copy2(tokenizer, dst / "tokenizer.model.v3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.extend_model_vocab", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--original_model_ckpt", required=True, help="folder of the 32000-token model")
    parser.add_argument("--extended_model_ckpt", required=True, help="new (or empty) folder for the result")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new control-token rows")
    opts = parser.parse_args(argv)
    src, dst = Path(opts.original_model_ckpt), Path(opts.extended_model_ckpt)
    try:
        if not src.is_dir():
            raise FileNotFoundError(f"--original_model_ckpt {src} is not a model folder.")
        extend(src, dst, opts.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {dst} (vocab_size {NEW_VOCAB}, tokenizer.model.v3). Set model_id_or_path: {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
