"""Faults must not cost a run, data or a clear answer: divergence, two trainings on one run_dir, an
orphaned torchrun worker, planted pickles, damaged checkpoints, leftover metrics, a full disk."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.checkpointing import MANIFEST, STATE_FORMAT, _write_manifest, verify_checkpoint
from finetune.data.args import DataArgs
from finetune.run_dir import RunDirBusy, RunDirLock, keep_metrics_up_to
from finetune.safe_dcp import UnsafeCheckpointError, read_metadata_file
from tests.train_helpers import (
    REPO,
    module_workspace,
    read_metrics,
    run_cli,
    run_config,
    start_cli,
    torchrun,
    write_config,
)

workspace = module_workspace("faults")


def _fails_in_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- divergence --------------------------------------------------------------------------------

def test_non_finite_gradient_with_a_finite_loss_stops_the_run_without_a_checkpoint(workspace, tmp_path):
    # One output row scaled to 1e25: the loss stays finite (about 1e25) but the squared gradients
    # overflow, so the gradient norm is inf. Before: every step was skipped ("step_skipped"), the
    # run exited 0 and saved the untrained adapters as if it had trained.
    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(workspace[1]["model_id_or_path"], poisoned)
    weights = load_file(str(poisoned / "consolidated.safetensors"))
    weights["output.weight"][5] = 1e25
    save_file(weights, str(poisoned / "consolidated.safetensors"))
    cfg = run_config(workspace, "diverged", max_steps=4, ckpt_freq=1, model_id_or_path=str(poisoned))
    result = run_cli(["train.py", str(cfg)])
    _fails_in_one_line(result, "training diverged at step 1: the gradient norm is inf (loss ",
                       "Stopping without saving", "No checkpoint was saved before it", "Lower optim.lr")
    assert not (workspace[0] / "diverged" / "checkpoints").exists()  # nothing written from a diverged state


# --- one training per run_dir ------------------------------------------------------------------

def test_run_dir_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    first = RunDirLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirBusy, match=f"run_dir {tmp_path} is in use by another training \\(pid {os.getpid()} on"):
        RunDirLock(tmp_path).acquire()
    first.release()
    RunDirLock(tmp_path).acquire()  # released: free again (and this holder is dropped at garbage collection)

    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it with the process.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from finetune.run_dir import RunDirLock;"
         f"RunDirLock(Path({str(tmp_path / 'k')!r})).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    (tmp_path / "k").mkdir()
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunDirLock(tmp_path / "k").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path / "k")
    lock.acquire()
    lock.release()


def test_second_training_on_the_same_run_dir_refuses_at_once(workspace):
    cfg = run_config(workspace, "shared", max_steps=400, ckpt_freq=0, no_ckpt=True)
    first = start_cli(["train.py", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = workspace[0] / "shared" / "metrics.train.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text()):
            assert first.poll() is None, "the first training ended early"
            time.sleep(0.1)
        second = run_cli(["train.py", str(cfg)], timeout=120)
        _fails_in_one_line(second, f"run_dir {workspace[0] / 'shared'} is in use by another training",
                           f"pid {first.pid}")
        assert first.poll() is None  # the first one trains on, untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    steps = [m["step"] for m in read_metrics(workspace[0] / "shared")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(marker.encode() in c for c in cmd) and b"torch.distributed.run" not in cmd:
                pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_workers_of_a_killed_launcher_stop_and_the_rerun_resumes(workspace):
    cfg = run_config(workspace, "orphans", max_steps=400, ckpt_freq=0)
    run_dir = workspace[0] / "orphans"
    launcher = start_cli(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "train.py", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.train.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None, "the training ended early"
        time.sleep(0.1)
    workers = _worker_pids(str(cfg))
    assert len(workers) == 2, workers
    launcher.kill()  # kill -9 the launcher: its workers are orphaned
    launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(_running(p) for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "orphaned workers kept training"
    stopped = read_metrics(run_dir)[-1]["step"]
    assert stopped < 400
    # They saved where they stopped; the same command resumes from there.
    assert (run_dir / "checkpoints" / f"checkpoint_{stopped:06d}").is_dir()
    result = torchrun(["train.py", str(cfg), "--max_steps", str(stopped + 1)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, stopped + 2))


# --- what a resume reads back --------------------------------------------------------------------

class _Planted:
    """Unpickling this runs a shell command: what a crafted checkpoint file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_reader_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / ".metadata"
    planted.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        read_metadata_file(str(planted))
    assert not marker.exists()


