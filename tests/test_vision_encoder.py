"""The Pixtral vision encoder and adapter (``model.vision``) against transformers'
``Mistral3ForConditionalGeneration`` on a tiny random model: images of different sizes in one packed
row of two documents give the same logits as transformers run on each document with its images."""

from __future__ import annotations

import pytest
import torch

from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors
from model.lora import freeze_all_but_lora
from model.multimodal import is_vision_key
from model.transformer import Transformer
from tests.model_helpers import hf_and_native_mistral3, tiny_mistral_text_config
from tests.test_generate_images import hf_pixels

VOCAB, IMG, IMG_BREAK, IMG_END = 128, 10, 12, 13
PATCH, MERGE = 4, 2
# Two documents: the first has two images (16x24, 8x16), the second one (24x8); H, W multiples of PATCH*MERGE.
DOCS = [[(16, 24), (8, 16)], [(24, 8)]]


def _config():
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=tiny_mistral_text_config(VOCAB, intermediate_size=96),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=PATCH,
            head_dim=16,
            hidden_act="silu",
        ),
        image_token_index=IMG,
        spatial_merge_size=MERGE,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the same weights in the native layout)."""
    return hf_and_native_mistral3(_config(), tmp_path_factory.mktemp("vision"))


def _image_tokens(h: int, w: int) -> list[int]:
    """transformers' processor layout: rows of [IMG] tokens, each ended by [IMG_BREAK], the last by [IMG_END]."""
    rows, cols = h // (PATCH * MERGE), w // (PATCH * MERGE)
    out = []
    for r in range(rows):
        out += [IMG] * cols + [IMG_END if r == rows - 1 else IMG_BREAK]
    return out


# (packed tokens, seqlens, each document's images)
Row = tuple[torch.Tensor, list[int], list[list[torch.Tensor]]]


def _row(docs_sizes: list[list[tuple[int, int]]] = DOCS) -> Row:
    """(packed tokens, seqlens, each document's images): text, image, text, image, text ... per document,
    one document per entry of ``docs_sizes`` (its images' (H, W), multiples of 8 px)."""
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(20, VOCAB, (n,), generator=gen).tolist()  # noqa: E731 (no image ids)
    docs, images = [], []
    for sizes in docs_sizes:
        ids, imgs = text(3), []
        for h, w in sizes:
            imgs.append(torch.randn(3, h, w, generator=gen))
            ids += _image_tokens(h, w) + text(4)
        docs.append(ids)
        images.append(imgs)
    return torch.tensor(sum(docs, [])), [len(d) for d in docs], images


def _hf_logits(hf, doc: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """transformers on one document: its images zero-padded into one batch, with their sizes (``hf_pixels``)."""
    with torch.no_grad():
        return hf(input_ids=doc[None], **hf_pixels(images), use_cache=False).logits[0]


def _worst_error(ours: Transformer, hf, row: Row | None = None, with_images: bool = True) -> float:
    """Max over the documents of ``row`` (default ``_row()``) of max |ours - transformers| / max |transformers|:
    ours on the packed row (without its images if not ``with_images``), transformers on each document alone."""
    tokens, seqlens, images = _row() if row is None else row
    worst = 0.0
    with torch.no_grad():
        packed = ours(tokens, seqlens, images=[i for doc in images for i in doc] if with_images else None)
    for doc, logits, imgs in zip(tokens.split(seqlens), packed.split(seqlens), images, strict=True):
        ref = _hf_logits(hf, doc, imgs)
        worst = max(worst, ((logits - ref).abs().max() / ref.abs().max()).item())
    return worst


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_image_logits_match_transformers(folders, layout):
    hf, hf_folder, native = folders
    ours = Transformer.from_folder(
        native if layout == "native" else hf_folder, dtype=torch.float32, vision=True
    ).eval()
    native_vision = {k for k, _, _ in iter_checkpoint_tensors(native) if is_vision_key(k)}
    assert {k for k in ours.state_dict() if is_vision_key(k)} == native_vision  # every vision weight loaded
    assert _worst_error(ours, hf) < 1e-4
    # The images matter: without them the [IMG] tokens keep their embeddings and the logits move.
    tokens, seqlens, _ = _row()
    with torch.no_grad():
        text_only = ours(tokens, seqlens)
        ref = _hf_logits(hf, tokens[: seqlens[0]], _row()[2][0])
    assert not torch.allclose(text_only[: seqlens[0]], ref, atol=1e-3)


def test_the_checks_can_fail(folders, monkeypatch):
    """Without the 2-D rotary embedding, or with one image's attention leaking into another's, the
    logits no longer match: the parity test sees positions and the block-diagonal mask."""
    import model.vision as vision

    hf, _, native = folders
    ours = Transformer.from_folder(native, dtype=torch.float32, vision=True).eval()
    real = vision.rotations_2d
    monkeypatch.setattr(vision, "rotations_2d", lambda grids, *a: torch.ones_like(real(grids, *a)))
    assert _worst_error(ours, hf) > 1e-3
    monkeypatch.setattr(vision, "rotations_2d", real)
    monkeypatch.setattr(vision.VisionAttention, "forward", _leaky_attention)
    assert _worst_error(ours, hf) > 1e-3


def _leaky_attention(self, x: torch.Tensor, freqs: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``VisionAttention.forward`` over all patches at once: no block-diagonal mask."""
    from model.rope import apply_rope

    n = x.shape[0]
    q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), freqs).transpose(
        0, 1
    )  # (heads, patches, hd)
    k = apply_rope(self.wk(x).view(n, self.n_heads, self.head_dim), freqs).transpose(
        0, 1
    )  # (heads, patches, hd)
    v = self.wv(x).view(n, self.n_heads, self.head_dim).transpose(0, 1)  # (heads, patches, hd)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (heads, patches, head_dim)
    return self.wo(out.transpose(0, 1).reshape(n, -1))  # (patches, dim)


def test_text_only_build_is_unchanged_and_vision_is_frozen_with_the_base(folders):
    _, _, native = folders
    text = Transformer.from_folder(native, dtype=torch.float32)
    assert not any(is_vision_key(k) for k in text.state_dict())
    model = Transformer.from_folder(native, dtype=torch.float32, vision=True, lora=LoraArgs(rank=2))
    freeze_all_but_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(is_vision_key(n) for n in trainable)
    assert set(text.state_dict()) == {
        k for k in model.state_dict() if not is_vision_key(k) and ".lora_" not in k
    }


def test_user_errors_name_the_fix(folders):
    _, _, native = folders
    tokens, seqlens, images = _row()
    flat = [i for doc in images for i in doc]
    text = Transformer.from_folder(native, dtype=torch.float32)
    with pytest.raises(ValueError, match="vision=True"):
        text(tokens, seqlens, images=flat)
    ours = Transformer.from_folder(native, dtype=torch.float32, vision=True)
    with pytest.raises(ValueError, match=r"\[IMG\] tokens"):
        ours(tokens, seqlens, images=flat[:2])
    with pytest.raises(ValueError, match="multiples of 8"):
        ours(tokens, seqlens, images=[torch.randn(3, 12, 16), *flat[1:]])
