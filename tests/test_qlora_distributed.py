"""FSDP2 over an NF4 base: two gloo ranks (each holding half of every packed weight) compute what
one rank computes, in float32 and in bfloat16 storage, and gather the same merged checkpoint.

Real torch.multiprocessing process groups, the real sharded build and train_step; plain SGD(lr=1)
so the parameter change *is* the gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from finetune.distributed import free_port

pytest.importorskip("bitsandbytes")

from finetune.args import TrainArgs  # noqa: E402
from finetune.data.args import DataArgs  # noqa: E402
from model.args import LoraArgs  # noqa: E402
from tests.model_helpers import write_checkpoint  # noqa: E402
from tests.train_helpers import init_test_rank, microbatches, tiny_vocab_args  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process end to end (tens of seconds)

N_BATCHES, SEQ = 4, 48
SHAPE = dict(dim=64, hidden_dim=128, head_dim=16, n_heads=4, n_kv_heads=2)


def _batches() -> list:
    return microbatches(N_BATCHES, SEQ, 0.3)


def _worker(rank: int, world: int, folder: str, out: str, port: int) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters, gather_merged
    from finetune.trainer import TrainState, train_step
    from model.configs import load_model_args
    from model.quant import NF4LoRALinear

    device = init_test_rank(rank, world, port)
    mine = _batches()[rank::world]
    for name in ("fp32", "bf16"):
        args = TrainArgs(
            model_id_or_path=folder,
            run_dir=out,
            data=DataArgs(instruct_data="unused"),
            lora=LoraArgs(rank=4),
            num_microbatches=len(mine),
            max_norm=1e9,
            quantization="nf4",
        )
        precision = resolve_precision(name, device)
        model = build_model(args, load_model_args(args.model_id_or_path), device, precision)
        wq = model.transformer.layers[0].attention.wq
        assert isinstance(wq, NF4LoRALinear) and wq.weight.dtype == precision.dtype
        if world > 1:  # each rank stores only its shard of the packed codes
            assert wq.weight.to_local().numel() == wq.weight.numel() // world
        else:  # alone, frozen weights are left out of FSDP: no one-rank all-gather copies
            assert not isinstance(wq.weight, DTensor)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        losses = [
            train_step(model, optimizer, mine, args, TrainState(), precision, device)[0] for _ in range(2)
        ]
        weights = {
            **gather_adapters(model, torch.float32),
            **{f"merged.{k}": v for k, v in gather_merged(model, torch.float32).items()},
        }
        if D.is_main():
            weights["losses"] = torch.tensor(losses, dtype=torch.float64)
            save_file(weights, os.path.join(out, f"world{world}_{name}.safetensors"))
    D.destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_ranks")
    write_checkpoint(root / "model", tiny_vocab_args(**SHAPE), seed=0)
    for world in (1, 2):
        mp.spawn(_worker, args=(world, str(root / "model"), str(root), free_port()), nprocs=world)
    return root


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_two_ranks_equal_one_rank_on_nf4_base(runs, precision, tol):
    one = load_file(str(runs / f"world1_{precision}.safetensors"))
    two = load_file(str(runs / f"world2_{precision}.safetensors"))
    assert sorted(one) == sorted(two)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=tol, atol=tol)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=tol, atol=tol * 1e-1, msg=key)
    # Adapters trained, and the merged checkpoint is full-shape de-quantized weights.
    assert one["layers.0.attention.wq.lora_B.weight"].abs().sum() > 0
    base = load_file(str(runs / "model" / "consolidated.safetensors"))
    assert {k: tuple(v.shape) for k, v in base.items()} == {
        k.removeprefix("merged."): tuple(v.shape) for k, v in one.items() if k.startswith("merged.")
    }
