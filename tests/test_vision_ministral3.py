"""Ministral 3 as the language model of a ``Mistral3ForConditionalGeneration`` (YaRN rope with the llama-4
query scaling, text_config ``ministral3``): a tiny random one written by transformers loads with
``Transformer.from_folder(..., vision=True)``, in its Hugging Face layout and converted to the native one,
and a packed row of two documents with images of different sizes gives transformers' logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
from PIL import Image

from model.transformer import Transformer
from tests.model_helpers import hf_and_native_mistral3
from tests.test_generate_images import mistral3_config
from tests.test_vision_encoder import Row, _worst_error

VOCAB, ORIGINAL = 128, 16
# Per document: (text tokens before each picture, picture (width, height)) ..., then trailing text. Pictures
# become 2x3, 4x1, 3x2 and 1x2 tokens; the first document runs to position ~45, past the original context
# (16), so YaRN's blend and the llama-4 factors 1, 1 + beta ln 2, 1 + beta ln 3 all show.
DOCS = [([(5, (40, 70)), (9, (100, 30))], 16), ([(3, (70, 50)), (6, (20, 40))], 4)]


def _row() -> Row:
    """(packed tokens, seqlens, each document's images): the [IMG] runs and (C, H, W) arrays are
    mistral-common's image encoding (patch 16, 2x2 merge); text tokens are random non-image ids."""
    encoder = ImageEncoder(ImageConfig(16, 1024, spatial_merge_size=2), SpecialImageIDs(10, 12, 13))
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    text = lambda n: torch.randint(20, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    docs, images = [], []
    for pictures, tail in DOCS:
        ids, imgs = [], []
        for n, (w, h) in pictures:
            enc = encoder(ImageChunk(image=Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
            ids += text(n) + enc.tokens
            imgs.append(torch.from_numpy(enc.image))
        docs.append(ids + text(tail))
        images.append(imgs)
    return torch.tensor(sum(docs, [])), [len(d) for d in docs], images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_ministral3")
    config = mistral3_config({
        "model_type": "ministral3", "vocab_size": VOCAB, "max_position_embeddings": 4 * ORIGINAL,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.3},
    })
    return hf_and_native_mistral3(config, root)


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_image_logits_match_transformers(folders, layout):
    hf, hf_folder, native = folders
    assert type(hf.model.language_model).__name__ == "Ministral3Model"
    ours = Transformer.from_folder(hf_folder if layout == "hf" else native, dtype=torch.float32, vision=True).eval()
    assert ours.args.yarn is not None and ours.args.llama_4_scaling is not None
    tokens, seqlens, _ = _row()
    assert max(seqlens) > 2 * ORIGINAL and (tokens == 10).sum() == 6 + 4 + 6 + 2
    assert _worst_error(ours, hf, _row()) < 1e-4


def test_the_check_can_fail(folders):
    """Without the images, or with the plain rotary embedding of a Mistral text model, the logits move."""
    hf, hf_folder, _ = folders
    ours = Transformer.from_folder(hf_folder, dtype=torch.float32, vision=True).eval()
    assert _worst_error(ours, hf, _row(), with_images=False) > 1e-3
    ours.args = dataclasses.replace(ours.args, yarn=None, llama_4_scaling=None)
    assert _worst_error(ours, hf, _row()) > 1e-3
