"""The vision encoder under FSDP2 and activation checkpointing (``finetune/parallel.py``).

Two ranks equal one with pictures in the batches, one rank's micro-batch holding none (the encoder then
runs on a blank picture whose features enter the embeddings times zero, ``Transformer.embed``), with a
frozen encoder, vision adapters and a fully trained encoder; the vision blocks are sharded, each its own FSDP unit, and frozen under LoRA; and full
or selective checkpointing of the vision blocks give the gradients of no checkpointing. Real gloo
process groups (torch.multiprocessing), the real sharded model, a guard against hangs.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from finetune.args import TrainArgs
from finetune.data.args import DataArgs
from finetune.data.loader import Batch
from finetune.distributed import free_port
from model.args import DEFAULT_TARGETS, VISION_TARGETS, LoraArgs
from model.configs import load_model_args
from model.tiny import tiny_vision_args, write_random_vision_model
from tests.train_helpers import init_test_rank, load_equal_runs

pytestmark = pytest.mark.slow  # multi-process end to end

TEXT_LAYERS = 2
ARGS = tiny_vision_args(vocab_size=128, dim=32, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=TEXT_LAYERS)
VISION = ARGS.extra["vision_encoder"]
IMG, IMG_BREAK, IMG_END = VISION["image_token_id"], VISION["image_break_token_id"], VISION["image_end_token_id"]
SIDE = VISION["patch_size"] * VISION["spatial_merge_size"]  # one [IMG] token per SIDE x SIDE pixels
# Pictures (H, W) of each micro-batch, two per step: with two ranks, rank r takes micro-batch 2 * step + r,
# so in step 1 rank 1 has no picture at all (the blank picture) while rank 0 has two.
PICTURES = [[(32, 64), (64, 32)], [(32, 32)], [(64, 64), (32, 96)], [], [(32, 32), (96, 32)], [(64, 32)]]
STEPS = 3
# LoRA on the language model (the encoder frozen), on it and the vision layers, full fine-tuning.
KINDS = {"lora": list(DEFAULT_TARGETS), "vision_lora": [*DEFAULT_TARGETS, *VISION_TARGETS], "full": None}
HANG_S = 120  # far above a run's few seconds; a mismatched collective waits 30 minutes


def _image_tokens(h: int, w: int) -> list[int]:
    rows, cols = h // SIDE, w // SIDE
    return sum(([IMG] * cols + [IMG_END if r == rows - 1 else IMG_BREAK] for r in range(rows)), [])


def _microbatches() -> list[Batch]:
    """Packed rows of two documents, the pictures in the first, each picture's tokens where it sits."""
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(20, 128, (n,), generator=gen).tolist()  # noqa: E731 (no image ids)
    out = []
    for sizes in PICTURES:
        ids, images = text(3), []
        for h, w in sizes:
            images.append(torch.randn(3, h, w, generator=gen).numpy())
            ids += _image_tokens(h, w) + text(4)
        x = torch.tensor(ids + text(9))
        y = torch.randint(20, 128, x.shape, generator=gen)
        mask = (torch.rand(x.shape, generator=gen) < 0.6) & (x != IMG)
        out.append(Batch(x.numpy(), y.numpy(), mask.numpy(), [len(ids), 9], images))
    return out


def _worker(rank: int, world: int, root: str, port: int) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters
    from finetune.trainer import TrainState, train_step

    device = init_test_rank(rank, world, port)
    steps = [_microbatches()[2 * s : 2 * s + 2] for s in range(STEPS)]
    for kind, targets in KINDS.items():
        lora = LoraArgs(enable=False) if targets is None else LoraArgs(rank=4, target_modules=targets)
        # Checkpointing must not change the numbers: full alone, selective and none on two ranks.
        args = TrainArgs(model_id_or_path=os.path.join(root, "model"), run_dir=root,
                         data=DataArgs(instruct_data="unused"), lora=lora, max_norm=1e9,
                         checkpoint=True if world == 1 else ("selective" if rank == 0 else False))
        precision = resolve_precision("fp32", device)
        model = build_model(args, load_model_args(args.model_id_or_path), device, precision, vision=True)
        encoder = model.transformer.vision_encoder
        for block in encoder.transformer.layers:
            assert isinstance(block, FSDPModule)  # its own unit, not the root's
            for name, p in block.named_parameters():
                # Frozen unless targeted: the base weights train in full fine-tuning only.
                assert p.requires_grad == (kind == "full" or (kind == "vision_lora" and ".lora_" in name)), name
                # Two ranks shard every vision weight; alone, frozen ones stay plain tensors.
                assert isinstance(p, DTensor) == (world > 1 or p.requires_grad), name
                if world > 1:
                    assert p.to_local().numel() < p.numel(), name
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for batches in steps:
            loss, _, _ = train_step(model, optimizer, batches[rank::world], args, TrainState(), precision, device)
            losses.append(loss)
        if world > 1:  # gathered for the step only: sharded again once the backward is over
            assert all(isinstance(p, DTensor) for p in encoder.parameters())
        # Every trained weight, gathered on every rank (full_tensor is a collective).
        weights = gather_adapters(model, torch.float32) if lora.enable else {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.transformer.named_parameters()
        }
        if D.is_main():
            weights["losses"] = torch.tensor(losses, dtype=torch.float64)
            save_file(weights, os.path.join(root, f"world{world}_{kind}.safetensors"))
    D.destroy()


