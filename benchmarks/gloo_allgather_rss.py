"""How much RSS does one gloo all-gather take beyond its output? (docs/memory.md, CPU processes)

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gloo_allgather_rss.py [--mb 67]

Each rank all-gathers a float32 shard into an output of ``--mb`` MB, as FSDP2 gathers the root
(embedding, norm, output) at the start of every forward, and prints how far its peak RSS (VmHWM)
and its RSS rose: the peak rises by twice the output, because gloo receives into a flat buffer of
its own and then copies it into the output.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist


def _status(key: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=67.1, help="size of the gathered output, MB")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    shard = torch.randn(int(opts.mb * 1e6 / 4 / n))
    dist.barrier()
    hwm, rss = _status("VmHWM"), _status("VmRSS")
    out = torch.empty(n * shard.numel())
    dist.all_gather_into_tensor(out, shard)
    gb = out.numel() * 4 / 1e9
    print(f"rank {dist.get_rank()}: output {gb:.3f} GB; peak RSS +{_status('VmHWM') - hwm:.3f} GB "
          f"({(_status('VmHWM') - hwm) / gb:.2f}x the output), RSS after +{_status('VmRSS') - rss:.3f} GB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
