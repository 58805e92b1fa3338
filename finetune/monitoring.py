"""Console logging, metric files and wandb. Only rank 0 writes anything."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from finetune import distributed as D


def setup_logging() -> None:
    """One format for every module; ranks other than 0 only report warnings and errors."""
    level = logging.INFO if D.is_main() else logging.WARNING
    prefix = f"[rank {D.rank()}] " if D.world_size() > 1 and not D.is_main() else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Appends one JSON object per call to ``run_dir/metrics.{tag}.jsonl`` and logs to wandb."""

    def __init__(self, run_dir: Path, tag: str, wandb_run: Any = None) -> None:
        self.path = run_dir / f"metrics.{tag}.jsonl"
        self.tag = tag
        self.wandb_run = wandb_run

    def log(self, metrics: dict[str, Any]) -> None:
        if not D.is_main():
            return
        record = {**metrics, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            step = metrics["step"]
            self.wandb_run.log({f"{self.tag}/{k}": v for k, v in metrics.items() if k != "step"}, step=step)


def start_wandb(project: str, run_name: str | None, offline: bool, run_dir: Path, config: dict) -> Any:
    """A wandb run on rank 0 (None elsewhere). The API key comes from WANDB_API_KEY only."""
    if not D.is_main():
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb.project is set but wandb is not installed: pip install wandb") from None
    if not offline and not os.environ.get("WANDB_API_KEY"):
        logging.getLogger("finetune").warning(
            "WANDB_API_KEY is not set; wandb will use your `wandb login` credentials if any."
        )
    return wandb.init(
        project=project,
        name=run_name or run_dir.name,
        dir=str(run_dir),
        config=config,
        mode="offline" if offline else "online",
        resume="allow",
        id=_wandb_id(run_dir),
    )


def _wandb_id(run_dir: Path) -> str:
    """A stable run id kept in run_dir, so a resumed training continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
