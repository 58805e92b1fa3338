"""The fused chunked cross-entropy against PyTorch's own cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from finetune.loss import block_rows, linear_cross_entropy_sum


@pytest.mark.parametrize("chunk, block", [(1, 1), (7, 7), (7, 3), (64, 1), (64, 5), (1000, 1000), (1000, 16)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_materialised_cross_entropy(chunk, block, weight_grad):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    y = torch.randint(0, 300, (50,), generator=g)
    ours = linear_cross_entropy_sum(h, w, y, chunk, block)
    (ours * 3.0).backward()
    grads = (h.grad.clone(), w.grad.clone() if weight_grad else None)
    h.grad = None
    w.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    (ref * 3.0).backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], h.grad)
    if weight_grad:
        torch.testing.assert_close(grads[1], w.grad)


def test_no_targets_gives_zero_loss():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8)
    loss = linear_cross_entropy_sum(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 8)


def test_bf16_inputs_give_float32_loss_close_to_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g).bfloat16()
    w = (torch.randn(500, 32, generator=g) * 0.1).bfloat16()
    y = torch.randint(0, 500, (40,), generator=g)
    ours = linear_cross_entropy_sum(h, w, y, 16)
    ref = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("block", [1, 5, 16])
def test_bf16_float32_blocks_give_the_whole_chunks_gradient_exactly(block):
    # The block size only changes which rows share a float32 buffer: per-row values are identical.
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(700, 32, generator=g) * 0.1).bfloat16()
    y = torch.randint(0, 700, (40,), generator=g)
    results = []
    for b in (16, block):
        h = torch.randn(40, 32, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
        loss = linear_cross_entropy_sum(h, w, y, 16, b)
        loss.backward()
        results.append((loss, h.grad))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    # and the gradient is the reference's, to bf16 precision
    h32 = torch.randn(40, 32, generator=torch.Generator().manual_seed(4)).bfloat16().float().requires_grad_()
    F.cross_entropy(h32 @ w.float().t(), y, reduction="sum").backward()
    torch.testing.assert_close(results[1][1].float(), h32.grad, rtol=2e-2, atol=2e-2)


def test_default_block_is_cache_sized_on_cpu_and_bounded_by_the_chunk():
    assert block_rows("cpu", 32768, 2048) == 32 and block_rows("cpu", 131072, 2048) == 8
    assert block_rows("cpu", 300, 64) == 64 and block_rows("cpu", 1 << 22, 64) == 1
    assert block_rows("cuda", 131072, 2048) == 128 and block_rows("cuda", 32768, 256) == 256


def test_extreme_logits_stay_finite_and_exact():
    # Target logits 300 nats below the row's maximum: a softmax probability would underflow to 0.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 4, generator=g, requires_grad=True)
    w = torch.randn(64, 4, generator=g) * 200
    y = (h.detach() @ w.t()).argmin(dim=1)
    ours = linear_cross_entropy_sum(h, w, y, 3)
    ours.backward()
    ours_grad = h.grad.clone()
    h.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    ref.backward()
    assert torch.isfinite(ours) and ours.item() > 300 * 8
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(ours_grad, h.grad)
