"""Config loading: mistral-finetune YAML compatibility, overrides, errors that name the key."""

from __future__ import annotations

import math

import pytest

from finetune.args import TrainArgs, load_train_args
from finetune.config import ConfigError
from finetune.trainer import lr_at

# A mistral-finetune user's existing file (its example/7B.yaml with paths filled in).
REFERENCE_7B = """
data:
  instruct_data: "/data/ultrachat_chunk_train.jsonl"
  data: ""
  eval_instruct_data: "/data/ultrachat_chunk_eval.jsonl"
model_id_or_path: "/models/mistral_7b"
lora:
  rank: 64
seq_len: 32768
batch_size: 1
max_steps: 300
optim:
  lr: 6.e-5
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
no_eval: False
ckpt_freq: 100
save_adapters: True
run_dir: "/runs/test"
wandb:
  project: ""
  run_name: ""
  offline: False
"""


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_reference_yaml_loads_unchanged(tmp_path):
    args = load_train_args(_write(tmp_path, REFERENCE_7B))
    assert args.lora.rank == 64 and args.seq_len == 32768 and args.optim.lr == 6e-5
    assert args.no_eval is False and args.eval_freq == 100 and args.ckpt_freq == 100
    assert not args.wandb_enabled  # project "" means off, not an error
    assert args.optim.betas == [0.9, 0.95]


def test_overrides_beat_yaml_and_defaults(tmp_path):
    args = load_train_args(_write(tmp_path, REFERENCE_7B), ["--max_steps", "50", "--optim.lr=1e-4", "--lora.rank", "8",
                                                            "--data.instruct.shuffle", "false"])
    assert (args.max_steps, args.optim.lr, args.lora.rank) == (50, 1e-4, 8)
    assert args.data.instruct.shuffle is False
    assert args.optim.weight_decay == 0.1  # untouched YAML value


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        ("sequence_len: 10\n", [], r"unknown key 'sequence_len'\. Did you mean 'seq_len'\?"),
        ("optim:\n  learning_rate: 1\n", [], r"unknown key 'optim.learning_rate'"),
        ("", ["--lora.rnak", "4"], r"unknown key 'lora.rnak'\. Did you mean 'lora.rank'\?"),
        ("", ["--max_steps", "ten"], r"'max_steps' must be an integer, got 'ten'"),
        ("", ["--batch_size", "0"], r"'batch_size' must be > 0"),
        ("", ["--lora.rank", "0"], r"lora.rank must be a positive integer"),
        ("", ["--precision", "fp8"], r"'precision' is 'fp8'; use one of auto, bf16, fp16, fp32"),
        ("", ["--optim.pct_start", "1.5"], r"'optim.pct_start' must be in \[0, 1\)"),
        ("", ["--data.eval_instruct_data", ""], r"'no_eval' is false but 'data.eval_instruct_data' is empty"),
        ("", ["--lora.enable", "false"], r"'save_adapters' is true but 'lora.enable' is false"),
        ("wandb:\n  key: abc\n", [], r"export WANDB_API_KEY"),
        ("", ["--max_steps"], r"--max_steps needs a value"),
        ("", ["--checkpoint", "partial"], r"'checkpoint' is 'partial'; use true \(full\), selective or false"),
    ],
)
def test_bad_values_name_key_value_and_fix(tmp_path, extra, overrides, message):
    text = REFERENCE_7B.replace("wandb:\n  project: \"\"\n  run_name: \"\"\n  offline: False\n", "") + extra
    with pytest.raises(ConfigError, match=message):
        load_train_args(_write(tmp_path, text), overrides)


@pytest.mark.parametrize("value, mode", [("true", "full"), ("false", "none"), ("selective", "selective"),
                                         ("full", "full"), ("none", "none")])
def test_checkpoint_takes_a_bool_or_a_mode(tmp_path, value, mode):
    assert load_train_args(_write(tmp_path, REFERENCE_7B), ["--checkpoint", value]).checkpoint_mode == mode


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'run_dir'"):
        load_train_args(_write(tmp_path, "model_id_or_path: /m\ndata:\n  instruct_data: x.jsonl\n"))


def test_empty_data_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="data.data and data.instruct_data are both empty"):
        load_train_args(_write(tmp_path, "model_id_or_path: /m\nrun_dir: /r\n"))


def _args(**kw) -> TrainArgs:
    args = TrainArgs(model_id_or_path="/m", run_dir="/r", max_steps=100)
    for k, v in kw.items():
        setattr(args.optim, k, v)
    return args


def test_schedule_warms_up_then_decays_by_cosine():
    args = _args(lr=1e-3, pct_start=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, args) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4)  # step 1 of 10 warm-up steps
    assert lrs[9] == pytest.approx(1e-3)  # peak at the end of warm-up
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)  # lr * min_lr_ratio
    mid = 10 + 45
    assert lr_at(mid, args) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_no_warmup_starts_at_peak():
    assert lr_at(1, _args(lr=2e-4, pct_start=0.0)) == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi / 100)))
