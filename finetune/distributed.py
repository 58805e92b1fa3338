"""Process-group setup and the one place for rank checks.

CUDA + NCCL when GPUs are present, otherwise CPU + gloo: the rest of the code only sees
``device`` and the collectives. Works under ``torchrun`` (any number of nodes) and as a plain
``python train.py`` (a one-process group is created so the same FSDP code path runs).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

# oneDNN, and PyTorch's ideep layer over it, keep one compiled kernel per matmul shape: 1024 each
# by default. On CPU, bf16 attention's backward runs matmuls shaped by each document's length, so
# with packed documents of varying lengths these caches, and the RSS, grow without end. 256 entries
# bound that and still hold the model's own fixed-shape matmuls between uses; with far fewer, the
# document shapes of a long row evict those and every step slows down (docs/benchmarks.md). Both
# are read at the first oneDNN call; a value the user set is kept.
CPU_KERNEL_CACHE_CAPACITY = "256"


def bound_cpu_kernel_caches() -> None:
    """Cap oneDNN's kernel caches (call before the first matmul of the process)."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, CPU_KERNEL_CACHE_CAPACITY)


def init_distributed() -> torch.device:
    """Initialise the default process group once; returns this rank's device."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        bound_cpu_kernel_caches()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python train.py`: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return device


def free_port() -> int:
    """A TCP port free on localhost right now (for a one-process group or a test rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one float64 collective (one host sync)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_json(value: Any, device: torch.device) -> Any:
    """Rank 0's ``value`` on every rank (the others pass None), sent as JSON text: two broadcasts,
    its length then its bytes."""
    if not dist.is_initialized():
        return value
    data = json.dumps(value).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if is_main():
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return value if is_main() else json.loads(buf.cpu().numpy().tobytes())


# How long destroy() releases the GIL to the backend's threads before the interpreter may exit.
EXIT_GRACE_S = 0.05


def destroy() -> None:
    """Leave the process group; call before the process exits.

    A gloo worker thread frees a finished collective's work object after the caller's wait() has
    returned. When that drops the last C++ reference to a Python tensor (DTensor.full_tensor does)
    the thread needs the GIL, and if the interpreter is already shutting down the process aborts
    ("terminate called without an active exception", SIGABRT) after a successful run, in a fraction
    of two-rank runs (docs/benchmarks.md). Sleeping releases the GIL so those threads finish first.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(EXIT_GRACE_S)


def report_to_torchrun(message: str) -> None:
    """Under torchrun, put a worker's one-line error where torchrun's failure summary looks for its
    traceback, so the summary's root cause shows this message instead of a link to torchrun's docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the summary then shows torchrun's generic text; the error itself was printed
