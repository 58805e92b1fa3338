"""Image fine-tuning end to end in real processes: two ranks train LoRA on the language model and on
the vision side with conversations with pictures, resume exactly, and the merged folder, the in-training
merge and the PEFT adapter on transformers' model all see the pictures as the adapters did."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from safetensors.torch import load_file

from finetune.checkpointing import gather_merged
from finetune.data.tokenize import SampleType, encode_all
from finetune.loss import TransformerWithLoss
from model.args import LoraArgs
from model.checkpoint import load_adapters
from model.tiny import tiny_vision_args, write_random_vision_model
from model.transformer import Transformer
from tests.data_helpers import write_image_tekken
from tests.train_helpers import read_metrics, torchrun, write_config
from utils import export_hf, merge_lora

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
LORA = {"rank": 4, "scaling": 2.0, "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "vision_encoder.wq",
                                                    "vision_encoder.w2", "vision_language_adapter.w_in"]}


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _write_data(root: Path, name: str, n: int, seed: int) -> Path:
    """Conversations about a shape's colour, each with one or two pictures of a few sizes."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        refs = []
        for k in range(rng.choice([1, 1, 2])):
            colour = rng.choice(list(COLOURS))
            w, h = rng.choice([(32, 32), (64, 32), (32, 64)])
            image = Image.new("RGB", (w, h), (255, 255, 255))
            image.paste(COLOURS[colour], (4, 4, w - 4, h - 4))
            image.save(root / "pics" / f"{name}{i}_{k}.png")
            refs.append((f"pics/{name}{i}_{k}.png", colour))
        content = [{"type": "image_url", "image_url": ref} for ref, _ in refs]
        content.append({"type": "text", "text": "Which colours?"})
        lines.append({"messages": [{"role": "user", "content": content},
                                   {"role": "assistant", "content": " and ".join(c for _, c in refs)}]})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vision-e2e")
    (root / "pics").mkdir()
    model = root / "model"
    write_random_vision_model(model, tiny_vision_args(merge=2, vocab_size=131072, dim=32, hidden_dim=64,
                                                      n_heads=2, n_kv_heads=1), seed=0)
    write_image_tekken(model, merge=2)
    train, evaluation = _write_data(root, "train", 48, 0), _write_data(root, "eval", 8, 1)
    config = {
        "model_id_or_path": str(model), "run_dir": str(root / "full"),
        "data": {"instruct_data": str(train), "eval_instruct_data": str(evaluation), "cache_dir": str(root / "cache")},
        "seq_len": 64, "batch_size": 2, "max_steps": 4, "ckpt_freq": 2, "eval_freq": 2, "no_eval": False,
        "optim": {"lr": 5e-2, "pct_start": 0.2}, "lora": LORA, "log_freq": 1, "seed": 0,
    }
    cfg = write_config(root / "full.yaml", config)
    _ok(torchrun(["train.py", str(cfg)], nproc=2))
    return {"root": root, "model": model, "cfg": cfg, "run": root / "full", "eval": evaluation}


def test_two_ranks_train_on_pictures_and_evaluate(workspace) -> None:
    train = read_metrics(workspace["run"])
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert train[-1]["loss"] < train[0]["loss"]
    assert [m["step"] for m in read_metrics(workspace["run"], "eval")] == [2, 4]


def test_resume_on_pictures_equals_uninterrupted(workspace) -> None:
    """The step-2 checkpoint of the same run, resumed by the same command: same losses and adapters, bit
    for bit (each rank's loader position, with its buffer of pieces and their pictures, is restored)."""
    run, resumed = workspace["run"], workspace["root"] / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint_000004")
    config = yaml.safe_load(workspace["cfg"].read_text())
    config["run_dir"] = str(resumed)
    _ok(torchrun(["train.py", str(write_config(workspace["root"] / "resumed.yaml", config))], nproc=2))
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(run)]
    assert [m["eval_loss"] for m in read_metrics(resumed, "eval")] == [m["eval_loss"] for m in read_metrics(run, "eval")]
    a = load_file(str(resumed / "checkpoints/checkpoint_000004/consolidated/lora.safetensors"))
    b = load_file(str(run / "checkpoints/checkpoint_000004/consolidated/lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _row(workspace) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A conversation with two pictures of several [IMG] tokens each, tokenized as training does."""
    it = MistralTokenizer.from_file(str(workspace["model"] / "tekken.json")).instruct_tokenizer
    for name, size in (("wide", (64, 32)), ("tall", (32, 96))):
        Image.new("RGB", size, COLOURS["red" if name == "wide" else "blue"]).save(workspace["root"] / f"{name}.png")
    line = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "wide.png"},
                                     {"type": "image_url", "image_url": "tall.png"},
                                     {"type": "text", "text": "Which colours?"}]},
        {"role": "assistant", "content": "red and blue"}]}
    [sample] = encode_all(line, it, SampleType.INSTRUCT, chunk=False, base_dir=workspace["root"])
    return torch.tensor(sample.tokens), [torch.from_numpy(im) for im in sample.images]


@pytest.fixture(scope="module")
def trained(workspace) -> tuple[Transformer, Path]:
    """The run's final adapters on the base model (vision side built), and their checkpoint."""
    ckpt = workspace["run"] / "checkpoints" / "checkpoint_000004"
    lora = Transformer.from_folder(workspace["model"], vision=True, dtype=torch.float32, lora=LoraArgs(**LORA))
    load_adapters(lora, ckpt / "consolidated" / "lora.safetensors")
    adapters = load_file(str(ckpt / "consolidated" / "lora.safetensors"))
    assert any(k.startswith("vision_encoder.transformer.layers.1.attention.wq.") for k in adapters)
    assert any(k.startswith("vision_language_adapter.w_in.") for k in adapters)
    return lora, ckpt


def test_merged_model_sees_pictures_as_the_adapters_did(workspace, trained, tmp_path) -> None:
    lora, ckpt = trained
    assert merge_lora.main(["--base_model", str(workspace["model"]), "--lora", str(ckpt),
                            "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    tokens, images = _row(workspace)
    merged = Transformer.from_folder(tmp_path / "merged", vision=True, dtype=torch.float32)
    base = Transformer.from_folder(workspace["model"], vision=True, dtype=torch.float32)
    with torch.no_grad():
        want = lora(tokens, [len(tokens)], images)
        torch.testing.assert_close(merged(tokens, [len(tokens)], images), want, rtol=1e-4, atol=1e-5)
        assert (base(tokens, [len(tokens)], images) - want).abs().max() > 1e-3  # the adapters changed something
    # The in-training merge (save_adapters: false) folds the vision adapters in too.
    in_training = gather_merged(TransformerWithLoss(lora), torch.float32, workspace["model"])
    on_disk = load_file(str(tmp_path / "merged" / "consolidated.safetensors"))
    assert in_training.keys() == on_disk.keys()
    for key in on_disk:
        torch.testing.assert_close(in_training[key], on_disk[key], rtol=1e-6, atol=1e-7, msg=key)


def test_peft_export_gives_our_logits_with_pictures(workspace, trained, tmp_path) -> None:
    from peft import PeftModel
    from transformers import Mistral3ForConditionalGeneration

    from tests.test_vision_encoder import _hf_logits

    lora, ckpt = trained
    export_hf.main(["--checkpoint", str(workspace["model"]), "--merged", "--out", str(tmp_path / "base_hf")])
    export_hf.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "peft")])
    base = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens, images = _row(workspace)
    with torch.no_grad():
        ours = lora(tokens, [len(tokens)], images)
    theirs = _hf_logits(peft, tokens, images)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
