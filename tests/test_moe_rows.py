"""The routed experts' rows on CPU in bf16 (``model.moe.MoeLayer.rows_by_expert``): every expert's rows
are rounded up to ``CPU_ROW_MULTIPLE`` with zero rows, which must change nothing."""

from __future__ import annotations

import pytest
import torch

import model.moe
from model.args import LoraArgs, ModelArgs, MoeArgs
from model.moe import MoeLayer


def _layer() -> MoeLayer:
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=4, norm_eps=1e-6,
                     vocab_size=128, moe=MoeArgs(16, 4, 32, num_shared_experts=1, num_expert_groups=4,
                                                 num_expert_groups_per_tok=2, routed_scale=2.5))
    layer = MoeLayer(args, LoraArgs(rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # lora_B too: the adapters do work
    return layer.to(torch.bfloat16)


def _forward_backward(layer: MoeLayer) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 64, generator=gen).bfloat16().requires_grad_()
    y = layer(x)
    (y.float() * torch.randn(y.shape, generator=gen)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_rows_are_padded_per_expert():
    layer = _layer()
    experts = torch.randint(0, 16, (37, 4), generator=torch.Generator().manual_seed(2))
    order, slot, ends, rows = layer.rows_by_expert(experts, 16)
    counts = torch.bincount(experts.flatten(), minlength=16)
    assert torch.equal(torch.diff(ends, prepend=ends.new_zeros(1)), (counts + 15) // 16 * 16)
    assert rows == int(ends[-1]) > experts.numel() and len(set(slot.tolist())) == experts.numel()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    chosen = experts.flatten()[order]
    assert bool(((slot >= starts[chosen]) & (slot < starts[chosen] + counts[chosen])).all())  # its expert's rows
    _, plain_slot, plain_ends, plain_rows = layer.rows_by_expert(experts, 1)
    assert plain_rows == experts.numel() and torch.equal(plain_slot, torch.arange(experts.numel()))
    assert torch.equal(plain_ends, counts.cumsum(0).to(torch.int32))


def test_padding_rows_change_nothing(monkeypatch: pytest.MonkeyPatch):
    """Output, input gradient and every gradient (adapters, experts, router) with and without padding."""
    layer = _layer()
    padded = _forward_backward(layer)
    monkeypatch.setattr(model.moe, "CPU_ROW_MULTIPLE", 1)
    plain = _forward_backward(layer)
    torch.testing.assert_close(padded[0], plain[0])
    torch.testing.assert_close(padded[1], plain[1])
    assert padded[2].keys() == plain[2].keys()
    for name, grad in plain[2].items():
        torch.testing.assert_close(padded[2][name], grad, msg=name)
