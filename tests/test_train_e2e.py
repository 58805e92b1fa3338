"""train.py end to end, in real processes: single process, torchrun, two 'nodes', resume, kills."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpointing import latest_resumable, list_checkpoints, verify_checkpoint
from model.configs import load_model_args
from model.lora import merge_delta
from tests.train_helpers import (
    module_workspace,
    read_metrics,
    run_cli,
    run_config,
    start_cli,
    torchrun,
)

workspace = module_workspace("train")


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def single(workspace):
    """One plain `python train.py` run with eval and two checkpoints."""
    cfg = run_config(workspace, "single", max_steps=12, ckpt_freq=6, no_eval=False, eval_freq=6)
    _ok(run_cli(["train.py", str(cfg)]))
    return workspace[0] / "single"


def test_loss_goes_down_and_metrics_are_written(single):
    train = read_metrics(single)
    assert [m["step"] for m in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"] - 0.2  # a frozen random 32-dim head bounds the drop
    for key in ("loss", "lr", "tokens_per_s", "peak_mem_gb", "grad_norm"):
        assert all(key in m for m in train)
    evals = read_metrics(single, "eval")
    assert [m["step"] for m in evals] == [6, 12]
    for m in evals:
        assert m["perplexity"] == pytest.approx(__import__("math").exp(m["eval_loss"]))
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    saved = (single / "args.yaml").read_text()
    assert "max_steps: 12" in saved and "model_id_or_path" in saved


def test_compiled_run_equals_eager_run(single, workspace):
    # compile: true end to end: training with checkpointing, evaluation without gradients (its own
    # graph) and checkpoint saving, with the eager run's losses.
    cfg = run_config(workspace, "compiled", max_steps=12, ckpt_freq=6, no_eval=False, eval_freq=6, compile=True)
    _ok(run_cli(["train.py", str(cfg)]))
    compiled = workspace[0] / "compiled"
    assert _losses(compiled) == pytest.approx(_losses(single), rel=1e-5)
    evals = [m["eval_loss"] for m in read_metrics(compiled, "eval")]
    assert evals == pytest.approx([m["eval_loss"] for m in read_metrics(single, "eval")], rel=1e-5)
    assert (compiled / "checkpoints" / "checkpoint_000012" / "consolidated" / "lora.safetensors").is_file()


def test_checkpoint_layout_keys_and_dtypes(single, workspace):
    ckpts = sorted(p.name for p in (single / "checkpoints").iterdir())
    assert ckpts == ["checkpoint_000006", "checkpoint_000012"]
    consolidated = single / "checkpoints" / "checkpoint_000012" / "consolidated"
    assert sorted(p.name for p in consolidated.iterdir()) == ["lora.safetensors", "params.json", "tokenizer.model.v3"]
    lora = load_file(str(consolidated / "lora.safetensors"))
    expected = {f"layers.{i}.{m}.{ab}.weight" for i in range(2)
                for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
                for ab in ("lora_A", "lora_B")}
    assert set(lora) == expected
    assert {t.dtype for t in lora.values()} == {torch.float32}  # fp32 training on CPU saves fp32
    params = json.loads((consolidated / "params.json").read_text())
    base = json.loads((Path(workspace[1]["model_id_or_path"]) / "params.json").read_text())
    assert {k: params[k] for k in base} == base
    assert params["lora"] == {"enable": True, "rank": 4, "scaling": 2.0, "dropout": 0.0,
                              "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
    assert not any(p.name.endswith(".tmp") for p in (single / "checkpoints").iterdir())


def test_merged_checkpoint_equals_base_plus_adapters(single, workspace):
    cfg = run_config(workspace, "merged", max_steps=12, ckpt_freq=6, no_eval=False, eval_freq=6, save_adapters=False,
                  **{"wandb.project": "offline-test", "wandb.offline": True})
    _ok(run_cli(["train.py", str(cfg)]))
    # wandb ran offline (no network) and wrote its run under run_dir.
    assert list((workspace[0] / "merged" / "wandb").glob("offline-run-*"))
    merged_dir = workspace[0] / "merged" / "checkpoints" / "checkpoint_000012" / "consolidated"
    merged = load_file(str(merged_dir / "consolidated.safetensors"))
    assert "lora" not in (json.loads((merged_dir / "params.json").read_text()))
    base = load_file(str(Path(workspace[1]["model_id_or_path"]) / "consolidated.safetensors"))
    lora = load_file(str(single / "checkpoints" / "checkpoint_000012" / "consolidated" / "lora.safetensors"))
    assert sorted(merged) == sorted(base)
    for key, w in base.items():
        prefix = key.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in lora:
            w = merge_delta(w, lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"], 2.0)
        torch.testing.assert_close(merged[key], w, rtol=1e-5, atol=1e-6, msg=key)


def test_resume_after_sigterm_equals_uninterrupted(single, workspace):
    # Selective activation checkpointing here, full in `single`: the numbers must not change.
    cfg = run_config(workspace, "resumed", max_steps=12, ckpt_freq=6, no_eval=False, eval_freq=6, checkpoint="selective")
    run_dir = workspace[0] / "resumed"
    proc = start_cli(["train.py", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.train.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = len(read_metrics(run_dir))
    assert stopped_at < 12, "the run finished before it could be interrupted"
    assert "Stop requested" in out
    _ok(run_cli(["train.py", str(cfg)]))  # same command again: resumes
    assert _losses(run_dir) == _losses(single)  # exactly, step for step
    assert [m["eval_loss"] for m in read_metrics(run_dir, "eval")] == [m["eval_loss"] for m in read_metrics(single, "eval")]
    a = load_file(str(run_dir / "checkpoints/checkpoint_000012/consolidated/lora.safetensors"))
    b = load_file(str(single / "checkpoints/checkpoint_000012/consolidated/lora.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _stopped(pid: int) -> bool:
    """Whether SIGSTOP has taken effect (state T in /proc/PID/stat; kill() only queues the signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def test_kill_during_checkpoint_leaves_no_half_checkpoint_and_rotation_keeps_the_newest(workspace):
    # A checkpoint every step, the newest 2 kept: rotation deletes one after every save.
    cfg = run_config(workspace, "killed", max_steps=40, ckpt_freq=1, num_ckpt_keep=2)
    run_dir = workspace[0] / "killed"
    ckpts = run_dir / "checkpoints"
    proc = start_cli(["train.py", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    interrupted = None  # the .tmp folder of the save the kill landed in
    deadline = time.time() + 120
    try:
        while interrupted is None and time.time() < deadline and proc.poll() is None:
            names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
            if len(names) >= 3 and any(n.endswith(".tmp") for n in names):
                # Freeze the trainer, then look again: only this process writes there, so a .tmp folder
                # seen while it is stopped means it stopped between a save's mkdir and its rename.
                proc.send_signal(signal.SIGSTOP)
                while proc.poll() is None and not _stopped(proc.pid):
                    time.sleep(0.001)
                tmps = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
                if tmps:
                    interrupted = tmps[0]
                    proc.kill()  # SIGKILL inside the save
                else:
                    proc.send_signal(signal.SIGCONT)  # it had just renamed: try the next save
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert interrupted is not None, "the kill never landed inside a checkpoint save"
    # The save of step k+1 was cut short; k and k-1 are complete, older ones rotated away.
    complete = list_checkpoints(run_dir)
    newest = int(complete[-1].name.removeprefix("checkpoint_"))
    assert interrupted == f"checkpoint_{newest + 1:06d}.tmp" and (ckpts / interrupted).is_dir()
    assert [p.name for p in complete] == [f"checkpoint_{s:06d}" for s in (newest - 1, newest)]
    for ckpt in complete:  # every checkpoint under its final name is complete and loadable
        assert verify_checkpoint(ckpt) is None, ckpt
        load_file(str(ckpt / "consolidated" / "lora.safetensors"))
        load_model_args(ckpt / "consolidated")
    result = run_cli(["train.py", str(cfg), "--max_steps", "41"])
    _ok(result)
    assert f"Resumed from {complete[-1]} at step {newest}" in result.stdout + result.stderr
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 42))  # resumed without gaps or duplicates
    # Only the newest num_ckpt_keep remain, the half-written folder is gone, and the latest resumes.
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_000040", "checkpoint_000041"]
    assert latest_resumable(run_dir) == ckpts / "checkpoint_000041"


@pytest.fixture(scope="module")
def two_procs(workspace):
    cfg = run_config(workspace, "torchrun2", max_steps=4, num_microbatches=2, ckpt_freq=4)
    _ok(torchrun(["-m", "train", str(cfg)], nproc=2))  # `torchrun ... -m train` as the reference documents
    return workspace[0] / "torchrun2"


def test_torchrun_two_processes_train(two_procs):
    losses = _losses(two_procs)
    assert len(losses) == 4 and losses[-1] < losses[0]
    ckpt = two_procs / "checkpoints" / "checkpoint_000004"
    assert sorted(p.name for p in (ckpt / "state").glob("rank_*.json")) == ["rank_0.json", "rank_1.json"]


def test_resume_with_another_process_count_is_explained(workspace, two_procs):
    cfg = run_config(workspace, "torchrun2", max_steps=5, num_microbatches=2, ckpt_freq=4)
    result = run_cli(["train.py", str(cfg)])  # one process, the checkpoint has two
    assert result.returncode == 1
    assert "written by 2 processes but this run has 1" in result.stderr and "init_lora_from" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_two_local_processes(workspace, two_procs, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1 with a c10d rendezvous on localhost."""
    from finetune.distributed import free_port

    port = free_port()
    cfg = run_config(workspace, "twonodes", max_steps=4, num_microbatches=2, ckpt_freq=4)
    launcher = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes-test"]
    nodes = [start_cli([*launcher, "train.py", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][-2000:] + outs[1][-2000:]
    run_dir = workspace[0] / "twonodes"
    assert _losses(run_dir) == pytest.approx(_losses(two_procs), rel=1e-6)


def test_bad_config_values_name_the_key(workspace):
    cfg = run_config(workspace, "bad", **{"optim.lrr": 0.1})
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 1
    assert "unknown key 'optim.lrr'" in result.stderr and "Did you mean 'optim.lr'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(["train.py", str(run_config(workspace, "bad2")), "--seq_len", "-5"])
    assert result.returncode == 1 and "'seq_len' must be > 0" in result.stderr


def test_invalid_data_refuses_to_train(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    cfg = run_config(workspace, "baddata", **{"data.instruct_data": str(bad), "data.eval_instruct_data": ""})
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"{bad}:1" in result.stderr and f"{bad}:2" in result.stderr
    assert "utils.validate_data --train_yaml" in result.stderr and "--create_corrected" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workspace[0] / "baddata").exists()  # nothing written for a run that cannot start


def test_new_run_can_start_from_an_existing_adapter(single, workspace):
    adapter = single / "checkpoints" / "checkpoint_000012" / "consolidated" / "lora.safetensors"
    cfg = run_config(workspace, "continued", max_steps=1, init_lora_from=str(adapter))
    _ok(run_cli(["train.py", str(cfg)]))
    # Its first step already has the trained adapter's loss, far below a fresh start's.
    assert _losses(workspace[0] / "continued")[0] < _losses(single)[0] - 0.2


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(workspace):
    cfg = run_config(workspace, "diverged", max_steps=6, ckpt_freq=1, **{"optim.lr": 1e30, "optim.pct_start": 0.0})
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 1, result.stdout[-2000:]
    assert "loss is nan" in result.stderr or "loss is inf" in result.stderr
    assert "Lower optim.lr" in result.stderr and "Traceback" not in result.stderr
    saved = sorted(p.name for p in (workspace[0] / "diverged" / "checkpoints").iterdir())
    assert saved and not any(p.endswith(".tmp") for p in saved)
    assert f"last good checkpoint is {workspace[0] / 'diverged' / 'checkpoints' / saved[-1]}" in result.stderr


def test_v1_vocabulary_model_explains_how_to_extend(workspace, tmp_path):
    from tests.model_helpers import write_checkpoint
    from tests.train_helpers import tiny_vocab_args

    write_checkpoint(tmp_path / "v1", tiny_vocab_args(vocab_size=32000))
    cfg = run_config(workspace, "v1", model_id_or_path=str(tmp_path / "v1"))
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 1
    assert "vocab_size 32000" in result.stderr
    assert f"python -m utils.extend_model_vocab --original_model_ckpt {tmp_path / 'v1'}" in result.stderr
