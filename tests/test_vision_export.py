"""``utils.export_hf`` of adapters with vision targets (``model.args.VISION_TARGETS``): the PEFT adapter
loaded onto transformers' ``Mistral3ForConditionalGeneration`` and the ``--merged`` model give our logits
with images (relative error < 1e-4, float32), on a tiny random model written by ``save_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import model.multimodal as multimodal
from model.args import DEFAULT_TARGETS, VISION_TARGETS, LoraArgs
from model.transformer import Transformer
from tests.model_helpers import hf_and_native_mistral3
from tests.test_vision_encoder import _worst_error
from tests.test_vision_lora import adapter_checkpoint, mistral3_config, trained
from utils.export_hf import main as export

LANGUAGE = list(DEFAULT_TARGETS)
ALL = [*DEFAULT_TARGETS, *VISION_TARGETS]
_PEFT = "base_model.model.model."
# transformers' module for each of our vision targets, in layer 0 (PEFT keys follow module names).
HF_VISION_MODULES = {
    "vision_tower.transformer.layers.0.attention.q_proj", "vision_tower.transformer.layers.0.attention.k_proj",
    "vision_tower.transformer.layers.0.attention.v_proj", "vision_tower.transformer.layers.0.attention.o_proj",
    "vision_tower.transformer.layers.0.feed_forward.gate_proj", "vision_tower.transformer.layers.0.feed_forward.down_proj",
    "vision_tower.transformer.layers.0.feed_forward.up_proj",
    "multi_modal_projector.linear_1", "multi_modal_projector.linear_2", "multi_modal_projector.patch_merger.merging_layer",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the same weights in the native layout)."""
    return hf_and_native_mistral3(mistral3_config(), tmp_path_factory.mktemp("vision_export"))


def _run(base, tmp_path, targets: list[str], std: float = 0.1) -> tuple[Transformer, object]:
    """A LoRA model with trained-looking adapters of size ``std`` on ``targets`` and its checkpoint folder."""
    lora = LoraArgs(rank=2, scaling=1.5, target_modules=targets)
    model = trained(Transformer.from_folder(base, dtype=torch.float32, vision=True, lora=lora), std=std)
    return model, adapter_checkpoint(model, tmp_path / "ckpt", targets)


def _peft_model(hf_folder, adapter):
    from peft import PeftModel
    from transformers import Mistral3ForConditionalGeneration

    base = Mistral3ForConditionalGeneration.from_pretrained(hf_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("targets", [LANGUAGE, ALL], ids=["language", "language+vision"])
def test_peft_adapter_gives_our_logits_with_images(folders, tmp_path, targets):
    hf, hf_folder, _ = folders
    model, ckpt = _run(hf_folder, tmp_path, targets)
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "peft")])
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    vision_keys = {k for k in keys if not k.startswith(_PEFT + "language_model.")}
    expected = {f"{_PEFT}{m}.lora_{ab}.weight" for m in HF_VISION_MODULES for ab in "AB"}
    assert {k for k in vision_keys if ".layers.1." not in k} == (expected if targets == ALL else set())
    peft = _peft_model(hf_folder, tmp_path / "peft")
    adapted = {n.removeprefix(_PEFT).removesuffix(".lora_A") for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert {n for n in adapted if not n.startswith("language_model.")} == {
        k.removeprefix(_PEFT).removesuffix(".lora_A.weight") for k in vision_keys if k.endswith("lora_A.weight")}
    assert _worst_error(model, peft) < 1e-4
    assert _worst_error(model, hf) > 1e-3  # the adapters matter, or the comparison proves nothing


def test_vision_qk_lora_b_rows_must_be_permuted(folders, tmp_path, monkeypatch):
    """Exported without the rotate-half permutation of the encoder's q/k ``lora_B`` rows, the PEFT model
    no longer matches: the parity check sees it."""
    hf, hf_folder, _ = folders
    model, ckpt = _run(hf_folder, tmp_path, ["vision_encoder.wq", "vision_encoder.wk"], std=0.3)
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "right")])
    right = _worst_error(model, _peft_model(hf_folder, tmp_path / "right"))
    monkeypatch.setattr(multimodal, "_PERMUTED_LEAVES", (".weight",))
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "wrong")])
    wrong = _worst_error(model, _peft_model(hf_folder, tmp_path / "wrong"))
    assert right < 1e-4 < 1e-3 < wrong
    assert _worst_error(model, hf) > 1e-3  # what the q/k adapters change


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_merged_export_loads_in_transformers_with_our_logits(folders, tmp_path, layout):
    from transformers import Mistral3ForConditionalGeneration

    hf, hf_folder, native = folders
    base = native if layout == "native" else hf_folder
    model, ckpt = _run(base, tmp_path, ALL)
    export(["--checkpoint", str(ckpt), "--base_model", str(base), "--out", str(tmp_path / "out"), "--merged"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Mistral3ForConditionalGeneration"]
    exported = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert _worst_error(model, exported) < 1e-4
    assert _worst_error(model, hf) > 1e-3


def test_untrained_vision_targets_are_not_exported(folders, tmp_path):
    """A run on text alone builds no vision side, yet its params.json lists the vision targets configured:
    the PEFT adapter names only the modules that have adapters (PEFT would add fresh ones to the rest)."""
    _, hf_folder, _ = folders
    model = trained(Transformer.from_folder(hf_folder, dtype=torch.float32, lora=LoraArgs(rank=2, target_modules=ALL)))
    ckpt = adapter_checkpoint(model, tmp_path / "ckpt", ALL)
    assert "patch_merger.merging_layer" in json.loads((ckpt / "params.json").read_text())["lora"]["target_modules"]
    export(["--checkpoint", str(ckpt), "--base_model", str(hf_folder), "--out", str(tmp_path / "peft")])
    assert "vision_tower" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    peft = _peft_model(hf_folder, tmp_path / "peft")
    adapted = [n for n, _ in peft.named_modules() if n.endswith("lora_A")]
    assert adapted and all(".language_model.layers." in n for n in adapted)
