"""The quickstart pipeline end to end, shortened: model, data, validate_data, torchrun training, accuracy.

The full run (300 steps, 0% -> 100% held-out accuracy) is measured by hand and recorded in
docs/benchmarks.md. Exact-match accuracy needs most of those steps (150 steps of the default size
reached 3% here, in 48 s), so this shortened run proves that every stage runs and reports, that the
untrained model gets nothing right, and that the training it runs improves the held-out loss of
the task's answers, measured here with and without the adapter it saved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from finetune.data.tokenize import SampleType, encode_all
from tests.train_helpers import run_cli
from utils import quickstart

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


def _heldout_loss(model, tokenizer, eval_file: Path) -> float:
    """Mean natural-log loss of the answer tokens (what training targets) over the held-out file."""
    total, n = 0.0, 0
    with torch.no_grad():
        for line in eval_file.read_text().splitlines():
            (sample,) = encode_all(json.loads(line), tokenizer.instruct_tokenizer, SampleType.INSTRUCT, chunk=False)
            tokens, targets = torch.tensor(sample.tokens), torch.tensor(sample.masks[1:])
            logits = model(tokens[:-1], [len(tokens) - 1])  # (positions, vocab)
            nll = torch.nn.functional.cross_entropy(logits.float(), tokens[1:], reduction="none")
            total, n = total + nll[targets].sum().item(), n + int(targets.sum())
    return total / n


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    work = tmp_path / "qs"
    result = run_cli(
        [
            "-m",
            "utils.quickstart",
            "--workdir",
            str(work),
            "--max_steps",
            str(STEPS),
            "--dim",
            "128",
            "--rank",
            "16",
            "--lr",
            "3e-3",
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
        "[5/6] training LoRA adapters: 1 process(es) x ",
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
    # A random model reverses no held-out prompt. The shortened training gets none right either, but it
    # lowers the answers' held-out loss (10.39 -> 9.72 here; a random model starts near ln(32768)).
    assert result_json["accuracy_before"] == 0 and 0 <= result_json["accuracy_after"] <= 1
    tokenizer = MistralTokenizer.from_file(str(work / "model" / "tokenizer.model.v3"))
    adapter = work / "run" / "checkpoints" / f"checkpoint_{STEPS:06d}" / "consolidated" / "lora.safetensors"
    before = _heldout_loss(quickstart.load_for_eval(work / "model", None, 16), tokenizer, work / "eval.jsonl")
    after = _heldout_loss(quickstart.load_for_eval(work / "model", adapter, 16), tokenizer, work / "eval.jsonl")
    assert after < before - 0.2, (before, after)
    # ... and train.py's own evaluation of the same file at the last step agrees.
    (last_eval,) = [json.loads(line) for line in (work / "run" / "metrics.eval.jsonl").read_text().splitlines()]
    assert last_eval["step"] == STEPS and last_eval["eval_loss"] == pytest.approx(after, rel=1e-4)
    assert result_json["eta_seconds"] > 0  # validate_data --measure's ETA, compared in the summary
    assert re.search(r"validate_data --measure predicted \d+ s, [+-]\d+%\)", out)
    # A rerun replaces its own folder but never deletes one it did not create.
    other = tmp_path / "mine"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("x")
    refused = run_cli(["-m", "utils.quickstart", "--workdir", str(other), "--max_steps", "1"])
    assert refused.returncode != 0 and "is not a quickstart folder" in refused.stderr
    assert (other / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("cores, load, threads", [(2, 0.2, 2), (2, 0.6, 1), (2, 2.7, 1), (8, 1.4, 7), (1, 0.0, 1)])
def test_cpu_trains_in_one_process_with_the_idle_cores(monkeypatch, cores, load, threads):
    # Two processes split the same cores and add gloo all-gathers; threads that share their cores
    # with other work wait at every OpenMP barrier (docs/benchmarks.md).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    nproc, got, why = quickstart.launch_processes()
    assert (nproc, got) == (1, threads)
    assert f"{cores} cores, load average {load:.1f}" in why


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_one_time_claim_everywhere(capsys):
    # --help, README.md and docs/tools.md once made three different claims (~5, 2-4 and ~2 minutes).
    claim = quickstart.TIME_CLAIM
    with pytest.raises(SystemExit):
        quickstart.main(["--help"])
    assert claim in " ".join(capsys.readouterr().out.split())
    readme, tools = (REPO / "README.md").read_text(), (REPO / "docs/tools.md").read_text()
    row = next(line for line in tools.splitlines() if line.startswith("| `quickstart` |"))
    for where, text in (("README", _section(readme, "\n## Quickstart")), ("tools.md", _section(tools, "\n## Quickstart")),
                        ("tools.md table", row)):
        assert claim in " ".join(text.split()), where
        for other in re.findall(r"\d+(?:[–-]\d+)? ?(?:s\b|min)", text.replace(claim, "")):
            pytest.fail(f"{where} makes another time claim: {other!r}")
