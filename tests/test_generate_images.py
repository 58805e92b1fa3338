"""Generation with images (``model.generate`` and ``utils.generate --image``) against transformers'
``Mistral3ForConditionalGeneration.generate`` on a tiny random model: the same mistral-common tokens
and pixel arrays give the same greedy tokens and the same prefill logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors, save_model_folder
from model.configs import load_model_args, params_from_args
from model.generate import KVCache, forward_cached, generate
from model.transformer import Transformer
from tests.data_helpers import bundled_tekken_with_images, picture, write_image_tekken, write_tekken
from tests.model_helpers import save_random_hf

NEW = 10  # greedy tokens compared
SIZES = [(40, 70), (100, 30), (40, 20)]  # (width, height) of the test pictures: 2x3, 4x1 and 2x1 tokens
# (not 1x1: transformers 5 squeezes a lone one-token image's features to 1-D and fails)


def encode(tokenizer: MistralTokenizer, pictures: list[Path], text: str) -> tuple[list[int], list[torch.Tensor]]:
    """mistral-common's own encoding of one user turn [pictures..., text]: tokens and (C, H, W) arrays."""
    content = [ImageChunk(image=Image.open(p)) for p in pictures] + [TextChunk(text=text)]
    enc = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=content)]))
    return enc.tokens, [torch.from_numpy(img) for img in enc.images]


def hf_pixels(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' image inputs: the images zero-padded into one batch, with their sizes."""
    hmax, wmax = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    pixels = torch.zeros(len(images), images[0].shape[0], hmax, wmax)
    for b, img in enumerate(images):
        pixels[b, :, : img.shape[1], : img.shape[2]] = img
    return {"pixel_values": pixels, "image_sizes": torch.tensor([list(i.shape[1:]) for i in images])}


def mistral3_config(text_config: dict):
    """A tiny Mistral3 whose vision side fits ``write_image_tekken(merge=2)`` (patch 16, merge 2, [IMG] 10);
    ``text_config`` adds to (or overrides) the tiny text model's keys."""
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config={"vocab_size": 131072, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
                     "sliding_window": None, "tie_word_embeddings": False, **text_config},
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=1024, patch_size=16, head_dim=16, hidden_act="silu"),
        image_token_index=10, spatial_merge_size=2, tie_word_embeddings=False,
    )


def to_native(hf_folder: Path, out: Path, tokenizer_file: Path) -> Path:
    """The HF folder as a native release folder (params.json + consolidated.safetensors + tekken.json)."""
    state = {key: t for key, t, _ in iter_checkpoint_tensors(hf_folder)}
    save_model_folder(out, params_from_args(load_model_args(hf_folder)), state)
    shutil.copy(tokenizer_file, out / "tekken.json")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, native folder, tokenizer, pictures)."""
    from transformers import Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("generate_images")
    tok_file = write_image_tekken(root / "tok", merge=2)
    torch.manual_seed(0)
    config = mistral3_config({"model_type": "mistral", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    hf = save_random_hf(Mistral3ForConditionalGeneration(config), root / "hf")
    native = to_native(root / "hf", root / "native", tok_file)
    pictures = [picture(root / f"picture{i}.png", size, seed=i) for i, size in enumerate(SIZES)]
    return hf, native, MistralTokenizer.from_file(str(tok_file)), pictures


def _hf_greedy(hf, tokens: list[int], images: list[torch.Tensor]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([tokens]), **hf_pixels(images), max_new_tokens=NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(tokens):].tolist()


def test_greedy_tokens_and_prefill_logits_match_transformers(setup):
    hf, native, tok, pictures = setup
    tokens, images = encode(tok, pictures[:2], "What is in these pictures?")
    assert tokens.count(10) == 6 + 4 and [tuple(i.shape) for i in images] == [(3, 96, 64), (3, 32, 128)]
    ours = Transformer.from_folder(native, dtype=torch.float32, vision=True).eval()

    cache = KVCache.empty(ours, 1, len(tokens))
    prefill = forward_cached(ours, torch.tensor([tokens]), torch.arange(len(tokens))[None], cache, images)[0]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([tokens]), **hf_pixels(images)).logits[0]  # (tokens, vocab)
    scale = ref.abs().max().item()
    torch.testing.assert_close(prefill, ref, rtol=1e-4, atol=1e-4 * scale)

    expected = _hf_greedy(hf, tokens, images)
    (cached,) = generate(ours, [tokens], images=[images], max_new_tokens=NEW, eos_id=None)
    (full,) = generate(ours, [tokens], images=[images], max_new_tokens=NEW, eos_id=None, use_cache=False)
    assert cached == full == expected

    # The check can fail: without the images the [IMG] tokens keep their embeddings.
    (blind,) = generate(ours, [tokens], max_new_tokens=NEW, eos_id=None)
    assert blind != expected
    cache = KVCache.empty(ours, 1, len(tokens))
    blind_logits = forward_cached(ours, torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)[0]
    assert (blind_logits - ref).abs().max().item() > 1e-2 * scale


def test_batched_prompts_keep_their_own_images(setup):
    """Right-padded prompts with 2, 1 and no images: each gives what it gives alone, and transformers'."""
    hf, native, tok, pictures = setup
    ours = Transformer.from_folder(native, dtype=torch.float32, vision=True).eval()
    prompts = [encode(tok, pictures[:2], "Describe both."), encode(tok, pictures[2:], "And this one?"),
               encode(tok, [], "No picture here.")]
    batch = generate(ours, [t for t, _ in prompts], images=[i for _, i in prompts], max_new_tokens=NEW, eos_id=None)
    alone = [generate(ours, [t], images=[i], max_new_tokens=NEW, eos_id=None)[0] for t, i in prompts]
    assert batch == alone
    assert batch[1] == _hf_greedy(hf, *prompts[1])
    with pytest.raises(ValueError, match="one list per prompt"):
        generate(ours, [t for t, _ in prompts], images=[prompts[0][1]], max_new_tokens=2, eos_id=None)


