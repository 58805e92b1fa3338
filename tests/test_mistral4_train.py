"""Mistral Small 4 trains under FSDP2 like every other family: a tiny transformers ``Mistral4ForCausalLM``
folder (latent attention with q_lora_rank, YaRN, a dense first layer, then 16 routed experts top-4 and a
shared expert) in real gloo process groups (torch.multiprocessing) with the real sharded model and
train_step.

- Two ranks with micro-batches equal one rank, LoRA (attention, routed and shared experts) and full
  fine-tuning; plain SGD(lr=1), so the parameter change is the gradient. One rank checkpoints
  selectively, the two ranks fully and not at all.
- The stacked experts are sharded by expert: each of two ranks holds 8 of the 16, loaded from the
  checkpoint's own per-expert tensors (and 3 + 2 of 5 experts when they do not divide evenly).
- The adapter file names every expert at the layer level, with each rank's rows as trained.
- Resume is exact: AdamW for three steps, against one step, a checkpoint, a fresh model that loads
  it, and two more steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from finetune.args import TrainArgs
from finetune.data.args import DataArgs
from finetune.distributed import free_port
from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors, load_adapters
from model.transformer import Transformer
from tests.test_mistral4_mla import _hf_model
from tests.test_mistral4_moe import MOE
from tests.train_helpers import init_test_rank, load_equal_runs, microbatches

pytestmark = pytest.mark.slow  # multi-process end to end

EXPERTS = "layers.1.feed_forward.experts.w1"  # a stacked parameter: (16 experts, 16, 64)
N_BATCHES, SEQ, VOCAB = 4, 48, 128


def _args(folder: str, run_dir: str, *, lora: bool, n_micro: int, checkpoint) -> TrainArgs:
    return TrainArgs(model_id_or_path=folder, run_dir=run_dir, data=DataArgs(instruct_data="unused"),
                     lora=LoraArgs(enable=lora, rank=4), num_microbatches=n_micro, max_norm=1e9, max_steps=3,
                     checkpoint=checkpoint)


def _worker(rank: int, world: int, root: str, port: int) -> None:
    from finetune import distributed as D

    device = init_test_rank(rank, world, port)
    mine = microbatches(N_BATCHES, SEQ, 0.2, vocab=VOCAB)[rank::world]
    folder = os.path.join(root, "hf")
    for kind in ("lora", "full"):
        # Activation checkpointing must not change the numbers: selective alone, full and none on two ranks.
        args = _args(folder, root, lora=kind == "lora", n_micro=len(mine),
                     checkpoint="selective" if world == 1 else rank == 0)
        _sgd(rank, world, root, kind, args, mine, device)
    if world == 2:
        _resume(rank, root, _args(folder, os.path.join(root, "run"), lora=True, n_micro=len(mine), checkpoint=False),
                mine, device)
        _odd_shards(rank, os.path.join(root, "hf_odd"), root, device)
    D.destroy()


def _sgd(rank: int, world: int, out: str, kind: str, args: TrainArgs, mine: list, device: torch.device) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters, gather_merged
    from finetune.trainer import TrainState, train_step
    from model.configs import load_model_args

    precision = resolve_precision("fp32", device)
    model = build_model(args, load_model_args(args.model_id_or_path), device, precision)
    if world == 2:  # every parameter sharded, the experts along the expert dimension like the rest
        assert all(isinstance(p, DTensor) for p in model.parameters())
        save_file({"w1": model.get_parameter(f"transformer.{EXPERTS}.weight").to_local().contiguous()},
                  os.path.join(out, f"shard_{kind}_rank{rank}.safetensors"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = [train_step(model, optimizer, mine, args, TrainState(), precision, device)[0] for _ in range(2)]
    weights = gather_merged(model, torch.float32) if kind == "full" else gather_adapters(model, torch.float32)
    if D.is_main():
        weights["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(weights, os.path.join(out, f"world{world}_{kind}.safetensors"))


def _resume(rank: int, root: str, args: TrainArgs, mine: list, device: torch.device) -> None:
    """Three AdamW steps saving a checkpoint after the first; then a fresh model resumes from it."""
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters, load_checkpoint, save_checkpoint
    from finetune.trainer import TrainState, build_optimizer, lr_at, train_step
    from model.configs import load_model_args

    precision = resolve_precision("fp32", device)
    model_args = load_model_args(args.model_id_or_path)

    def steps(model, optimizer, first: int, last: int, save_after: int | None = None) -> list[float]:
        losses = []
        for step in range(first, last + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            losses.append(train_step(model, optimizer, mine, args, TrainState(), precision, device)[0])
            if step == save_after:
                save_checkpoint(Path(args.run_dir), step, model, optimizer, model_args=model_args, lora=args.lora,
                                save_adapters=True, save_dtype=torch.float32, tokenizer_file=None,
                                train_state={"train": {}, "world_size": D.world_size()}, rank_state={},
                                num_keep=None)
                # This rank's rows of the stacked adapters as trained, for the adapter file's test.
                lora_b = model.get_parameter(f"transformer.{EXPERTS}.lora_B.weight").to_local().contiguous()
                save_file({"lora_B": lora_b}, os.path.join(root, f"lora_B_rank{rank}.safetensors"))
        return losses

    model = build_model(args, model_args, device, precision)
    optimizer = build_optimizer(model, args)
    straight = steps(model, optimizer, 1, 3, save_after=1)
    straight_adapters = gather_adapters(model, torch.float32)

    model = build_model(args, model_args, device, precision)
    optimizer = build_optimizer(model, args)
    load_checkpoint(Path(args.run_dir) / "checkpoints" / "checkpoint_000001", model, optimizer)
    resumed = steps(model, optimizer, 2, 3)
    resumed_adapters = gather_adapters(model, torch.float32)
    if D.is_main():
        save_file({**{f"straight.{k}": t for k, t in straight_adapters.items()},
                   **{f"resumed.{k}": t for k, t in resumed_adapters.items()},
                   "straight_losses": torch.tensor(straight, dtype=torch.float64),
                   "resumed_losses": torch.tensor(resumed, dtype=torch.float64)},
                  os.path.join(root, "resume.safetensors"))


def _odd_shards(rank: int, folder: str, out: str, device: torch.device) -> None:
    """5 experts over two ranks: FSDP2 gives rank 0 three rows and rank 1 two."""
    from finetune.build import build_model, resolve_precision
    from model.configs import load_model_args

    args = _args(folder, out, lora=True, n_micro=1, checkpoint=False)
    model = build_model(args, load_model_args(folder), device, resolve_precision("fp32", device))
    local = model.get_parameter(f"transformer.{EXPERTS}.weight").to_local().contiguous()
    save_file({"w1": local}, os.path.join(out, f"odd_rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral4_train")
    _hf_model(root / "hf", q_lora_rank=32, n_layers=2, first_dense=1, **MOE)
    _hf_model(root / "hf_odd", q_lora_rank=32, n_layers=2, first_dense=1, **{**MOE, "n_routed_experts": 5})
    for world in (1, 2):
        mp.spawn(_worker, args=(world, str(root), free_port()), nprocs=world)
    return root


def _experts(folder: Path, n: int) -> torch.Tensor:
    """The checkpoint's own per-expert w1 tensors of layer 1, stacked: (n, 16, 64)."""
    tensors = {k: t for k, t, *_ in iter_checkpoint_tensors(folder) if k.startswith("layers.1.experts.")}
    return torch.stack([tensors[f"layers.1.experts.{e}.w1.weight"] for e in range(n)])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_ranks_with_microbatches_equal_one_rank(runs, kind):
    one, two = load_equal_runs(runs, kind)
    if kind == "lora":  # every adapter trained: the comparison covers all of them
        trained = [k for k in one if k.endswith("lora_B.weight")]
        assert {"layers.1.experts.15.w2.lora_B.weight", "layers.1.shared_experts.w1.lora_B.weight",
                "layers.1.attention.wq_b.lora_B.weight", "layers.0.feed_forward.w3.lora_B.weight"} <= set(trained)
        assert all(one[k].abs().sum() > 0 for k in trained), [k for k in trained if one[k].abs().sum() == 0]
    else:  # the router and every expert train too
        base = {k: t for k, t, *_ in iter_checkpoint_tensors(runs / "hf")}
        for key in ["layers.1.gate.weight", "layers.1.shared_experts.w2.weight"] + [
                f"layers.1.experts.{e}.w1.weight" for e in range(16)]:
            assert not torch.equal(one[key], base[key]), key


