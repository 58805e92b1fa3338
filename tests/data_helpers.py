"""Sample builders and file writers shared by the data tests (plain functions, no fixtures)."""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import mistral_common
import numpy as np
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image

_WORDS = "alpha beta gamma delta model token data Paris Rome weather train answer question".split()

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def spm() -> Any:
    return MistralTokenizer.v3().instruct_tokenizer


def tekken() -> Any:
    return MistralTokenizer.v3(is_tekken=True).instruct_tokenizer


def bundled_tekken_with_images() -> Path:
    """mistral-common's bundled Tekken file that carries an image config (patch 16, max size 1024)."""
    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def write_tekken(folder: Path, version: str, think: bool = True, image: bool = False) -> Path:
    """A Tekken file of instruct ``version`` (v7, v11, v13, v15) as newer checkpoints ship it.

    mistral-common bundles Tekken files of version v3 only. This one is ``tekken_240911.json`` with
    ``config.version`` set and the special tokens listed: the classic ranks 0-19, fillers, then [ARGS],
    [CALL_ID] and (with ``think``) [THINK], [/THINK] at ranks 32-35, where Magistral's file has them;
    v15 also gets [MODEL_SETTINGS], [/MODEL_SETTINGS] after them. ``image`` keeps the file's image config
    ([IMG], [IMG_BREAK], [IMG_END] are ranks 10, 12, 13); otherwise the tokenizer is text only.
    """
    model = json.loads(bundled_tekken_with_images().read_text(encoding="utf-8"))
    if not image:
        model.pop("image")
    model["config"]["version"] = version
    names = [str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    names += [f"<SPECIAL_{i}>" for i in range(len(names), 32)]
    names += ["[ARGS]", "[CALL_ID]"] + (["[THINK]", "[/THINK]"] if think else [])
    names += ["[MODEL_SETTINGS]", "[/MODEL_SETTINGS]"] if version == "v15" else []
    model["special_tokens"] = [{"rank": i, "token_str": n, "is_control": True} for i, n in enumerate(names)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tekken.json"
    path.write_text(json.dumps(model), encoding="utf-8")
    return path


def write_image_tekken(folder: Path, merge: int = 2) -> Path:
    """A v13 file whose image config merges ``merge`` x ``merge`` patches into one token (Mistral Small
    3.1's does 2x2), for ``model.tiny.tiny_vision_args(merge=...)`` models."""
    path = write_tekken(folder, "v13", image=True)
    model = json.loads(path.read_text(encoding="utf-8"))
    model["image"]["spatial_merge_size"] = merge
    path.write_text(json.dumps(model), encoding="utf-8")
    return path


def picture(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> Path:
    """A ``size`` (width, height) picture of noise (RGBA for PNG, so transparency handling is exercised)."""
    rng = np.random.default_rng(seed)
    mode, channels = ("RGBA", 4) if fmt == "PNG" else ("RGB", 3)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, format=fmt)
    return path


_TEKKEN_DIR = tempfile.TemporaryDirectory(prefix="tekken-")  # removed when the test process ends


@functools.cache
def tekken_v(version: str, think: bool = True, image: bool = False) -> Any:
    """The instruct tokenizer of a written Tekken ``version`` file, loaded the way training loads it."""
    folder = Path(_TEKKEN_DIR.name) / f"{version}-{'think' if think else 'plain'}{'-image' if image else ''}"
    return MistralTokenizer.from_file(str(write_tekken(folder, version, think, image))).instruct_tokenizer


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def call(call_id: str, city: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def tool_conversation(system: bool = True) -> dict:
    """Two tool calls, a tool answer, a plain answer and a final tool call."""
    msgs: list[dict] = [{"role": "system", "content": "Be brief."}] if system else []
    msgs += [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call("aB3dE5gH7", "Paris")]},
        {"role": "tool", "tool_call_id": "aB3dE5gH7", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20C in Paris."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "tool_calls": [call("zZ9yY8xX7", "Rome")]},
    ]
    return {"messages": msgs, "tools": TOOLS}


def chat(rng: random.Random, turns: int, max_words: int = 40, **extra: Any) -> dict:
    msgs = []
    for _ in range(turns):
        msgs.append({"role": "user", "content": words(rng, rng.randint(1, max_words))})
        msgs.append({"role": "assistant", "content": words(rng, rng.randint(1, max_words))})
    return {"messages": msgs, **extra}


def write_jsonl(path: Path, samples: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write((s if isinstance(s, str) else json.dumps(s)) + "\n")
    return path


def numbered_texts(prefix: str, n: int, rng: random.Random, max_words: int = 60) -> list[dict]:
    """Pretraining docs whose text starts with a unique tag, so every sample's tokens are unique."""
    return [{"text": f"{prefix}{i} " + words(rng, rng.randint(1, max_words))} for i in range(n)]


def tool_conversation_with(**changes) -> dict:
    """tool_conversation() with message fields replaced: ``_1__content="x"`` sets messages[1]["content"]."""
    s = tool_conversation()
    for path, value in changes.items():
        i, key = path.lstrip("_").split("__")
        s["messages"][int(i)][key] = value
    return s
