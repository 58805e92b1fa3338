"""Try a model, with or without a trained adapter, in the instruct format it was fine-tuned on.

    python -m utils.generate --model MODEL_DIR [--lora RUN_DIR/checkpoints/checkpoint_000300] \\
        --prompt "..." [--system "..."] [--max_new_tokens 256] [--temperature 0] [--top_p 1.0]
    python -m utils.generate --model MODEL_DIR [--lora ...]          # interactive chat
    python -m utils.generate --model MODEL_DIR [--lora ...] --image a.png [--image b.jpg] --prompt "..."

The tokenizer is the model folder's own file (``tekken.json``, ``tokenizer.model.v*``), or
``--tokenizer FILE`` for a folder without one (a Hugging Face folder); it is never guessed.

Greedy decoding at temperature 0 (the default), nucleus sampling otherwise, with a KV cache
(``model.generate``); ``--no_cache`` recomputes every step with a full forward pass, which gives the
same tokens and exists to check exactly that. The prompt is encoded by mistral-common from the
model's own tokenizer, as training encodes user turns. In chat mode, ``/reset`` clears the history and
``/exit`` (or Ctrl-D) quits.

``--image PATH`` (repeatable; local files only, nothing is downloaded) puts the pictures, in order,
before the text of the (first) user message, as a chunk list that mistral-common encodes with the
tokenizer's image config: its ``[IMG]`` runs and (C, H, W) arrays are what the model sees. The model
is then built with its vision encoder (``Transformer.from_folder(..., vision=True)``) and the image
features fill the KV cache at the prefill (``model.generate``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from finetune.data.tokenizer import check_image_tokenizer, load_tokenizer, tokenizer_file
from model.args import LoraArgs
from model.checkpoint import find_adapter, load_adapters
from model.configs import load_model_args
from model.generate import generate
from model.multimodal import vision_block
from model.transformer import Transformer


def load_model(
    model_dir: str, lora: str | None, device: torch.device, dtype: torch.dtype, vision: bool = False
) -> Transformer:
    lora_args = None
    adapter = None
    if lora is not None:
        adapter, params = find_adapter(lora)
        settings = (params or {}).get("lora")
        if not settings:
            raise ValueError(
                f"{adapter.parent}/params.json has no 'lora' section (rank, scaling); it is written by training."
            )
        lora_args = LoraArgs(**{k: v for k, v in settings.items() if k in LoraArgs.__dataclass_fields__})
    model = Transformer.from_folder(
        model_dir, device=device, dtype=dtype, lora=lora_args, attention_backend="sdpa", vision=vision
    )
    if adapter is not None:
        load_adapters(model, adapter)
    return model.eval()


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[torch.Tensor]]:
    """mistral-common's instruct encoding: the tokens and the (C, H, W) arrays of the messages' images."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    encoded = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages))
    return encoded.tokens, [torch.from_numpy(img) for img in encoded.images]


def read_images(paths: list[str]) -> list:
    """``--image`` files as mistral-common ``ImageChunk``s, each read and decoded now (``load_image``, as
    training does) so that an unreadable or undecodable one is named."""
    from mistral_common.protocol.instruct.chunk import ImageURLChunk

    from finetune.data.images import load_image, require_opencv

    if paths:
        try:
            require_opencv("--image")
        except ImportError as e:
            raise ValueError(str(e)) from None  # reported as one line, like the other --image errors
    chunks = []
    for ref in paths:
        if ref[:8].lower().startswith(("http://", "https://")):
            raise ValueError(f"--image {ref} is a URL; generate never downloads images: save the picture and pass its path.")
        path = Path(ref.removeprefix("file://")).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--image {ref}: no such image file ({path}).")
        chunks.append(load_image(ImageURLChunk(image_url=f"file://{path}"), f"--image {ref}"))
    return chunks


def user_message(text: str, images: list) -> dict:
    """A user turn: the text alone, or the images then the text as one chunk list."""
    from mistral_common.protocol.instruct.chunk import TextChunk

    return {"role": "user", "content": [*images, TextChunk(text=text)] if images else text}


