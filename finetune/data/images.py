"""Images in user messages: parse an image chunk, then load the picture it names.

Parsing (``parse_image_chunk``) needs no tokenizer and reads no file: it checks the chunk's shape,
refuses URLs (training never downloads anything) and resolves a path against the JSONL file's folder,
giving an ``ImageURLChunk`` holding a ``file://`` or ``data:`` URI. Encoding (``load_image``) reads it,
so a missing, unreadable or undecodable picture is reported with the message and chunk it came from;
mistral-common's image encoder then turns the loaded picture into tokens and a (C, H, W) array.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk
from PIL import Image, UnidentifiedImageError

from finetune.data.errors import DataFormatError

IMAGE_SHAPES = (
    '{"type": "image_url", "image_url": "pics/cat.png"} (a path relative to the JSONL file, an absolute path '
    'or a data: URI; {"url": ...} also works) or {"type": "image", "image": ...}'
)
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def require_opencv(what: str) -> None:
    """mistral-common's image encoder resizes with OpenCV, which only the ``vision`` extra installs; an
    ImportError names ``what`` needs it and the install command."""
    if importlib.util.find_spec("cv2") is None:
        raise ImportError(
            f"{what} needs OpenCV (mistral-common's image encoder resizes with it); "
            "pip install 'mistral-lora-finetune[vision]' (opencv-python-headless)."
        )


def parse_image_chunk(chunk: dict, where: str, base_dir: Path | None) -> ImageURLChunk:
    """The picture a chunk names, as a ``file://`` (absolute) or ``data:`` URI. Relative paths are taken
    from ``base_dir`` (the JSONL file's folder), or the current directory when it is None."""
    kind = chunk["type"]
    ref = chunk.get(kind)
    if kind == "image_url" and isinstance(ref, dict):
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref.strip():
        raise DataFormatError(
            "bad_image", f"{where} '{kind}' is {_short(ref)}; write a file path or a data: URI, as {IMAGE_SHAPES}."
        )
    if ref[:8].lower().startswith(("http://", "https://")):
        raise DataFormatError(
            "bad_image",
            f"{where} is the URL {_short(ref)}; training never downloads images: save the picture next to the "
            "JSONL file and write its relative path (or embed it as a data: URI).",
        )
    if ref.startswith("data:"):
        return ImageURLChunk(image_url=ref)
    if kind == "image" and len(ref) >= 64 and _BASE64.match(ref):  # mistral-common's ImageChunk serialisation
        return ImageURLChunk(image_url="data:application/octet-stream;base64," + ref)
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return ImageURLChunk(image_url="file://" + str(path))


def load_image(chunk: ImageURLChunk, where: str) -> ImageChunk:
    """Read and decode the picture, fully, so that every problem surfaces here with ``where`` named."""
    raw, name = read_image_bytes(chunk.get_url(), where)
    return decode_image(raw, where, name)


def read_image_bytes(url: str, where: str) -> tuple[bytes, str]:
    """The encoded picture a ``file://`` or ``data:`` URI holds, and a name for messages."""
    if url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise DataFormatError(
                "bad_image", f"{where} is a data: URI without base64 data; write data:image/png;base64,<data>."
            )
        try:
            return base64.b64decode(payload, validate=True), "the data: URI"
        except (binascii.Error, ValueError):
            raise DataFormatError(
                "bad_image", f"{where} is a data: URI whose payload is not valid base64; re-encode the picture."
            ) from None
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise DataFormatError(
            "bad_image",
            f"{where} names the image file {path}, which does not exist; relative paths are taken from the "
            "JSONL file's folder.",
        )
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise DataFormatError(
            "bad_image", f"{where}: the image file {path} cannot be read ({e.strerror}); check its permissions."
        ) from None


def decode_image(raw: bytes, where: str, name: str) -> ImageChunk:
    """Decode an encoded picture (PNG, JPEG, ...) completely, as mistral-common's encoder will read it."""
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()  # decode now: a truncated file fails here, not inside the encoder
    except UnidentifiedImageError:
        raise DataFormatError(
            "bad_image",
            f"{where}: {name} is not in an image format Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF, ...); "
            "convert it to PNG or JPEG.",
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataFormatError(
            "bad_image", f"{where}: {name} cannot be decoded ({e}); re-save it as PNG or JPEG."
        ) from None
    return ImageChunk(image=image)


def image_spans(tokens: np.ndarray, special: Any) -> np.ndarray:
    """(images, 2) int64 ``[start, end)`` of each picture's token run (``[IMG]``/``[IMG_BREAK]`` tokens up
    to its ``[IMG_END]``), in order; ``special`` is mistral-common's ``SpecialImageIDs``."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == special.img_end) + 1
    inside = (tokens == special.img) | (tokens == special.img_break)
    # A run starts where an image token follows a token that is not one (or starts the sample).
    starts = np.flatnonzero(inside & ~np.concatenate(([False], inside[:-1])))
    assert len(starts) == len(ends), "every [IMG] run ends with [IMG_END] (mistral-common's layout)"
    return np.stack((starts, ends), axis=1) if len(ends) else np.zeros((0, 2), np.int64)