def spawn_with_timeout(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """torch.multiprocessing.spawn that fails instead of hanging: the ranks are killed after ``timeout`` s."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} ranks still running after {timeout:.0f} s: a collective hangs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_ranks")
    write_random_vision_model(root / "model", ARGS)
    for world in (1, 2):
        spawn_with_timeout(_worker, (world, str(root), free_port()), world, HANG_S)
    return root


def test_two_ranks_equal_one_with_pictures_and_a_blank_rank(runs):
    one, _ = load_equal_runs(runs, "lora")
    assert one["losses"].shape == (STEPS,)
    assert one["layers.0.attention.wq.lora_B.weight"].abs().sum() > 0  # it trained


def test_two_ranks_equal_one_with_vision_adapters(runs):
    one, _ = load_equal_runs(runs, "vision_lora")
    assert one["vision_encoder.transformer.layers.0.attention.wq.lora_B.weight"].abs().sum() > 0


def test_two_ranks_equal_one_training_the_vision_encoder(runs):
    one, _ = load_equal_runs(runs, "full")
    start = load_file(str(runs / "model" / "consolidated.safetensors"))
    key = "vision_encoder.transformer.layers.0.feed_forward.w1.weight"
    assert not torch.equal(one[key], start[key])


# ---------------------------------------------------------------------------------------------------
# Checkpointing of the vision blocks, one process.


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_ac") / "model"
    write_random_vision_model(folder, ARGS)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield folder
    finally:
        dist.destroy_process_group()


def _gradients(folder, checkpoint) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
    """Loss, every parameter's gradient (full fine-tuning: the vision blocks' too) and the ops the
    backward ran, for the step-0 micro-batches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune.build import build_model, resolve_precision

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] = self.counts.get(func.overloadpacket.__name__, 0) + 1
            return func(*args, **(kwargs or {}))

    cpu = torch.device("cpu")
    args = TrainArgs(model_id_or_path=str(folder), run_dir="unused", data=DataArgs(instruct_data="unused"),
                     lora=LoraArgs(enable=False), checkpoint=checkpoint)
    model = build_model(args, load_model_args(folder), cpu, resolve_precision("fp32", cpu), vision=True)
    b = _microbatches()[2]  # two pictures of different sizes
    images = [torch.from_numpy(i) for i in b.images]
    loss = model(torch.from_numpy(b.x), b.seqlens, torch.from_numpy(b.y), torch.from_numpy(b.y_mask), images)
    ops = Ops()
    with ops:
        loss.backward()
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    return loss.detach(), grads, dict(ops.counts)


def test_checkpointing_the_vision_blocks_keeps_losses_and_gradients(one_process):
    ref_loss, ref, none_ops = _gradients(one_process, False)
    assert any(n.startswith("transformer.vision_encoder.transformer.") and g.abs().sum() > 0 for n, g in ref.items())
    for mode in (True, "selective"):
        loss, grads, ops = _gradients(one_process, mode)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert sorted(grads) == sorted(ref)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
        # Full checkpointing reruns every block's attention kernel in backward (text and vision);
        # selective keeps their outputs, and reruns only the up-projections w1 and w3 of every text and
        # vision block, no other matrix product.
        attention = "_scaled_dot_product_flash_attention_for_cpu"
        if mode == "selective":
            assert ops.get(attention, 0) == none_ops.get(attention, 0)
            assert ops["mm"] == none_ops["mm"] + 2 * (TEXT_LAYERS + VISION["num_hidden_layers"])
        else:
            assert ops.get(attention, 0) > none_ops.get(attention, 0) + TEXT_LAYERS
