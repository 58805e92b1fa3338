"""The run folder: created with a clear error, held by one training at a time, metrics kept honest.

Two trainings writing one run_dir interleave their metrics and race on checkpoint renames, so rank 0
holds an exclusive ``flock`` on ``run_dir/.lock`` for the whole run. The kernel releases it when the
process dies, however it dies, so a crash never leaves a stale lock behind. (``flock`` is local to
one machine on most network file systems: two nodes can still share a run_dir by mistake.)
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from finetune.config import ConfigError

logger = logging.getLogger("finetune")

LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another training holds the run_dir."""


def create_run_dir(run_dir: Path) -> None:
    """mkdir -p with an error that names the folder and the fix, and a write check."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        what = "is under a file, not a folder" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ConfigError(
            f"run_dir {run_dir} cannot be used: {what} ({e.filename or run_dir}). "
            "Set run_dir to a folder you can write to."
        ) from None


class RunDirLock:
    """An exclusive lock on run_dir, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run_dir {self.path.parent} is in use by another training ({holder}). Wait for it to finish "
                "or stop it, or set a different run_dir."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"


def keep_metrics_up_to(run_dir: Path, step: int) -> None:
    """Drop metric rows past ``step``: rows of an interrupted attempt that the resumed (or fresh,
    step 0) run is about to log again. A line cut short by a crash is dropped with a warning."""
    for path in sorted(run_dir.glob("metrics.*.jsonl")):
        kept = []
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                logger.warning("%s:%d is not a complete metrics row (a crash mid-write?); dropping it.", path, line_no)
                continue
            if row_step <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
