"""Finding and loading the model's tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

logger = logging.getLogger("finetune.data")

# Names Mistral checkpoints ship their tokenizer under, most specific first.
_TOKENIZER_NAMES = (
    "tekken.json",
    "tokenizer.model.v13",
    "tokenizer.model.v11",
    "tokenizer.model.v7m1",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model.v2",
    "tokenizer.model.v1",
    "tokenizer.model",
)
_BUNDLED_VOCAB = {32768: False, 131072: True}  # vocab_size -> is_tekken for MistralTokenizer.v3


def tokenizer_file(model_folder: str | Path | None) -> Path | None:
    """The tokenizer file in a model folder, or None. Checkpoints copy this file next to the adapter."""
    if model_folder is None:
        return None
    folder = Path(model_folder)
    for name in _TOKENIZER_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.glob("tokenizer.model.v*") if p.is_file())
    return others[-1] if others else None


def load_tokenizer(model_folder: str | Path | None, vocab_size: int) -> MistralTokenizer:
    """The tokenizer that ships with the model; only when there is none, mistral-common's bundled one
    for ``vocab_size`` (32768: SentencePiece v3, 131072: Tekken)."""
    path = tokenizer_file(model_folder)
    if path is not None:
        try:
            tokenizer = MistralTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(
                f"Cannot load tokenizer {path} ({type(e).__name__}: {e}). Replace it with the file from the "
                "model's release, or delete it to use mistral-common's bundled tokenizer."
            ) from None
        n_words = tokenizer.instruct_tokenizer.tokenizer.n_words
        if n_words > vocab_size:  # fewer is fine: some checkpoints pad the embedding table
            raise ValueError(
                f"Tokenizer {path} has {n_words} tokens but params.json has vocab_size {vocab_size}; "
                "the tokenizer file does not belong to this model."
            )
        logger.info("Using tokenizer %s (%s)", path, tokenizer.instruct_tokenizer.tokenizer.version.value)
        return tokenizer
    if vocab_size not in _BUNDLED_VOCAB:
        raise ValueError(
            f"No tokenizer file in {model_folder} and no bundled tokenizer for vocab_size {vocab_size} "
            f"(bundled: {sorted(_BUNDLED_VOCAB)}). Copy the model's tekken.json or tokenizer.model.v* into the folder."
        )
    tokenizer = MistralTokenizer.v3(is_tekken=_BUNDLED_VOCAB[vocab_size])
    logger.info(
        "No tokenizer file in %s; using mistral-common's bundled %s",
        model_folder,
        tokenizer.instruct_tokenizer.tokenizer.file_path,
    )
    return tokenizer
