"""``compile: true``: every block compiled as one graph computes what the eager block computes.

Checked per activation checkpointing mode (the compiled graph applies the checkpoint policy at
trace time, so it must still recompute rather than keep), with a sliding window, across batches
with different document counts (no recompilation), and through real FSDP2 ranks against eager.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from finetune.args import CHECKPOINT_MODES, TrainArgs
from finetune.build import check_compile
from finetune.config import ConfigError
from finetune.data.args import DataArgs
from finetune.distributed import free_port
from finetune.parallel import checkpoint_block, compile_block
from model.args import LoraArgs
from model.attention import AttentionMask, document_attention
from model.lora import freeze_all_but_lora
from model.rope import positions_from_seqlens, rope_frequencies
from model.transformer import TransformerBlock
from tests.model_helpers import tiny_args, write_checkpoint
from tests.train_helpers import init_test_rank, microbatches, tiny_vocab_args

# Two batches of 32 tokens with 3 and 2 documents: the second must reuse the first one's graph.
BATCHES = ([11, 5, 16], [20, 12])


def _block(mode: str, compiled: bool, window: int | None = None) -> tuple[TransformerBlock, object]:
    args = tiny_args(sliding_window=window)
    torch.manual_seed(0)
    block = TransformerBlock(args, LoraArgs(rank=4))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)  # non-zero lora_B: the update's gradient path is exercised
    freeze_all_but_lora(block)
    if mode != "none":
        checkpoint_block(block, mode)
    if compiled:
        compile_block(block)
    return block, args


def _step(block: TransformerBlock, args, seqlens: list[int], saved: list[tuple] | None = None):
    """Forward and backward of one packed batch; ``saved`` collects the shapes of the activations
    (not parameters) that the forward keeps for backward."""
    freqs = rope_frequencies(positions_from_seqlens(seqlens, "cpu"), args.head_dim, args.rope_theta)
    mask = AttentionMask.build(seqlens, args.sliding_window, "sdpa", torch.device("cpu"))
    x = torch.randn(sum(seqlens), args.dim, generator=torch.Generator().manual_seed(len(seqlens)))
    x.requires_grad_(True)
    params = {p.data_ptr() for p in block.parameters()}
    for p in block.parameters():
        p.grad = None

    def pack(t: torch.Tensor) -> torch.Tensor:
        if saved is not None and t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, freqs, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def _compare(mode: str, window: int | None = None) -> None:
    eager, args = _block(mode, compiled=False, window=window)
    compiled, _ = _block(mode, compiled=True, window=window)
    for seqlens in BATCHES:
        ref_out, ref_dx, ref_grads = _step(eager, args, seqlens)
        out, dx, grads = _step(compiled, args, seqlens)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
        assert sorted(grads) == sorted(ref_grads) and len(grads) == 14
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_compiled_block_equals_eager_block(mode):
    from torch._dynamo.utils import counters

    _compare(mode)
    # One graph served both batches, although their document counts differ.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_block_with_a_sliding_window_shorter_than_a_document():
    _compare("selective", window=8)


def test_compiled_block_traces_flex_attention_forward():
    # The GPU path: FlexAttention traced into the block's graph with a new block mask per batch.
    # FlexAttention has no backward on CPU, so this checks the forward (evaluation) only.
    from torch._dynamo.utils import counters

    eager, args = _block("none", compiled=False)
    compiled, _ = _block("none", compiled=True)
    inputs = []
    for seqlens in (*BATCHES, [1, 31]):
        freqs = rope_frequencies(positions_from_seqlens(seqlens, "cpu"), args.head_dim, args.rope_theta)
        mask = AttentionMask.build(seqlens, None, "flex", torch.device("cpu"))
        inputs.append((torch.randn(sum(seqlens), args.dim), freqs, mask))
    with torch.no_grad():
        expected = [eager(*batch) for batch in inputs]  # eager flex compiles its own kernel graphs
        counters.clear()
        for batch, reference in zip(inputs, expected, strict=True):
            torch.testing.assert_close(compiled(*batch), reference, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_checkpointing_still_recomputes():
    # The compiled graph applies checkpointing at trace time; what it keeps for backward must be
    # what checkpointing promises, not what a plain compiled graph would keep.
    saved = {}
    for mode in CHECKPOINT_MODES:
        block, args = _block(mode, compiled=True)
        saved[mode] = []
        _step(block, args, BATCHES[0], saved[mode])
    tokens = sum(BATCHES[0])
    # Full: the block's inputs (hidden states, rotations, document lengths), nothing else.
    inputs = [(tokens, args.dim), (tokens, args.head_dim // 2), (len(BATCHES[0]),)]
    assert sorted(saved["full"]) == sorted(inputs), saved["full"]
    # Selective keeps matmul outputs but not the (tokens, hidden_dim) up-projections, which none keeps.
    up = (tokens, args.hidden_dim)
    assert up in saved["none"] and up not in saved["selective"], saved
    assert (tokens, args.n_heads * args.head_dim) in saved["selective"], saved["selective"]

    def numel(shapes):
        return sum(torch.Size(s).numel() for s in shapes)

    assert numel(saved["full"]) < numel(saved["selective"]) < numel(saved["none"]), saved


@pytest.mark.parametrize("mode, kernel_runs_in_backward", [("full", 2), ("selective", 1), ("none", 1)])
def test_compiled_backward_reruns_attention_only_under_full_checkpointing(mode, kernel_runs_in_backward, monkeypatch):
    # The backward custom op always re-runs the documents' kernels once (its vjp); only full
    # checkpointing may add the forward's: selective keeps the attention output.
    import model.attention as attention

    calls = []
    kernel = attention._sdpa_per_document
    monkeypatch.setattr(attention, "_sdpa_per_document", lambda *a: calls.append(1) or kernel(*a))
    block, args = _block(mode, compiled=True)
    seqlens = BATCHES[0]
    freqs = rope_frequencies(positions_from_seqlens(seqlens, "cpu"), args.head_dim, args.rope_theta)
    mask = AttentionMask.build(seqlens, None, "sdpa", torch.device("cpu"))
    x = torch.randn(sum(seqlens), args.dim, requires_grad=True)
    out = block(x, freqs, mask)
    assert len(calls) == 1
    calls.clear()
    out.sum().backward()
    assert len(calls) == kernel_runs_in_backward


def test_document_attention_op_registration():
    # Fake (meta) kernel, autograd formula and schema agree with the real kernel.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 6, 4])
    q, k, v = (torch.randn(13, h, 4, generator=gen, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1))
    for window in (None, 4):
        torch.library.opcheck(document_attention, (q, k, v, lengths, window),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.autograd.gradcheck(lambda *qkv, w=window: document_attention(*qkv, lengths, w), (q, k, v))


def test_compile_refuses_what_it_cannot_trace(tmp_path):
    moe = tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2})
    with pytest.raises(ConfigError, match="mixture-of-experts.*compile: false"):
        check_compile(True, moe, "mixtral")
    check_compile(False, moe, "mixtral")
    check_compile(True, tiny_args(), "dense")
    args = TrainArgs(model_id_or_path="m", run_dir="r", data=DataArgs(instruct_data="d"), compile=True,
                     quantization="nf4")
    with pytest.raises(ConfigError, match="'compile: true' does not support 'quantization: nf4'"):
        args.validate()


def _ranks_worker(rank: int, world: int, folder: str, out: str, port: int) -> None:
    from finetune import distributed as D
    from finetune.build import build_model, resolve_precision
    from finetune.checkpointing import gather_adapters
    from finetune.trainer import TrainState, train_step
    from model.configs import load_model_args

    device = init_test_rank(rank, world, port)
    mine = microbatches(4, 48, 0.2)[rank::world]
    compiled = world > 1
    args = TrainArgs(model_id_or_path=folder, run_dir=out, data=DataArgs(instruct_data="unused"),
                     lora=LoraArgs(rank=4), num_microbatches=len(mine), max_norm=1e9,
                     checkpoint="selective", compile=compiled)
    precision = resolve_precision("fp32", device)
    model = build_model(args, load_model_args(args.model_id_or_path), device, precision)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = [train_step(model, optimizer, mine, args, TrainState(), precision, device)[0] for _ in range(2)]
    adapters = gather_adapters(model, torch.float32)
    if D.is_main():
        adapters["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(adapters, os.path.join(out, f"compiled{int(compiled)}.safetensors"))
    D.destroy()


@pytest.mark.slow
def test_two_compiled_ranks_equal_one_eager_rank(tmp_path):
    write_checkpoint(tmp_path / "model", tiny_vocab_args(), seed=0)
    for world in (1, 2):
        mp.spawn(_ranks_worker, args=(world, str(tmp_path / "model"), str(tmp_path), free_port()), nprocs=world)
    eager, compiled = (load_file(tmp_path / f"compiled{c}.safetensors") for c in (0, 1))
    assert sorted(eager) == sorted(compiled)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)
