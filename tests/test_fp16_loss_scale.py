"""fp16 dynamic loss scaling through the real train_step: an overflowing step is skipped and halves
the scale, 500 clean steps in a row double it, it never goes below 1, and the scale never changes
the update itself.

One process in a gloo group of one (an in-memory store: no port, no environment variables), the
real FSDP2-sharded tiny model in fp16, plain SGD(lr=1) so that a parameter's change *is* its gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

from finetune.args import TrainArgs
from finetune.build import build_model, resolve_precision
from finetune.data.args import DataArgs
from finetune.trainer import FP16_MAX_SKIPS_IN_A_ROW, TrainState, divergence, train_step
from model.args import LoraArgs
from model.configs import load_model_args
from tests.model_helpers import write_checkpoint
from tests.train_helpers import microbatches, tiny_vocab_args

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "model"
    write_checkpoint(folder, tiny_vocab_args(), seed=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        args = TrainArgs(model_id_or_path=str(folder), run_dir="unused", data=DataArgs(instruct_data="unused"),
                         lora=LoraArgs(rank=4), num_microbatches=2, max_norm=1e9, precision="fp16")
        precision = resolve_precision("fp16", CPU)
        model = build_model(args, load_model_args(folder), CPU, precision)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        yield model, optimizer, args, precision
    finally:
        dist.destroy_process_group()


def _step(setup, state: TrainState) -> tuple[float, float, bool]:
    model, optimizer, args, precision = setup
    return train_step(model, optimizer, microbatches(2, 48, 0.2), args, state, precision, CPU)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(distribute_tensor(weights[n], p.device_mesh, p.placements))


def test_overflow_skips_the_step_and_halves_the_scale(setup):
    model = setup[0]
    before = _trainable(model)
    # Gradients times 2**40 exceed fp16's range (65504) in the backward pass: a real overflow.
    state = TrainState(loss_scale=2.0**40, steps_since_rescale=123)
    loss, grad_norm, applied = _step(setup, state)
    assert not applied and not math.isfinite(grad_norm)
    assert math.isfinite(loss)  # the loss is reported unscaled
    assert (state.loss_scale, state.steps_since_rescale) == (2.0**39, 0)
    after = _trainable(model)
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0, msg=n)
    # One skipped step is loss scaling at work, not divergence; FP16_MAX_SKIPS_IN_A_ROW in a row are.
    assert divergence(loss, grad_norm, applied, state, "fp16") is None and state.skipped_in_a_row == 1


def test_clean_steps_apply_and_the_500th_doubles_the_scale(setup):
    model = setup[0]
    start = _trainable(model)
    state = TrainState(loss_scale=1024.0, steps_since_rescale=498)
    _, grad_norm, applied = _step(setup, state)
    assert applied and math.isfinite(grad_norm)
    assert (state.loss_scale, state.steps_since_rescale) == (1024.0, 499)
    assert any(not torch.equal(w, start[n]) for n, w in _trainable(model).items())
    _, _, applied = _step(setup, state)
    assert applied and (state.loss_scale, state.steps_since_rescale) == (2048.0, 0)


def test_the_scale_does_not_change_the_update(setup):
    # The gradients are unscaled before clipping and the step: the same start gives the same step at
    # scale 1 and at 2**12 (up to fp16 rounding of the scaled backward).
    model = setup[0]
    start = _trainable(model)
    deltas = []
    for scale in (1.0, 2.0**12):
        _restore(model, start)
        _, _, applied = _step(setup, TrainState(loss_scale=scale))
        assert applied
        deltas.append({n: w - start[n] for n, w in _trainable(model).items()})
    assert any(d.abs().max() > 0 for d in deltas[0].values())
    for n in deltas[0]:
        torch.testing.assert_close(deltas[1][n], deltas[0][n], rtol=2e-2, atol=1e-4, msg=n)


def test_the_scale_never_goes_below_one(setup):
    model = setup[0]
    # An adapter so large that the fp16 forward overflows at any scale.
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("lora_B.weight"))
    with torch.no_grad():
        p.fill_(6e4)
    before = _trainable(model)
    state = TrainState(loss_scale=1.0)
    for _ in range(2):
        _, _, applied = _step(setup, state)
        assert not applied and state.loss_scale == 1.0
    assert torch.equal(_trainable(model)[name], before[name])
    # The run stops once the skips reach FP16_MAX_SKIPS_IN_A_ROW, with the scale in the message.
    state.skipped_in_a_row = FP16_MAX_SKIPS_IN_A_ROW - 1
    assert divergence(2.0, math.inf, False, state, "fp16") == (
        f"fp16 gradients overflowed {FP16_MAX_SKIPS_IN_A_ROW} steps in a row (loss scale 1)")
