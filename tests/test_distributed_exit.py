"""A process that gathered DTensors over gloo exits cleanly after finetune.distributed.destroy().

A gloo worker thread frees a finished collective's work object after the caller's wait() has
returned; when that drops the last reference to a Python tensor the thread needs the GIL, and if
the interpreter is shutting down by then the process aborts ("terminate called without an active
exception", SIGABRT) after a successful run. destroy() leaves the group and gives those threads
the GIL before the interpreter may exit.

The test arranges the worst interleaving for that: from the last gather to its exit each rank keeps
the GIL (a switch interval of 1000 s), so a backend thread gets it only where destroy() releases it.
Without destroy() that arrangement aborted 3 of 20 runs here (torch 2.13, CPU); with it, none did.
With only destroy()'s pause removed, none of 20 aborted here either way, so on this torch the test
sees a destroy() that no longer leaves the group, not a missing pause (docs/benchmarks.md has the
earlier measurement of the pause).
Many runs are cheap: one interpreter imports torch once and forks every pair of ranks, and each
rank still exits through the interpreter's normal shutdown (SystemExit), the path under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train_helpers import ENV, REPO

# A broken destroy() aborts about 3 runs in 20 under this arrangement: 20 runs miss it about 4% of the
# time (0.85**20), where the 6 spawned runs of before missed it a quarter of the time.
RUNS = 20


def fork_runs(runs: int) -> None:
    """Run ``runs`` two-rank groups one after the other; print each child's wait status (JSON)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from finetune import distributed as D

    statuses = []
    for _ in range(runs):
        port, pids = D.free_port(), []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:  # the child: gather, leave the group, exit through interpreter shutdown
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                torch.set_num_threads(1)
                D.init_distributed()
                sharded = distribute_tensor(torch.ones(64, 64), init_device_mesh("cpu", (2,)), [Shard(0)])
                sys.setswitchinterval(1000)  # no GIL hand-over unless the code releases it
                for _ in range(20):
                    if sharded.full_tensor().sum().item() != 64 * 64:
                        raise SystemExit(3)
                D.destroy()
                raise SystemExit(0)
            pids.append(pid)
        statuses += [os.waitpid(pid, 0)[1] for pid in pids]
    print(json.dumps(statuses))


@pytest.mark.slow
def test_ranks_exit_cleanly_after_gathers():
    code = f"from tests.test_distributed_exit import fork_runs; fork_runs({RUNS})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(statuses) == 2 * RUNS
    failed = [f"signal {os.WTERMSIG(s)}" if os.WIFSIGNALED(s) else f"exit {os.WEXITSTATUS(s)}"
              for s in statuses if s != 0]
    assert not failed, f"{len(failed)} of {2 * RUNS} ranks did not exit cleanly: {failed}\n{result.stderr[-3000:]}"
