"""A tiny model folder, a small chat dataset and a config, for end-to-end training tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.model_helpers import tiny_args, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_vocab_args(**overrides):
    # vocab 32768 so the real v3 tokenizer bundled with mistral-common applies.
    base = dict(vocab_size=32768, dim=32, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=2)
    base.update(overrides)
    return tiny_args(**base)


def write_chat_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            turns = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": turns}) + "\n")


def make_workspace(root: Path, **model_overrides) -> dict:
    """Model folder + train/eval data; returns a base config dict (run_dir still to set)."""
    model = root / "model"
    write_checkpoint(model, tiny_vocab_args(**model_overrides), seed=0)
    write_chat_data(root / "train.jsonl", 300, seed=0)
    write_chat_data(root / "eval.jsonl", 40, seed=1)
    return {
        "model_id_or_path": str(model),
        "data": {"instruct_data": str(root / "train.jsonl"), "eval_instruct_data": str(root / "eval.jsonl"),
                 "cache_dir": str(root / "cache")},
        "seq_len": 128,
        "batch_size": 2,
        "max_steps": 6,
        "optim": {"lr": 5e-2, "pct_start": 0.2},
        "lora": {"rank": 4},
        "log_freq": 1,
        "seed": 0,
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def module_workspace(name: str):
    """A module-scoped ``workspace`` fixture: (root folder, base config) from make_workspace."""
    import pytest

    @pytest.fixture(scope="module")
    def workspace(tmp_path_factory):
        root = tmp_path_factory.mktemp(name)
        return root, make_workspace(root)

    return workspace


def run_config(workspace: tuple[Path, dict], name: str, **overrides) -> Path:
    """The workspace's base config with run_dir ``root/name`` and dotted-key overrides, written to
    ``root/name.yaml``."""
    root, base = workspace
    config = json.loads(json.dumps(base))
    config["run_dir"] = str(root / name)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return write_config(root / f"{name}.yaml", config)


# One thread everywhere: runs that are compared bit for bit must reduce in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_cli(args: list[str], timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def start_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, **kw)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240, extra: list[str] | None = None):
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *(extra or ["--standalone"])]
    return run_cli([*launcher, *args], timeout=timeout)


def read_metrics(run_dir: Path, tag: str = "train") -> list[dict]:
    path = run_dir / f"metrics.{tag}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def microbatches(n: int, seq_len: int, base_density: float, vocab: int = 32768) -> list:
    """Deterministic packed batches of token ids below ``vocab`` with different target counts (density
    grows with the index), so token-weighted and batch-weighted averaging differ: for rank-equivalence
    tests."""
    import numpy as np

    from finetune.data.loader import Batch

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = rng.integers(0, vocab, seq_len).astype(np.int64)
        y = rng.integers(0, vocab, seq_len).astype(np.int64)
        mask = rng.random(seq_len) < base_density + 0.2 * i
        out.append(Batch(x, y, mask, [20, seq_len - 20 - i, i] if i else [seq_len]))
    return out


def init_test_rank(rank: int, world: int, port: int):
    """Join a gloo group of ``world`` processes on localhost (inside a torch.multiprocessing worker)."""
    import torch

    from finetune import distributed as D

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return D.init_distributed()


def load_equal_runs(runs: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The one- and two-rank results ``world1_<kind>.safetensors``/``world2_<kind>.safetensors`` in
    ``runs``, asserted equal (losses, and every tensor saved) within fp32 reduction-order tolerance."""
    from safetensors.torch import load_file

    one = load_file(str(runs / f"world1_{kind}.safetensors"))
    two = load_file(str(runs / f"world2_{kind}.safetensors"))
    assert sorted(one) == sorted(two)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-6, atol=1e-6)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    return one, two
