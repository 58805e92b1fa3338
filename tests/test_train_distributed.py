"""Two ranks with micro-batches compute exactly what one rank computes on the same global batch,
for the dense model and a Mixtral-style mixture of experts, LoRA and full fine-tuning.

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
from tests.train_helpers import init_test_rank, load_equal_runs, microbatches, tiny_vocab_args

pytestmark = pytest.mark.slow  # multi-process end to end (tens of seconds)

N_BATCHES, SEQ = 4, 48
KINDS = ["lora", "full", "moe_lora", "moe_full"]  # moe_*: 4 experts, 2 per token


def _batches() -> list:
    return microbatches(N_BATCHES, SEQ, 0.2)


def _worker(rank: int, world: int, root: str, port: int) -> None:
    from finetune import distributed as D

    device = init_test_rank(rank, world, port)
    for kind in KINDS:
        folder = os.path.join(root, "moe" if kind.startswith("moe") else "dense")
        _run(rank, world, folder, root, kind, device)
    D.destroy()


def _run(rank: int, world: int, folder: str, out: str, kind: str, device: torch.device) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters, gather_merged
    from finetune.trainer import TrainState, train_step
    from model.configs import load_model_args

    full_ft = kind.endswith("full")
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
        save_file(weights, os.path.join(out, f"world{world}_{kind}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    write_checkpoint(root / "dense", tiny_vocab_args(), seed=0)
    write_checkpoint(root / "moe", tiny_vocab_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), seed=0)
    for world in (1, 2):
        mp.spawn(_worker, args=(world, str(root), free_port()), nprocs=world)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_with_microbatches_equal_one_rank(runs, kind):
    one, two = load_equal_runs(runs, kind)
    # The step really trained something: adapters moved away from their initialisation, in every
    # expert (the tokens were routed to all of them, so the comparison covers the dispatch).
    if kind == "lora":
        assert one["layers.0.attention.wq.lora_B.weight"].abs().sum() > 0
    if kind == "moe_lora":
        for e in range(4):
            assert one[f"layers.0.feed_forward.experts.{e}.w2.lora_B.weight"].abs().sum() > 0, e
    if kind == "moe_full":  # the router trains too
        base = load_file(str(runs / "moe" / "consolidated.safetensors"))["layers.0.feed_forward.gate.weight"]
        assert not torch.equal(one["layers.0.feed_forward.gate.weight"], base)
