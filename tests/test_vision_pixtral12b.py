"""Pixtral 12B's layout (no patch merger, no pre-projector norm, a biased projector) against transformers'
``LlavaForConditionalGeneration`` with a Pixtral tower, as its Hugging Face release is: reading its
folder, the native conversion, ``export_hf --merged`` back to Llava, and the PEFT adapter, with pictures
of different sizes in a packed row of two documents."""

from __future__ import annotations

import json

import pytest
import torch

from model.args import DEFAULT_TARGETS, VISION_TARGETS, LoraArgs
from model.transformer import Transformer
from tests.model_helpers import hf_and_native_mistral3, tiny_mistral_text_config
from tests.test_vision_encoder import IMG, VOCAB, _row, _worst_error
from tests.test_vision_lora import adapter_checkpoint, trained
from utils.export_hf import main as export

PATCH = 8  # no patch merger: one [IMG] token per 8 px patch, as test_vision_encoder's 4 px patches merged 2x2
DOCS = [[(16, 24), (8, 16)], [(24, 8), (8, 8)]]  # (H, W) px: multiples of the patch, one of a single patch


def _config():
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=tiny_mistral_text_config(VOCAB),
        vision_config=dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=PATCH, head_dim=32, hidden_act="silu"),
        image_token_index=IMG, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    return hf_and_native_mistral3(_config(), tmp_path_factory.mktemp("pixtral12b"), LlavaForConditionalGeneration)


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_llava_pixtral_folders_give_transformers_logits(folders, layout):
    hf, hf_folder, native = folders
    params = json.loads((native / "params.json").read_text())["vision_encoder"]
    assert "mm_projector_id" not in params and params["adapter_bias"] is True
    ours = Transformer.from_folder(hf_folder if layout == "hf" else native, vision=True, dtype=torch.float32)
    assert not hasattr(ours, "patch_merger") and not hasattr(ours, "pre_mm_projector_norm")
    assert _worst_error(ours, hf, _row(DOCS)) < 1e-4
    with torch.no_grad():  # the check can fail: without the projector's bias the logits move
        ours.vision_language_adapter.w_in.bias.zero_()
    assert _worst_error(ours, hf, _row(DOCS)) > 1e-3


def test_export_writes_llava_and_the_peft_adapter_fits_it(folders, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    hf, hf_folder, native = folders
    targets = [*DEFAULT_TARGETS, *(t for t in VISION_TARGETS if t != "patch_merger.merging_layer")]
    model = trained(Transformer.from_folder(native, dtype=torch.float32, vision=True,
                                            lora=LoraArgs(rank=2, scaling=1.5, target_modules=targets)))
    ckpt = adapter_checkpoint(model, tmp_path / "ckpt", targets)
    export(["--checkpoint", str(ckpt), "--base_model", str(native), "--out", str(tmp_path / "merged"), "--merged"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert _worst_error(model, merged, _row(DOCS)) < 1e-4
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "peft")])
    base = LlavaForConditionalGeneration.from_pretrained(hf_folder, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert any("vision_tower" in n and n.endswith("lora_A") for n, _ in peft.named_modules())
    assert _worst_error(model, peft, _row(DOCS)) < 1e-4
    assert _worst_error(model, hf, _row(DOCS)) > 1e-3  # the adapters matter