def _adapter(native: Path, folder: Path) -> Transformer:
    """A checkpoint folder with non-zero adapters, as training writes it; returns the model it came from."""
    from safetensors.torch import save_file

    from model.lora import freeze_all_but_lora, lora_file_state

    lora = LoraArgs(rank=2)
    model = Transformer.from_folder(native, dtype=torch.float32, vision=True, lora=lora)
    freeze_all_but_lora(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in lora_file_state(model).items()}, str(folder / "lora.safetensors"))
    params = json.loads((native / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "lora": {"rank": 2, "scaling": lora.scaling}}))
    return model.eval()


def test_cli_image_option(setup, tmp_path, capsys, monkeypatch):
    from utils.generate import main

    _, native, tok, pictures = setup
    base = ["--model", str(native), "--prompt", "What is it?", "--max_new_tokens", "6", "--json"]
    with_images = [*base, "--image", str(pictures[0]), "--image", str(pictures[1])]
    assert main(with_images) == 0
    reply = json.loads(capsys.readouterr().out)["reply"]
    # The CLI's prompt is mistral-common's encoding of [images..., text], decoded with the images.
    tokens, images = encode(tok, pictures[:2], "What is it?")
    model = Transformer.from_folder(native, dtype=torch.float32, vision=True).eval()
    eos = tok.instruct_tokenizer.tokenizer.eos_id
    (expected,) = generate(model, [tokens], images=[images], max_new_tokens=6, eos_id=eos)
    assert reply == tok.decode(expected)
    # Chat mode: the pictures go with the first user turn, and again after /reset.
    turns = iter(["What is it?", "/reset", "What is it?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    assert main(["--model", str(native), "--max_new_tokens", "6", *with_images[len(base):]]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [reply, reply]

    # With an adapter: the adapted model's reply, which differs from the base model's.
    adapted = _adapter(native, tmp_path / "ckpt")
    (expected,) = generate(adapted, [tokens], images=[images], max_new_tokens=6, eos_id=eos)
    assert main([*with_images, "--lora", str(tmp_path / "ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["reply"] == tok.decode(expected) != reply


def test_cli_image_errors_name_the_problem(setup, tmp_path, capsys, monkeypatch):
    import importlib.util

    from utils.generate import main

    _, native, _, pictures = setup
    base = ["--model", str(native), "--prompt", "x", "--max_new_tokens", "2"]

    def error(*extra: str) -> str:
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "--image nope.png: no such image file" in error("--image", str(pictures[0]), "--image", "nope.png")
    assert "never downloads" in error("--image", "https://example.com/cat.png")
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else find_spec(name, *a))
        assert "needs OpenCV" in error("--image", str(pictures[0]))
    (tmp_path / "fake.png").write_text("not a picture")
    assert "fake.png is not in an image format" in error("--image", str(tmp_path / "fake.png"))
    # A text-only model, a tokenizer without image config, one with another spatial merge.
    text_only = tmp_path / "text"
    state = {k: t for k, t, _ in iter_checkpoint_tensors(native) if k.startswith(("tok_", "layers.", "norm", "output"))}
    params = {k: v for k, v in json.loads((native / "params.json").read_text()).items() if k != "vision_encoder"}
    save_model_folder(text_only, params, state)
    shutil.copy(native / "tekken.json", text_only / "tekken.json")
    base[1] = str(text_only)
    assert "pictures need a model with a vision encoder" in error("--image", str(pictures[0]))
    base[1] = str(native)
    no_image = write_tekken(tmp_path / "plain", "v13", image=False)
    assert "tokenizer with an image config" in error("--image", str(pictures[0]), "--tokenizer", str(no_image))
    err = error("--image", str(pictures[0]), "--tokenizer", str(bundled_tekken_with_images()))
    assert "16-pixel patches merged 1x1 per [IMG] token (id 10), but the vision encoder reads 16-pixel patches " \
        "merged 2x2 (id 10)" in err
