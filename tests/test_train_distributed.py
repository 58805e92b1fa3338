"""Two ranks with micro-batches compute exactly what one rank computes on the same global batch.

Real gloo process groups (torch.multiprocessing), the real FSDP2-sharded model, the real
train_step; plain SGD(lr=1) so the parameter change *is* the gradient (Adam would hide scale).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from finetune.args import TrainArgs
from finetune.data.args import DataArgs
from finetune.distributed import free_port
from model.args import LoraArgs
from tests.model_helpers import write_checkpoint
from tests.train_helpers import init_test_rank, microbatches, tiny_vocab_args

pytestmark = pytest.mark.slow  # multi-process end to end (tens of seconds)

N_BATCHES, SEQ = 4, 48


def _batches() -> list:
    return microbatches(N_BATCHES, SEQ, 0.2)


def _worker(rank: int, world: int, folder: str, out: str, port: int) -> None:
    from finetune import distributed as D

    device = init_test_rank(rank, world, port)
    for full_ft in (False, True):
        _run(rank, world, folder, out, full_ft, device)
    D.destroy()


def _run(rank: int, world: int, folder: str, out: str, full_ft: bool, device: torch.device) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters, gather_merged
    from finetune.trainer import TrainState, train_step
    from model.configs import load_model_args

    mine = _batches()[rank::world]
    args = TrainArgs(model_id_or_path=folder, run_dir=out, data=DataArgs(instruct_data="unused"),
                     lora=LoraArgs(enable=not full_ft, rank=4), num_microbatches=len(mine), max_norm=1e9,
                     # Activation checkpointing must not change the numbers either: one rank runs
                     # selective checkpointing, the two ranks full and none.
                     checkpoint="selective" if world == 1 else rank == 0)
    precision = resolve_precision("fp32", device)
    model = build_model(args, load_model_args(args.model_id_or_path), device, precision)
    # Alone, frozen weights are plain tensors (no one-rank all-gather, finetune/parallel.py); with
    # two ranks every parameter is sharded. So "two ranks equal one" covers both arrangements.
    for p in model.parameters():
        assert isinstance(p, DTensor) == (world > 1 or p.requires_grad)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for _ in range(2):  # step 1 moves lora_B off zero, so step 2 also exercises lora_A's gradient
        loss, _, _ = train_step(model, optimizer, mine, args, TrainState(), precision, device)
        losses.append(loss)
    weights = gather_merged(model, torch.float32) if full_ft else gather_adapters(model, torch.float32)
    if D.is_main():
        weights["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(weights, os.path.join(out, f"world{world}_{'full' if full_ft else 'lora'}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    write_checkpoint(root / "model", tiny_vocab_args(), seed=0)
    for world in (1, 2):
        mp.spawn(_worker, args=(world, str(root / "model"), str(root), free_port()), nprocs=world)
    return root


@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full_finetune"])
def test_two_ranks_with_microbatches_equal_one_rank(runs, full_ft):
    kind = "full" if full_ft else "lora"
    one = load_file(str(runs / f"world1_{kind}.safetensors"))
    two = load_file(str(runs / f"world2_{kind}.safetensors"))
    assert sorted(one) == sorted(two)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-6, atol=1e-6)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # The step really trained something: adapters moved away from their initialisation.
    if not full_ft:
        assert one["layers.0.attention.wq.lora_B.weight"].abs().sum() > 0
