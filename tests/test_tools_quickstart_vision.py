"""The vision quickstart end to end, shortened: model, pictures, validate_data, torchrun training, accuracy.

The full run (200 steps: held-out accuracy from near chance to above 90%) is measured by hand and
recorded in docs/benchmarks.md. This shortened run proves that every stage runs and reports, that the
eval pictures are new and their answers right, and that the packed scoring of the four candidates
equals scoring each alone and its greedy exact match equals decoding token by token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.tokenize import SampleType, encode_all
from utils import quickstart_vision as qv

STEPS = 2


def _shape_colour(path: Path) -> str:
    """The named colour nearest to the mean of the picture's coloured (far from grey) pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).reshape(-1, 3)
    coloured = pixels[pixels.max(1) - pixels.min(1) > 60]
    mean = coloured.mean(0)
    return min(qv.COLOURS, key=lambda name: float(((np.array(qv.COLOURS[name]) - mean) ** 2).sum()))


def _reference(model, tokenizer, sample: dict, base_dir: Path) -> tuple[list[float], bool]:
    """Each candidate in its own forward with the full logits, and greedy decoding token by token
    (a full forward per step): the reference for the packed, teacher-forced ``score``."""
    def encode(answer: str):
        candidate = {"messages": [sample["messages"][0], {"role": "assistant", "content": answer}]}
        (s,) = encode_all(candidate, tokenizer.instruct_tokenizer, SampleType.INSTRUCT, chunk=False, base_dir=base_dir)
        return s.tokens, s.masks, [torch.as_tensor(im) for im in s.images]

    scores = []
    with torch.no_grad():
        for name in qv.COLOURS:
            tokens, masks, images = encode(name)
            x = torch.tensor(tokens)
            logits = model(x, [len(x)], images=images)  # (tokens, vocab)
            logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, x[1:, None])[:, 0]
            scores.append(logp[torch.tensor(masks[1:])].sum().item())
        tokens, masks, images = encode(sample["messages"][1]["content"])
        prompt, answer = tokens[: masks.index(True)], tokens[masks.index(True):]
        generated: list[int] = []
        while len(generated) < len(answer):
            x = torch.tensor(prompt + generated)
            generated.append(int(model(x, [len(x)], images=images)[-1].argmax()))
    return scores, generated == answer


@pytest.mark.slow
def test_quickstart_vision_runs_end_to_end(tmp_path, capfd) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    work = tmp_path / "qsv"
    result = qv.main(["--workdir", str(work), "--max_steps", str(STEPS), "--n_train", "24", "--n_eval", "8",
                      "--image_size", "32", "--seq_len", "64"])
    out = capfd.readouterr().out
    for stage in ("[1/6]", "[2/6]", "[3/6]", "No errors", "[4/6] held-out accuracy before fine-tuning",
                  "(chance: 25%)", "[5/6] training LoRA adapters: 1 process(es) x ", "[6/6] held-out accuracy after"):
        assert stage in out, stage
    assert sorted(p.name for p in (work / "model").iterdir()) == ["consolidated.safetensors", "params.json", "tekken.json"]
    assert result["chance"] == 0.25
    for key in ("accuracy_before", "accuracy_after", "greedy_before", "greedy_after"):  # 8 pictures: multiples of 1/8
        assert 0 <= result[key] <= 1 and (8 * result[key]).is_integer(), (key, result[key])
    assert json.loads((work / "result.json").read_text()) == result

    train, evals = ([json.loads(line) for line in (work / f"{split}.jsonl").read_text().splitlines()]
                    for split in ("train", "eval"))
    assert len(train) == 24 and len(evals) == 8
    pictures = {split: [work / s["messages"][0]["content"][0]["image_url"] for s in samples]
                for split, samples in (("train", train), ("eval", evals))}
    # Held out: no eval picture's pixels occur in training, and every picture is on disk once.
    train_digests = {qv.picture_digest(p) for p in pictures["train"]}
    eval_digests = {qv.picture_digest(p) for p in pictures["eval"]}
    assert len(train_digests) == 24 and len(eval_digests) == 8 and not train_digests & eval_digests
    # Checkable: the answer is the colour of the shape drawn; the eval set is balanced (chance is 1/4).
    for samples, paths in ((train, pictures["train"]), (evals, pictures["eval"])):
        assert [_shape_colour(p) for p in paths] == [s["messages"][1]["content"] for s in samples]
    assert sorted(s["messages"][1]["content"] for s in evals) == sorted(list(qv.COLOURS) * 2)

    # The trained adapter is the one evaluated, and the packed scoring equals scoring one by one.
    adapter = work / "run" / "checkpoints" / f"checkpoint_{STEPS:06d}" / "consolidated" / "lora.safetensors"
    model = qv.load_for_eval(work / "model", adapter, 16)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not zero
    tokenizer = MistralTokenizer.from_file(str(work / "model" / "tekken.json"))
    for sample in evals[:2]:
        scores, exact = qv.score(model, tokenizer, sample, work)
        want_scores, want_exact = _reference(model, tokenizer, sample, work)
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(want_scores), rtol=1e-5, atol=1e-4)
        assert exact == want_exact


def test_refuses_a_folder_it_did_not_create(tmp_path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="is not a quickstart_vision folder"):
        qv.main(["--workdir", str(other)])
    assert (other / "keep.txt").read_text() == "x"
