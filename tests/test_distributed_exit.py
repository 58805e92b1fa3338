"""A process that gathered DTensors over gloo exits cleanly after finetune.distributed.destroy().

Without destroy()'s grace period, a gloo worker thread could still be freeing the last gather's
work object (and with it a Python tensor) while the interpreter shut down: SIGABRT in about one
two-rank run in five. The race is timing-dependent, so the test repeats the exit several times.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from finetune.distributed import free_port
from tests.train_helpers import init_test_rank

RUNS = 6


def _gather_then_exit(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from finetune import distributed as D

    init_test_rank(rank, world, port)
    sharded = distribute_tensor(torch.ones(64, 64), init_device_mesh("cpu", (world,)), [Shard(0)])
    for _ in range(20):
        assert sharded.full_tensor().sum().item() == 64 * 64
    D.destroy()


@pytest.mark.slow
def test_ranks_exit_cleanly_after_gathers():
    for _ in range(RUNS):  # mp.spawn raises ProcessExitedException for a rank killed by a signal
        mp.spawn(_gather_then_exit, args=(2, free_port()), nprocs=2)
