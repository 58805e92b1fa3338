"""Config loading: mistral-finetune YAML compatibility, overrides, errors that name the key."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from finetune.args import TrainArgs, load_train_args
from finetune.build import resolve_attention
from finetune.config import ConfigError, to_dict
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
    # Without warm-up the first optimizer step is the peak, as the end of a warm-up is with one.
    args = _args(lr=2e-4, pct_start=0.0, min_lr_ratio=0.1)
    assert lr_at(1, args) == pytest.approx(2e-4, rel=1e-12, abs=0)


def test_attention_auto_resolves_per_device_and_flex_is_refused_where_it_cannot_run():
    # torch.device("cuda") is only a description: no GPU is needed to construct it.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, 128) == "sdpa"
    assert resolve_attention("auto", cuda, 128) == "flex"
    assert resolve_attention("auto", cuda, 8) == "sdpa"  # FlexAttention's GPU kernels need head_dim >= 16
    assert resolve_attention("sdpa", cuda, 128) == "sdpa"
    assert resolve_attention("flex", cuda, 16) == "flex"
    with pytest.raises(ConfigError, match=r"^'attention: flex' needs a CUDA device \(FlexAttention has no backward "
                       r"on CPU\).*\(this run: cpu, head_dim 128\); use attention: sdpa or auto\.$"):
        resolve_attention("flex", cpu, 128)
    with pytest.raises(ConfigError, match=r"head_dim >= 16 \(this run: cuda, head_dim 8\)"):
        resolve_attention("flex", cuda, 8)
    with pytest.raises(ConfigError, match=r"^'attention' is 'flash'; use one of "):
        TrainArgs(model_id_or_path="/m", run_dir="/r", attention="flash").validate()


# --- Where a mistake came from: a command-line option is named as one, a YAML key with its file. ---


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--max_stepz", "5"], r"^command line: unknown option '--max_stepz'\. Did you mean '--max_steps'\?"),
        (["--lora.rnak", "4"], r"^command line: unknown option '--lora.rnak'\. Did you mean '--lora.rank'\?"),
        (["--optimm.lr=1e-4"], r"^command line: unknown option '--optimm.lr'\. Did you mean '--optim.lr'\?"),
        (["--lr", "1e-4"], r"^command line: unknown option '--lr'\. Did you mean '--optim.lr'\?"),
        (["--max_steps.x", "1"], r"^command line: unknown option '--max_steps.x'"),
        (["--max_steps", "abc"], r"^command line: '--max_steps' must be an integer, got 'abc'\."),
        (["--optim.lr=fast"], r"^command line: '--optim.lr' must be a number, got 'fast'\."),
        (["--max_steps", "[5"], r"^command line: '--max_steps' must be an integer, got '\[5'\."),  # not YAML
        (["--batch_size", "0"], r"^command line \(--batch_size 0\): 'batch_size' must be > 0, got 0\."),
        (["--lora.rank=0"], r"^command line \(--lora.rank=0\): lora.rank must be a positive integer"),
        (["--seed", "1", "--lora.enable", "false"],
         r"^command line \(--lora.enable false\): 'save_adapters' is true but 'lora.enable' is false"),
    ],
)
def test_command_line_mistakes_name_the_option_not_the_file(tmp_path, overrides, message):
    path = _write(tmp_path, REFERENCE_7B)
    with pytest.raises(ConfigError, match=message) as e:
        load_train_args(path, overrides)
    assert str(path) not in str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("max_stepz: 5\n", r"unknown key 'max_stepz'\. Did you mean 'max_steps'\?"),
        ("batch_size: ten\n", r"'batch_size' must be an integer, got 'ten'\."),
        ("batch_size: 0\n", r"'batch_size' must be > 0, got 0\."),
        ("lora:\n  rank: 0\n", r"lora.rank must be a positive integer"),
    ],
)
def test_yaml_mistakes_name_the_file_beside_command_line_options(tmp_path, extra, message):
    path = _write(tmp_path, REFERENCE_7B.replace("lora:\n  rank: 64\n", "") + extra)
    with pytest.raises(ConfigError, match=rf"^{path}(: | in 'lora': ){message}"):
        load_train_args(path, ["--seed", "1", "--optim.lr", "1e-4"])


def test_command_line_beats_a_bad_yaml_value(tmp_path):
    path = _write(tmp_path, REFERENCE_7B.replace("max_steps: 300", "max_steps: ten"))
    assert load_train_args(path, ["--max_steps", "5"]).max_steps == 5


def test_a_section_given_as_a_mapping_overrides_only_its_keys(tmp_path):
    args = load_train_args(_write(tmp_path, REFERENCE_7B), ["--lora", "{scaling: 1.0}"])
    assert (args.lora.scaling, args.lora.rank) == (1.0, 64)  # rank stays the YAML's


def test_a_string_option_takes_text_that_is_not_yaml(tmp_path):
    args = load_train_args(_write(tmp_path, REFERENCE_7B), ["--data.eval_instruct_data", "[eval].jsonl"])
    assert args.data.eval_instruct_data == "[eval].jsonl"


def test_saved_args_yaml_loads_back_to_the_same_config(tmp_path):
    """run_dir/args.yaml (what the trainer writes) is itself a valid config: null stays null."""
    args = load_train_args(_write(tmp_path, REFERENCE_7B), ["--num_ckpt_keep", "null", "--checkpoint", "selective"])
    saved = tmp_path / "args.yaml"
    saved.write_text(yaml.safe_dump(to_dict(args), sort_keys=False))
    again = load_train_args(saved)
    assert again == args and again.num_ckpt_keep is None


# Distribution name -> import name, where they differ.
_IMPORT_NAMES = {"pyyaml": "yaml", "mistral-common": "mistral_common"}
# Dependencies that no project file imports, and why each is still needed.
_INDIRECT = {"sentencepiece": "mistral-common needs it to read SentencePiece (v1-v3) tokenizer files"}


def test_every_dependency_is_imported_or_explained():
    """pyproject.toml lists what the code uses: a listed package nothing imports is a false claim."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps]
    sources = [p.read_text() for d in ("finetune", "model", "utils") for p in (root / d).rglob("*.py")]
    sources.append((root / "train.py").read_text())
    code = "\n".join(sources)
    unused = [
        n for n in names
        if n not in _INDIRECT
        and not re.search(rf"^\s*(import|from) {_IMPORT_NAMES.get(n, n.replace('-', '_'))}\b", code, re.M)
    ]
    assert not unused, f"pyproject.toml lists {unused}, which nothing imports"
