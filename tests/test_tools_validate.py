"""validate_data and inspect_data end to end on small files, with the real v3 tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from finetune.args import load_train_args
from finetune.data.args import DataArgs
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data
from tests.data_helpers import chat, spm, tool_conversation, write_jsonl
from tests.model_helpers import write_checkpoint
from tests.test_data_errors import BAD_INSTRUCT
from tests.train_helpers import run_cli, tiny_vocab_args
from utils import inspect_data, validate_data

BAD_PRETRAIN = {
    "blank_line": b"",
    "encoding": b'{"text": "caf\xe9"}',
    "empty_text": b'{"text": ""}',
    "invalid_json": b'{"text": ',
}
# write_corrected repairs tool-call arguments given as a JSON object instead of dropping the line.
REPAIRED = "arguments_object"


def _workspace(tmp_path, instruct: list[str], pretrain: list[bytes] | None = None, **config) -> str:
    write_checkpoint(tmp_path / "model", tiny_vocab_args())
    write_jsonl(tmp_path / "train.jsonl", instruct)
    data = {"instruct_data": str(tmp_path / "train.jsonl"), "cache_dir": str(tmp_path / "cache")}
    if pretrain is not None:
        (tmp_path / "text.jsonl").write_bytes(b"".join(line + b"\n" for line in pretrain))
        data["data"] = str(tmp_path / "text.jsonl")
    cfg = {"model_id_or_path": str(tmp_path / "model"), "run_dir": str(tmp_path / "run"), "data": data,
           "seq_len": 64, "batch_size": 2, "max_steps": 10, **config}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _good(i: int) -> str:
    return json.dumps(chat(random.Random(i), 1, max_words=5))


def test_every_bad_input_class_reported_and_corrected(tmp_path, capsys) -> None:
    lines, expected_bad = [], {}  # line number -> kind
    for i, case in enumerate(sorted(BAD_INSTRUCT)):
        bad, kind, _ = BAD_INSTRUCT[case]
        lines += [_good(i), bad if isinstance(bad, str) else json.dumps(bad)]
        expected_bad[len(lines)] = (case, kind)
    lines.append(json.dumps(tool_conversation()))  # function calling is valid data
    pretrain = [b'{"text": "ok"}']
    pretrain_bad = {}
    for kind, raw in BAD_PRETRAIN.items():
        pretrain += [raw, b'{"text": "fine"}']
        pretrain_bad[len(pretrain) - 1] = kind
    config = _workspace(tmp_path, lines, pretrain)
    train, text = tmp_path / "train.jsonl", tmp_path / "text.jsonl"
    originals = {train: train.read_bytes(), text: text.read_bytes()}

    assert validate_data.main(["--train_yaml", config, "--create_corrected", "--max_errors", "0"]) == 1
    out = capsys.readouterr().out
    for n, (_, kind) in expected_bad.items():
        assert f"{train}:{n}: " in out, (n, kind)
    for n, kind in pretrain_bad.items():
        assert f"{text}:{n}: " in out, (n, kind)
    kinds = {k for _, k in expected_bad.values()} | set(pretrain_bad.values())
    for kind in kinds:
        assert f"\n[{kind}] " in out
    n_bad = len(expected_bad)
    assert f"data.instruct_data {train}: 1 file(s), {len(lines)} lines, {len(lines) - n_bad} valid, {n_bad} INVALID" in out
    assert "training would refuse to start" in out

    # .corrected: the valid lines byte for byte, in order; the originals untouched.
    assert {p: p.read_bytes() for p in originals} == originals
    kept = [line for n, line in enumerate(lines, start=1)
            if n not in expected_bad or expected_bad[n][0] == REPAIRED]
    corrected = (tmp_path / "train.jsonl.corrected").read_text().splitlines()
    assert len(corrected) == len(kept)
    for got, want in zip(corrected, kept, strict=True):
        if got != want:  # only the repaired line differs, and only by encoding arguments as a string
            assert json.loads(got)["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    text_kept = [line for n, line in enumerate(pretrain, start=1) if n not in pretrain_bad]
    assert (tmp_path / "text.jsonl.corrected").read_bytes() == b"".join(line + b"\n" for line in text_kept)
    for path in (tmp_path / "train.jsonl.corrected", tmp_path / "text.jsonl.corrected"):
        sample_type = "instruct_data" if path.name.startswith("train") else "data"
        assert check_data(DataArgs(**{sample_type: str(path)}, cache_dir=str(tmp_path / "c2")), spm(), 64).ok


def test_valid_data_statistics_and_plan(tmp_path, capsys) -> None:
    lines = [_good(i) for i in range(40)] + [json.dumps(tool_conversation())]
    config = _workspace(tmp_path, lines, num_microbatches=3)
    stats = tmp_path / "stats.json"
    assert validate_data.main(["--train_yaml", config, "--num_gpus", "4", "--stats_json", str(stats)]) == 0
    out = capsys.readouterr().out
    assert "No errors" in out and "assuming 4 x H100" in out and "x num_microbatches 3 x 4 GPUs)" in out
    report = json.loads(stats.read_text())
    plan = report["plan"]
    assert plan["tokens_per_step"] == 2 * 64 * 3 * 4
    assert plan["train_tokens"] == 10 * plan["tokens_per_step"]
    (source,) = report["sources"]
    assert source["lines"] == 41 and source["invalid"] == 0
    assert source["samples"] == 41 + 2  # the tool conversation is chunked into its 3 assistant turns
    expected_tokens = sum(len(encode_all(json.loads(line), spm(), SampleType.INSTRUCT, chunk=False)[0].tokens) for line in lines)
    assert source["tokens"] > expected_tokens  # chunked prefixes add tokens
    assert plan["epochs_per_source"][f"data.instruct_data {tmp_path / 'train.jsonl'}"] == pytest.approx(
        plan["train_tokens"] / source["tokens"])
    assert plan["eta_seconds"] == pytest.approx(plan["train_tokens"] / (4 * plan["tokens_per_s_per_device"]))
    assert f"{plan['tokens_per_s_per_device']:,.0f} tokens/s each" in plan["eta_assumption"]


def test_packing_filler_is_what_identical_samples_leave(tmp_path) -> None:
    # Samples of P positions each: rows of seq_len hold seq_len // P whole samples and seq_len % P
    # positions of filler, every row. A packer that left rows emptier, or split samples that fit, shows.
    sample = {"messages": [{"role": "user", "content": "Reverse: a b c d"},
                           {"role": "assistant", "content": "d c b a"}]}
    (encoded,) = encode_all(sample, spm(), SampleType.INSTRUCT, chunk=False)
    positions, seq_len = len(encoded.tokens) - 1, 64  # inputs are tokens[:-1]
    assert seq_len % positions and seq_len // positions >= 2  # filler to measure, and samples to pack
    config = _workspace(tmp_path, [json.dumps(sample)] * 40, seq_len=seq_len)
    stats = tmp_path / "stats.json"
    assert validate_data.main(["--train_yaml", config, "--stats_json", str(stats)]) == 0
    filler = json.loads(stats.read_text())["plan"]["packing_filler_fraction"]
    assert filler == pytest.approx((seq_len % positions) / seq_len, abs=1e-12)


def test_without_a_gpu_no_eta_is_guessed_and_the_report_is_whole(tmp_path, capsys, monkeypatch) -> None:
    # A CPU-only machine, however the tests run: the default plan is one CPU process, and no ETA is
    # made up from H100 figures (it printed 'ETA 0:00:00 assuming 8 x H100').
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = _workspace(tmp_path, [_good(i) for i in range(20)])
    assert validate_data.main(["--train_yaml", config]) == 0
    out = capsys.readouterr().out
    assert "assuming" not in out and "0:00:00" not in out
    assert "ETA                         not estimated: no GPU on this machine: --measure" in out
    assert "(batch_size 2 x seq_len 64 x num_microbatches 1 x 1 CPU process)" in out
    # Source names in full (tmp_path makes them longer than the 40 characters they were cut at).
    name = f"data.instruct_data {tmp_path / 'train.jsonl'}"
    assert len(name) > 40
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert row.split()[2:5] == ["20", "0", "20"]  # lines, invalid, samples
    assert f"  {name}\n" in out  # the epochs line
    # Planning for GPUs from a CPU machine: said so, with the number of devices and never 0:00:00
    # (a tiny model's steps take well under a second at the scaled reference throughput).
    assert validate_data.main(["--train_yaml", config, "--num_gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "x num_microbatches 1 x 4 GPUs)" in out and "assuming 4 x H100" in out
    assert "ETA                         under a second assuming 4 x H100" in out


def test_eta_counts_evaluations_and_checkpoints_as_train_py_runs_them() -> None:
    # train.py evaluates / saves every `freq` steps (0: never) and always at the last step.
    assert [validate_data._count(10, f) for f in (0, 1, 4, 5, 10, 20)] == [1, 10, 3, 2, 1, 1]
    args = load_train_args("example/7B.yaml")  # 300 steps, eval and checkpoint every 100
    timings = {"startup_s": 30.0, "first_step_s": 9.0, "step_s": 5.0, "eval_s": 20.0, "checkpoint_s": 4.0,
               "exit_s": 1.0, "eval_batches": 10}
    seconds, parts = validate_data.measured_eta(args, timings)
    assert seconds == 30 + 9 + 299 * 5 + 3 * 20 + 3 * 4 + 1 == sum(parts.values())
    args.no_eval, args.no_ckpt = True, True
    assert validate_data.measured_eta(args, timings)[0] == 30 + 9 + 299 * 5 + 1


def test_measure_times_a_real_run_of_the_config(tmp_path) -> None:
    config = _workspace(tmp_path, [_good(i) for i in range(20)], no_eval=False,
                        data={"instruct_data": str(tmp_path / "train.jsonl"),
                              "eval_instruct_data": str(tmp_path / "train.jsonl"),
                              "cache_dir": str(tmp_path / "cache")})
    stats = tmp_path / "stats.json"
    result = run_cli(["-m", "utils.validate_data", "--train_yaml", config, "--measure", "--measure_steps", "2",
                      "--stats_json", str(stats)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "from a short real run on this machine: 1 CPU process x 1 thread(s), fp32" in result.stdout
    assert "measured peak memory" in result.stdout
    plan = json.loads(stats.read_text())["plan"]
    m = plan["measured"]
    assert m["processes"] == 1 and m["steps"] >= 2 and m["eval_batches"] > 0
    for key in ("startup_s", "first_step_s", "step_s", "eval_s", "checkpoint_s", "exit_s"):
        assert m[key] > 0, key
    # Startup (interpreter, imports, model) is part of the ETA, which is more than steps x step time.
    assert plan["eta_seconds"] == pytest.approx(sum(plan["eta_parts"].values()))
    assert plan["eta_seconds"] > 10 * m["step_s"] + m["startup_s"]
    assert not list(tmp_path.glob("run*")), "the measurement wrote into the config's run_dir"


def test_config_errors_exit_2(tmp_path, capsys) -> None:
    config = _workspace(tmp_path, [_good(0)])
    raw = yaml.safe_load(open(config))
    raw["max_step"] = 3
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(raw))
    assert validate_data.main(["--train_yaml", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown key 'max_step'. Did you mean 'max_steps'?" in capsys.readouterr().err
    raw.pop("max_step")
    raw["model_id_or_path"] = str(tmp_path / "nowhere")
    (tmp_path / "nomodel.yaml").write_text(yaml.safe_dump(raw))
    assert validate_data.main(["--train_yaml", str(tmp_path / "nomodel.yaml")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    write_checkpoint(tmp_path / "v1", tiny_vocab_args(vocab_size=32000))
    raw["model_id_or_path"] = str(tmp_path / "v1")
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(raw))
    assert validate_data.main(["--train_yaml", str(tmp_path / "v1.yaml")]) == 2
    assert "python -m utils.extend_model_vocab --original_model_ckpt" in capsys.readouterr().err


def test_inspect_shows_trained_tokens(tmp_path, capsys) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": "Reverse: a b"},
                                      {"role": "assistant", "content": "b a"}]}), "{oops", _good(1)]
    config = _workspace(tmp_path, lines)
    assert inspect_data.main(["--train_yaml", config, "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "<s>[INST] Reverse: a b[/INST]« b a</s>»" in out  # plain text off a terminal
    assert f"{tmp_path / 'train.jsonl'}:2: invalid (invalid_json)" in out
    assert inspect_data.main(["--train_yaml", config, "-n", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = encode_all(json.loads(lines[0]), spm(), SampleType.INSTRUCT, chunk=False)[0]
    assert rows[0]["tokens"] == expected.tokens and rows[0]["trained"] == expected.masks
    assert rows[0]["n_trained"] == 3  # " b", " a" and EOS; nothing of the prompt
    assert rows[1]["error"] == "invalid_json" and rows[2]["line"] == 3
    assert inspect_data.main(["--train_yaml", config, "--color", "always", "-n", "1"]) == 0
    assert "\033[1;32m" in capsys.readouterr().out


def test_examples_load_and_7b_matches_the_reference() -> None:
    args = load_train_args("example/7B.yaml")
    assert (args.seq_len, args.batch_size, args.max_steps) == (32768, 1, 300)
    assert (args.optim.lr, args.optim.weight_decay, args.optim.pct_start) == (6e-5, 0.1, 0.05)
    assert (args.lora.rank, args.seed, args.log_freq, args.eval_freq, args.no_eval, args.ckpt_freq) == (
        64, 0, 1, 100, False, 100)
    assert args.save_adapters and not args.wandb_enabled  # project "" means off
    for name in ("nemo", "mixtral_8x7b"):
        text = open(f"example/{name}.yaml").read()
        assert text.startswith("# ") and "Sized for:" in text
        load_train_args(f"example/{name}.yaml")


def test_create_corrected_that_cannot_be_written_is_one_line(tmp_path, capsys) -> None:
    config = _workspace(tmp_path, [_good(0), '{"messages": ['])
    # Root may write anywhere, so the unwritable target is a directory where the copy would go.
    (tmp_path / "train.jsonl.corrected").mkdir()
    assert validate_data.main(["--train_yaml", config, "--create_corrected"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write the corrected copy")
    assert str(tmp_path / "train.jsonl.corrected") in err and "copy the data to a folder you can write to" in err


def test_tokenizer_path_and_tilde_cache_dir_are_honoured(tmp_path, capsys, monkeypatch) -> None:
    config = _workspace(tmp_path, [_good(0), _good(1)])
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["data"]["cache_dir"] = "~/tok"
    tok = tmp_path / "model" / "tokenizer.model.v3"
    moved = tmp_path / "elsewhere.model.v3"
    tok.rename(moved)
    Path(config).write_text(yaml.safe_dump(cfg))
    assert validate_data.main(["--train_yaml", config]) == 2
    assert "tokenizer_path" in capsys.readouterr().err
    cfg["tokenizer_path"] = str(moved)
    Path(config).write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert validate_data.main(["--train_yaml", config]) == 0
    assert any((tmp_path / "home" / "tok").iterdir())


def test_measure_on_a_corrupt_weights_file_is_one_line(tmp_path) -> None:
    config = _workspace(tmp_path, [_good(i) for i in range(4)])
    weights = tmp_path / "model" / "consolidated.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(["-m", "utils.validate_data", "--train_yaml", config, "--measure"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: --measure: the timed run failed: {weights} cannot be read (")
    assert "the file is truncated or corrupt" in errors[0]
    assert "Traceback" not in result.stderr