def test_each_rank_holds_half_the_experts_as_the_checkpoint_stores_them(runs):
    shards = [load_file(str(runs / f"shard_lora_rank{r}.safetensors"))["w1"] for r in (0, 1)]
    assert [s.shape for s in shards] == [(8, 16, 64), (8, 16, 64)]
    torch.testing.assert_close(torch.cat(shards), _experts(runs / "hf", 16), rtol=0, atol=0)
    full = [load_file(str(runs / f"shard_full_rank{r}.safetensors"))["w1"] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(full), _experts(runs / "hf", 16), rtol=0, atol=0)


def test_experts_that_do_not_divide_evenly_load_into_uneven_shards(runs):
    shards = [load_file(str(runs / f"odd_rank{r}.safetensors"))["w1"] for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 2]
    torch.testing.assert_close(torch.cat(shards), _experts(runs / "hf_odd", 5), rtol=0, atol=0)


def test_adapter_file_names_every_expert_with_each_ranks_rows(runs):
    path = runs / "run" / "checkpoints" / "checkpoint_000001" / "consolidated" / "lora.safetensors"
    saved = load_file(str(path))
    assert not any("feed_forward.experts" in k or "gate" in k for k in saved)
    rows = torch.cat([load_file(str(runs / f"lora_B_rank{r}.safetensors"))["lora_B"] for r in (0, 1)])
    assert rows.shape == (16, 16, 4) and all(rows[e].abs().sum() > 0 for e in range(16))
    for e in range(16):
        torch.testing.assert_close(saved[f"layers.1.experts.{e}.w1.lora_B.weight"], rows[e], rtol=0, atol=0)
    # The file is what a consumer loads: strict keys and shapes on the unsharded model.
    load_adapters(Transformer.from_folder(runs / "hf", dtype=torch.float32, lora=LoraArgs(rank=4)), path)


def test_resumed_equals_uninterrupted(runs):
    got = load_file(str(runs / "resume.safetensors"))
    straight, resumed = got["straight_losses"], got["resumed_losses"]
    assert torch.equal(resumed, straight[1:]), (straight, resumed)
    assert straight[-1] < straight[0]
    keys = [k.removeprefix("straight.") for k in got if k.startswith("straight.")]
    assert any(k.startswith("layers.1.experts.") for k in keys)
    for key in keys:
        torch.testing.assert_close(got[f"resumed.{key}"], got[f"straight.{key}"], rtol=0, atol=0, msg=key)
