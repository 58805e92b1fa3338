"""Finding and loading the model's tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model.multimodal import merge_size

logger = logging.getLogger("finetune.data")

# Names Mistral checkpoints ship their tokenizer under, most specific first.
TOKENIZER_NAMES = (
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


def tokenizer_file(model_folder: str | Path | None) -> Path | None:
    """The tokenizer file in a model folder, or None. Checkpoints copy this file next to the adapter."""
    if model_folder is None:
        return None
    folder = Path(model_folder)
    for name in TOKENIZER_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.glob("tokenizer.model.v*") if p.is_file())
    return others[-1] if others else None


def resolve_tokenizer_file(model_folder: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given, else the model folder's own tokenizer file. There is no fallback:
    a guessed tokenizer (say mistral-common's bundled v3 for a Tekken model) gives wrong tokens
    without any error, so a folder without one is refused."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_path {path} does not exist; point it at the model's tekken.json or "
                                    "tokenizer.model.v* file.")
        return path
    path = tokenizer_file(model_folder)
    if path is None:
        hf = " (a Hugging Face tokenizer.json is not one)" if (Path(model_folder) / "tokenizer.json").is_file() else ""
        raise FileNotFoundError(
            f"No mistral-common tokenizer file in {model_folder}{hf}: looked for tekken.json and tokenizer.model.v*. "
            "Copy the model's tekken.json or tokenizer.model.v* from its official release into that folder, or "
            "set tokenizer_path: /path/to/tekken.json in the config."
        )
    return path


def load_tokenizer(model_folder: str | Path, vocab_size: int, tokenizer_path: str | Path | None = None) -> MistralTokenizer:
    """The model's tokenizer (see resolve_tokenizer_file), checked against its vocabulary size."""
    path = resolve_tokenizer_file(model_folder, tokenizer_path)
    try:
        tokenizer = MistralTokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(
            f"Cannot load tokenizer {path} ({type(e).__name__}: {e}). Replace it with the file from the "
            "model's official release."
        ) from None
    n_words = tokenizer.instruct_tokenizer.tokenizer.n_words
    if n_words > vocab_size:  # fewer is fine: some checkpoints pad the embedding table
        raise ValueError(
            f"Tokenizer {path} has {n_words} tokens but params.json has vocab_size {vocab_size}; "
            "the tokenizer file does not belong to this model."
        )
    logger.info("Using tokenizer %s (%s)", path, tokenizer.instruct_tokenizer.tokenizer.version.value)
    return tokenizer


def tokenizer_file_to_ship(tokenizer: MistralTokenizer) -> tuple[Path, str]:
    """(source file, name in a checkpoint) of the tokenizer a run uses: the file it was loaded from,
    under the name mistral-common and mistral-inference look for (a ``tokenizer_path`` may be named
    anything)."""
    src = Path(tokenizer.instruct_tokenizer.tokenizer.file_path)
    if src.name in TOKENIZER_NAMES or src.name.startswith("tokenizer.model.v"):
        return src, src.name
    return src, "tekken.json" if src.suffix == ".json" else "tokenizer.model"


def check_image_tokenizer(tokenizer: MistralTokenizer, vision: dict | None, folder: str | Path) -> None:
    """Pictures need a model with a vision encoder (``vision``: its params.json block) that reads them as
    the tokenizer cuts them: same patch size, same merge of patches into one ``[IMG]`` token, same
    ``[IMG]`` id. A mismatch would otherwise surface as a count of [IMG] tokens deep in the forward."""
    if vision is None:
        raise ValueError(
            f"the pictures need a model with a vision encoder, but {folder} has none (its params.json has no "
            "'vision_encoder' block, or its config.json no vision_config); use a multimodal checkpoint (Pixtral, "
            "Mistral Small 3.1+, Ministral 3), or leave the pictures out."
        )
    encoder = tokenizer.instruct_tokenizer.image_encoder
    if encoder is None:
        raise ValueError(
            f"the pictures need a tokenizer with an image config, but the tokenizer used with {folder} has none; "
            "use the multimodal model's own tekken.json (tokenizer_path, or --tokenizer)."
        )
    config, ids = encoder.image_config, encoder.special_ids
    ours = (vision["patch_size"], merge_size(vision), vision.get("image_token_id", 10))
    theirs = (config.image_patch_size, config.spatial_merge_size, ids.img)
    if ours != theirs:
        raise ValueError(
            f"{folder}: the tokenizer cuts pictures into {theirs[0]}-pixel patches merged {theirs[1]}x{theirs[1]} "
            f"per [IMG] token (id {theirs[2]}), but the vision encoder reads {ours[0]}-pixel patches merged "
            f"{ours[1]}x{ours[1]} (id {ours[2]}); the tokenizer file belongs to another model: use the one "
            "shipped with this checkpoint (tokenizer_path, or --tokenizer)."
        )
