"""The quickstart pipeline end to end, shortened: model, data, validate_data, torchrun training, accuracy.

The full run (300 steps, 0% -> 100% held-out accuracy in about 2 minutes on 2 CPU cores) is
measured by hand and recorded in docs/tools.md; this test only proves every stage runs and reports.
"""

from __future__ import annotations

import json

import pytest

from tests.train_helpers import run_cli


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path) -> None:
    work = tmp_path / "qs"
    result = run_cli(
        [
            "-m",
            "utils.quickstart",
            "--workdir",
            str(work),
            "--max_steps",
            "3",
            "--dim",
            "64",
            "--rank",
            "4",
            "--n_train",
            "200",
            "--n_eval",
            "16",
            "--seq_len",
            "128",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in (
        "[1/6]",
        "[2/6]",
        "[3/6]",
        "No errors",
        "[4/6] held-out exact match before fine-tuning",
        "[5/6] training LoRA adapters: 2 process(es)",
        "[6/6] held-out exact match after",
    ):
        assert stage in out, stage
    assert sorted(p.name for p in (work / "model").iterdir()) == [
        "consolidated.safetensors",
        "params.json",
        "tokenizer.model.v3",
    ]
    train = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 200 and len(evals) == 16
    prompts = {s["messages"][0]["content"] for s in train}
    assert not prompts & {s["messages"][0]["content"] for s in evals}  # held out
    for s in evals:  # the answers are checkable: the letters reversed
        letters = s["messages"][0]["content"].removeprefix("Reverse: ").split()
        assert s["messages"][1]["content"] == " ".join(reversed(letters))
    result_json = json.loads((work / "result.json").read_text())
    assert 0 <= result_json["accuracy_before"] <= 1 and 0 <= result_json["accuracy_after"] <= 1
    assert (
        work / "run" / "checkpoints" / "checkpoint_000003" / "consolidated" / "lora.safetensors"
    ).is_file()
    # A rerun replaces its own folder but never deletes one it did not create.
    other = tmp_path / "mine"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("x")
    refused = run_cli(["-m", "utils.quickstart", "--workdir", str(other), "--max_steps", "1"])
    assert refused.returncode != 0 and "is not a quickstart folder" in refused.stderr
    assert (other / "keep.txt").read_text() == "x"
