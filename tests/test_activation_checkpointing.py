"""Activation checkpointing modes: same gradients as none, and selective recomputes only what it says.

Selective checkpointing keeps the attention kernel's output and every matrix product except the
feed-forward's two up-projections (w1, w3: of the dense feed-forward, of the routed experts' grouped
products, of the shared experts); the LoRA update is accumulated into the saved base product in
place, so this also checks that a recomputed block does not add it twice.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.parallel import checkpoint_block
from model.args import LoraArgs
from model.attention import AttentionMask
from model.lora import freeze_all_but_lora
from model.rope import positions_from_seqlens, rope_frequencies
from model.transformer import TransformerBlock
from tests.model_helpers import tiny_args

SEQLENS = [11, 5, 16]


class _OpCounter(TorchDispatchMode):
    """Counts the ops that really execute (a checkpoint's cached ops never reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


MIXTRAL = {"num_experts": 4, "num_experts_per_tok": 2}
# Mistral Small 4's layout: narrow routed experts (48 wide: no other product of the block is) and a
# shared expert.
FINE_GRAINED = {"num_experts": 16, "num_experts_per_tok": 4, "expert_hidden_dim": 48, "num_shared_experts": 1}


def _block(mode: str, moe: dict | None, dtype: torch.dtype, nf4: bool = False) -> tuple[TransformerBlock, object]:
    # hidden_dim 128: NF4 needs in_features in multiples of 64.
    args = tiny_args(hidden_dim=128, moe=moe)
    torch.manual_seed(0)
    block = TransformerBlock(args, LoraArgs(rank=4))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)  # non-zero lora_B: the update's gradient path is exercised
    block.to(dtype)
    if nf4:
        from model.quant import quantize_lora_layers

        quantize_lora_layers(block, storage_dtype=dtype)
    freeze_all_but_lora(block)
    if mode != "none":
        checkpoint_block(block, mode)
    return block, args


def _run(mode: str, moe: dict | None = None, dtype: torch.dtype = torch.float32, nf4: bool = False):
    block, args = _block(mode, moe, dtype, nf4)
    freqs = rope_frequencies(positions_from_seqlens(SEQLENS, "cpu"), args.head_dim, args.rope_theta)
    mask = AttentionMask.build(SEQLENS, None, "sdpa", torch.device("cpu"))
    x = torch.randn(sum(SEQLENS), args.dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x.requires_grad_(True)
    out = block(x, freqs, mask)
    with _OpCounter() as backward_ops:
        (out.float() ** 2).sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads, backward_ops.counts


@pytest.mark.parametrize("moe", [None, MIXTRAL, FINE_GRAINED], ids=["dense", "moe", "fine_grained_moe"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_output_and_gradients(mode, moe):
    ref_out, ref_dx, ref_grads, _ = _run("none", moe)
    out, dx, grads, _ = _run(mode, moe)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-7)
    assert sorted(grads) == sorted(ref_grads) and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_selective_checkpointing_matches_in_bfloat16():
    _, ref_dx, ref_grads, _ = _run("none", dtype=torch.bfloat16)
    _, dx, grads, _ = _run("selective", dtype=torch.bfloat16)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)


def test_selective_recomputes_only_the_up_projections():
    *_, none = _run("none")
    *_, full = _run("full")
    *_, selective = _run("selective")
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    # Full checkpointing re-runs the forward: attention and the base + LoRA products again.
    assert full[attention] == len(SEQLENS) and none.get(attention, 0) == 0
    assert full["mm"] > none["mm"] + 7
    # Selective: no attention forward; the two up-projections' base products (w1 x, w3 x) and
    # their LoRA updates (B u, accumulated by addmm_) again; the rank-wide A x are kept.
    assert selective.get(attention, 0) == 0
    assert selective["mm"] == none["mm"] + 2
    assert selective["addmm_"] == 2


def test_selective_recomputes_only_the_experts_up_projections():
    """Routed experts (grouped products) and the shared expert follow the dense rule: backward re-runs
    the w1 and w3 products and keeps w2's, the rank-wide A x and the router's logits. The experts' LoRA
    updates B u, which they add out of place (dense layers accumulate them into the kept base product),
    are recomputed too: w2's would otherwise be kept beside its base product."""
    *_, none = _run("none", FINE_GRAINED)
    *_, full = _run("full", FINE_GRAINED)
    *_, selective = _run("selective", FINE_GRAINED)
    # w1, w2, w3: base and B u each; A x of w2, and of w1 and w3 as one product (model/experts.py)
    assert full["_grouped_mm"] == none["_grouped_mm"] + 8
    assert selective["_grouped_mm"] == none["_grouped_mm"] + 5  # w1, w3 base; B u of all three
    assert selective["mm"] == none["mm"] + 2 and selective["addmm_"] == 2  # the shared expert's w1, w3


# NF4 quantizes rows in blocks of 64: the experts' inputs (dim, expert_hidden_dim) are multiples of it.
@pytest.mark.parametrize("moe", [None, {**FINE_GRAINED, "expert_hidden_dim": 128}], ids=["dense", "fine_grained_moe"])
def test_selective_checkpointing_on_an_nf4_base(moe):
    # QLoRA's layer adds its update out of place (bitsandbytes computes the base product); its stacked
    # experts dequantize inside their own autograd function (model/quant.py).
    pytest.importorskip("bitsandbytes")
    ref_out, ref_dx, ref_grads, _ = _run("none", moe, nf4=True)
    out, dx, grads, _ = _run("selective", moe, nf4=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-7)
    assert sorted(grads) == sorted(ref_grads) and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