def answer(
    model: Transformer, tokenizer, messages: list[dict], opts: argparse.Namespace
) -> tuple[str, int, float]:
    tokens, images = encode_chat(tokenizer, messages)
    t0 = time.perf_counter()
    (out,) = generate(
        model,
        [tokens],
        images=[images] if images else None,
        max_new_tokens=opts.max_new_tokens,
        eos_id=tokenizer.instruct_tokenizer.tokenizer.eos_id,
        temperature=opts.temperature,
        top_p=opts.top_p,
        use_cache=not opts.no_cache,
        seed=opts.seed,
    )
    return tokenizer.decode(out), len(out), time.perf_counter() - t0


def chat(model: Transformer, tokenizer, opts: argparse.Namespace, images: list) -> None:
    """Interactive turns; the ``--image`` pictures belong to the first user turn (again after /reset)."""
    system = [{"role": "system", "content": opts.system}] if opts.system else []
    history: list[dict] = []
    print("Chat mode: /reset clears the history, /exit quits.")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append(user_message(text, [] if history else images))
        reply, n, seconds = answer(model, tokenizer, system + history, opts)
        history.append({"role": "assistant", "content": reply})
        print(reply)
        print(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def _tokenizer(opts: argparse.Namespace):
    """The model's tokenizer; without one, an error naming --tokenizer (not the training config's key)."""
    if opts.tokenizer is None and tokenizer_file(opts.model) is None:
        saved = tokenizer_file(find_adapter(opts.lora)[0].parent) if opts.lora else None
        example = f"{saved} (the copy training saved with the adapter)" if saved else "/path/to/tekken.json"
        raise FileNotFoundError(
            f"--model {opts.model} has no mistral-common tokenizer file (tekken.json, tokenizer.model.v*); copy "
            f"the model's file into it, or pass --tokenizer {example}."
        )
    return load_tokenizer(opts.model, load_model_args(opts.model).vocab_size, opts.tokenizer)


def check_sampling_options(opts: argparse.Namespace) -> str | None:
    """What is wrong with --temperature, --top_p or --max_new_tokens (and the fix), or None.

    ``model.generate`` reads any temperature <= 0 as greedy and any top_p >= 1 as "keep every token",
    so without this check a typo such as ``--temperature -1`` would silently decode greedily.
    """
    t, p, n = opts.temperature, opts.top_p, opts.max_new_tokens
    if not (math.isfinite(t) and t >= 0):
        return f"--temperature {t} must be a finite number >= 0; use 0 for greedy decoding, or e.g. 0.7 to sample."
    if not (0 < p <= 1):  # also false for nan
        return f"--top_p {p} must be in (0, 1]; use 1.0 to sample from every token, or e.g. 0.9."
    if n <= 0:
        return f"--max_new_tokens {n} must be at least 1; e.g. --max_new_tokens 256."
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (params.json + weights + tokenizer)")
    parser.add_argument(
        "--lora", default=None, help="checkpoint folder, its consolidated/ folder or lora.safetensors"
    )
    parser.add_argument(
        "--prompt", default=None, help="one user message; without it, an interactive chat starts"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="a picture (local file) before the prompt's text; repeat for several, in order",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the model's tekken.json or tokenizer.model.v* file, when MODEL_DIR has none (e.g. a Hugging Face folder)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="at least 1")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--no_cache", action="store_true", help="full forward pass per token (slow; for checking)"
    )
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON with token counts")
    opts = parser.parse_args(argv)
    problem = check_sampling_options(opts)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    try:
        if not Path(opts.model).is_dir():
            raise FileNotFoundError(f"--model {opts.model} is not a model folder.")
        images = read_images(opts.image)  # a bad path or a text-only model fails before anything is loaded
        vision = vision_block(load_model_args(opts.model).extra) if images else None
        tokenizer = _tokenizer(opts)
        if images:
            check_image_tokenizer(tokenizer, vision, opts.model)
        model = load_model(opts.model, opts.lora, device, dtype, vision=bool(images))
        if opts.prompt is None:
            chat(model, tokenizer, opts, images)
            return 0
        messages = ([{"role": "system", "content": opts.system}] if opts.system else []) + [
            user_message(opts.prompt, images)
        ]
        reply, n, seconds = answer(model, tokenizer, messages, opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if opts.json:
        print(json.dumps({"prompt": opts.prompt, "images": opts.image, "reply": reply, "new_tokens": n,
                          "seconds": seconds}))
    else:
        print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