@pytest.fixture(scope="module")
def two_checkpoints(workspace):
    """A run with checkpoints at steps 2 and 4 (kept pristine; tests damage copies)."""
    cfg = run_config(workspace, "pristine", max_steps=4, ckpt_freq=2)
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace[0] / "pristine"


def _copy_run(two_checkpoints: Path, workspace, name: str) -> tuple[Path, Path]:
    run_dir = workspace[0] / name
    shutil.copytree(two_checkpoints, run_dir)
    args = json.loads(json.dumps(workspace[1]))
    args["run_dir"] = str(run_dir)
    return run_dir, write_config(workspace[0] / f"{name}.yaml", args)


def _damage(ckpt: Path, how: str) -> None:
    state = ckpt / "state"
    if how == "truncated distcp":
        f = next(state.glob("*.distcp"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "zeroed metadata":
        f = state / ".metadata"
        f.write_bytes(b"\0" * f.stat().st_size)
    elif how == "missing rank file":
        (state / "rank_0.json").unlink()
    elif how == "corrupt train_state":
        f = state / "train_state.json"
        f.write_text(f.read_text()[:-12])
    elif how == "no manifest":
        (ckpt / MANIFEST).unlink()


@pytest.mark.parametrize("how", ["truncated distcp", "zeroed metadata", "missing rank file", "corrupt train_state",
                                 "no manifest"])
def test_verify_checkpoint_names_the_damage(two_checkpoints, tmp_path, how):
    ckpt = tmp_path / "checkpoint_000004"
    shutil.copytree(two_checkpoints / "checkpoints" / "checkpoint_000004", ckpt)
    assert verify_checkpoint(ckpt) is None
    _damage(ckpt, how)
    problem = verify_checkpoint(ckpt)
    assert problem is not None and str(ckpt) in problem, problem


def test_damaged_newest_checkpoint_falls_back_and_changed_settings_are_named(two_checkpoints, workspace):
    run_dir, cfg = _copy_run(two_checkpoints, workspace, "damaged")
    _damage(run_dir / "checkpoints" / "checkpoint_000004", "truncated distcp")
    with (run_dir / "metrics.train.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.')  # a crash mid-write left a partial line
    result = run_cli(["train.py", str(cfg), "--max_steps", "6"])
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Skipping damaged checkpoint: checkpoint_000004" in log and "Resuming from" in log
    assert "Resumed from" in log and "checkpoint_000002 at step 2" in log
    assert "is not a complete metrics row" in log
    # What changed since the checkpoint, and what it does to the learning-rate schedule.
    assert "settings changed since that checkpoint:" in log and "max_steps: 4 -> 6" in log
    assert "step 3 uses lr" in log
    assert "Done: step 6 of 6; this run trained 4 steps" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_an_earlier_state_format_is_refused_with_the_way_forward(two_checkpoints, workspace):
    # Written before train_state.json carried its format (the resume state's keys then named the
    # transformer "model."): resuming would fail deep in DCP's key matching.
    run_dir, cfg = _copy_run(two_checkpoints, workspace, "oldformat")
    ckpt = run_dir / "checkpoints" / "checkpoint_000004"
    train_state = json.loads((ckpt / "state" / "train_state.json").read_text())
    assert train_state.pop("format") == STATE_FORMAT
    (ckpt / "state" / "train_state.json").write_text(json.dumps(train_state))
    _write_manifest(ckpt)
    adapters = ckpt / "consolidated" / "lora.safetensors"
    _fails_in_one_line(run_cli(["train.py", str(cfg), "--max_steps", "5"]), f"{ckpt} was written by an earlier version",
                       f"init_lora_from: {adapters}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_000002", "checkpoint_000004"]


def test_planted_pickle_in_a_checkpoint_is_skipped_not_run(two_checkpoints, workspace):
    # The attacker rewrites the manifest too: the manifest guards against damage, the restricted
    # readers against tampering.
    run_dir, cfg = _copy_run(two_checkpoints, workspace, "planted")
    marker = workspace[0] / "planted-ran"
    ckpt = run_dir / "checkpoints" / "checkpoint_000004"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    (ckpt / "state" / "rank_0.pt").write_bytes(pickle.dumps(_Planted(marker)))  # the old format's file
    _write_manifest(ckpt)
    result = run_cli(["train.py", str(cfg), "--max_steps", "5"])
    assert not marker.exists(), "code planted in the checkpoint ran"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refusing to load it (was it tampered with?)" in result.stdout
    assert "checkpoint_000002 at step 2" in result.stdout


def test_dcp_entries_holding_code_are_refused_by_the_safe_readers(tmp_path):
    import torch.distributed.checkpoint as dcp

    from finetune.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    marker = tmp_path / "ran"
    # A non-tensor entry (like the optimizer's param_groups) that runs code when unpickled.
    dcp.save({"w": torch.zeros(2), "extra": _Planted(marker)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    with pytest.raises(BaseException, match="not plain data"):  # dcp wraps it in CheckpointException
        dcp.load({"w": torch.ones(2), "extra": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "ck")),
                 planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
    # A plain entry loads through the same readers.
    dcp.save({"w": torch.arange(2.0), "extra": {"lr": 0.1, "betas": (0.9, 0.95)}}, checkpoint_id=str(tmp_path / "ok"),
             no_dist=True)
    target = {"w": torch.ones(2), "extra": {"lr": None, "betas": None}}
    dcp.load(target, storage_reader=SafeFileSystemReader(str(tmp_path / "ok")), planner=SafeLoadPlanner(), no_dist=True)
    assert target["extra"] == {"lr": 0.1, "betas": (0.9, 0.95)} and target["w"].tolist() == [0.0, 1.0]


def test_checkpoints_that_all_fail_verification_are_not_silently_replaced(two_checkpoints, workspace):
    run_dir, cfg = _copy_run(two_checkpoints, workspace, "allbad")
    for step in (2, 4):
        _damage(run_dir / "checkpoints" / f"checkpoint_{step:06d}", "missing rank file")
    result = run_cli(["train.py", str(cfg), "--max_steps", "5"])
    _fails_in_one_line(result, "has checkpoints but none can be resumed")
    assert (run_dir / "checkpoints" / "checkpoint_000004").is_dir()


# --- metrics, run_dir, cache_dir -----------------------------------------------------------------

def test_keep_metrics_up_to_drops_later_and_partial_rows(tmp_path, caplog):
    path = tmp_path / "metrics.train.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    keep_metrics_up_to(tmp_path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert f"{path}:4 is not a complete metrics row" in caplog.text
    keep_metrics_up_to(tmp_path, 0)  # a fresh start keeps no rows of an earlier attempt
    assert path.read_text() == ""


def test_fresh_start_drops_an_earlier_attempts_rows_and_expands_cache_dir(workspace, tmp_path):
    # A first attempt killed before its first checkpoint left rows 1-3 behind.
    cfg = run_config(workspace, "restarted", max_steps=3, no_ckpt=True, **{"data.cache_dir": "~/tok"})
    run_dir = workspace[0] / "restarted"
    run_dir.mkdir()
    (run_dir / "metrics.train.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    from tests.train_helpers import ENV

    result = subprocess.run([sys.executable, "train.py", str(cfg)], cwd=REPO, env={**ENV, "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert any((tmp_path / "tok").iterdir())  # ~ expanded to $HOME ...
    assert not (REPO / "~").exists()  # ... not a literal ./~ folder
    assert DataArgs(cache_dir="~/x").cache_path == Path.home() / "x"


def test_run_dir_under_a_file_is_one_line(workspace, tmp_path):
    (tmp_path / "afile").write_text("")
    cfg = run_config(workspace, "underfile", run_dir=str(tmp_path / "afile" / "run"))
    _fails_in_one_line(run_cli(["train.py", str(cfg)]), f"run_dir {tmp_path / 'afile' / 'run'} cannot be used",
                       "is under a file")


def test_model_folder_without_tokenizer_is_refused_and_tokenizer_path_supplies_one(workspace, tmp_path):
    model = Path(workspace[1]["model_id_or_path"])
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "tokenizer.model.v3").unlink()
    cfg = run_config(workspace, "notok", model_id_or_path=str(bare))
    _fails_in_one_line(run_cli(["train.py", str(cfg)]), f"No mistral-common tokenizer file in {bare}", "tokenizer_path")
    assert not (workspace[0] / "notok").exists()
    cfg = run_config(workspace, "withtok", model_id_or_path=str(bare), max_steps=1,
                  tokenizer_path=str(model / "tokenizer.model.v3"))
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = workspace[0] / "withtok" / "checkpoints" / "checkpoint_000001" / "consolidated" / "tokenizer.model.v3"
    assert shipped.read_bytes() == (model / "tokenizer.model.v3").read_bytes()


def test_corrupt_weights_file_is_one_line(workspace, tmp_path):
    model = Path(workspace[1]["model_id_or_path"])
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "consolidated.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    cfg = run_config(workspace, "broken", model_id_or_path=str(broken))
    _fails_in_one_line(run_cli(["train.py", str(cfg)]), f"{weights} cannot be read", "truncated or corrupt")


# --- a full disk while checkpointing -------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_no_space_while_checkpointing_keeps_the_previous_checkpoint(two_checkpoints, workspace):
    run_dir, cfg = _copy_run(two_checkpoints, workspace, "diskfull")
    biggest = max(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
    # Files may grow no larger than half the checkpoint's largest file: the next save cannot finish.
    result = run_cli(["train.py", str(cfg), "--max_steps", "5"], preexec_fn=_file_size_limit(biggest // 2))
    line = _fails_in_one_line(result, "no space left while writing checkpoint", "it needs about",
                              f"previous checkpoint {run_dir / 'checkpoints' / 'checkpoint_000004'} is kept")
    assert "re-run the same command to resume" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_000002", "checkpoint_000004"]
    assert verify_checkpoint(run_dir / "checkpoints" / "checkpoint_000004") is None
    resumed = run_cli(["train.py", str(cfg), "--max_steps", "5"])  # space freed: the same command resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_data_error_on_rank_0_stops_every_rank(workspace, tmp_path):
    # The data is checked on rank 0 while rank 1 waits in a collective for the verdict (it once
    # waited there until the 30-minute timeout). One invalid line among valid ones: both ranks stop
    # at once, the error is printed once (not once per rank), and no run_dir is left behind.
    root, base = workspace
    lines = Path(base["data"]["instruct_data"]).read_text().splitlines()
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = run_config(workspace, "rank0data", **{"data.instruct_data": str(bad), "data.eval_instruct_data": ""})
    start = time.time()
    result = torchrun(["train.py", str(cfg)], nproc=2, timeout=180)
    assert result.returncode != 0
    assert time.time() - start < 150  # seconds here; the hang it guards against lasted 30 minutes
    # The workers' own output comes before torchrun's failure summary, which quotes the root cause.
    workers, summary = result.stderr.split("train.py FAILED", 1)
    errors = [line for line in workers.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 invalid line(s) in the training data; nothing was trained:"], workers[-3000:]
    assert workers.count(f"{bad}:7: ") == 1 and f"{bad}:" not in workers.replace(f"{bad}:7: ", "")
    assert "the last message is a user message" in workers
    # torchrun's failure summary names the error as its root cause, not a link to its docs.
    assert "traceback : error: 1 invalid line(s) in the training data" in summary and f"{bad}:7: " in summary
    assert not (root / "rank0data").exists()  # nothing written for a run that cannot start


def test_divergence_rule_per_precision():
    from finetune.trainer import FP16_MAX_SKIPS_IN_A_ROW, TrainState, divergence

    inf, nan = float("inf"), float("nan")
    assert divergence(nan, 1.0, True, TrainState(), "fp32") == "the loss is nan"
    for precision in ("fp32", "bf16"):  # one non-finite gradient is enough
        assert divergence(2.0, inf, False, TrainState(), precision) == "the gradient norm is inf (loss 2)"
    # fp16: skipped steps are loss scaling at work, until too many come in a row.
    state = TrainState(loss_scale=1.0)
    for _ in range(FP16_MAX_SKIPS_IN_A_ROW - 1):
        assert divergence(2.0, inf, False, state, "fp16") is None
    assert divergence(2.0, 0.5, True, state, "fp16") is None and state.skipped_in_a_row == 0  # reset
    for _ in range(FP16_MAX_SKIPS_IN_A_ROW - 1):
        assert divergence(2.0, inf, False, state, "fp16") is None
    assert f"overflowed {FP16_MAX_SKIPS_IN_A_ROW} steps in a row" in divergence(2.0, inf, False, state, "fp16")


def test_other_checkpoint_write_errors_name_the_file(workspace):
    cfg = run_config(workspace, "ckptfile", max_steps=1)
    run_dir = workspace[0] / "ckptfile"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")  # a file where the checkpoints folder goes
    line = _fails_in_one_line(run_cli(["train.py", str(cfg)]), "cannot write checkpoint",
                              str(run_dir / "checkpoints"), "No earlier checkpoint exists")
    assert "Make run_dir writable" in line
