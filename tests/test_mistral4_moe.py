"""Mistral Small 4's fine-grained mixture of experts (``model.moe``, ``model.experts``), checked against
transformers' own ``Mistral4ForCausalLM`` on tiny random checkpoints written by save_pretrained: 16
routed experts, top-4, a shared expert, a first dense layer, latent attention with YaRN past its
original context."""

from __future__ import annotations

import pytest
import torch

from model.args import LoraArgs
from model.checkpoint import load_adapters
from model.experts import GroupedLoRALinear
from model.lora import LoRALinear, freeze_all_but_lora, lora_file_state, lora_modules
from model.moe import MoeLayer
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf
from tests.test_mistral4_mla import SEQLENS, _hf_model, _tokens

# 16 routed experts, top-4, one shared expert (the train and export tests build theirs from this too).
MOE = {"n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 16, "n_shared_experts": 1}
GROUPED = {**MOE, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}


def _load(folder, lora: LoraArgs | None = None) -> Transformer:
    return Transformer.from_folder(folder, device="cpu", dtype=torch.float32, lora=lora).eval()


@pytest.mark.parametrize(
    ("q_lora_rank", "moe"), [(32, MOE), (None, GROUPED)], ids=["q_lora", "grouped_routing_plain_q"]
)
def test_packed_logits_match_transformers(tmp_path, q_lora_rank, moe):
    hf = _hf_model(tmp_path, q_lora_rank=q_lora_rank, n_layers=3, first_dense=1, **moe)
    ours = _load(tmp_path)
    args = ours.args
    assert args.moe is not None and args.moe.fine_grained and args.moe.num_shared_experts == 1
    assert [args.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert args.moe.num_expert_groups == moe.get("n_group", 1)
    assert args.moe.routed_scale == moe.get("routed_scaling_factor", 1.0)
    assert isinstance(ours.layers[1].feed_forward, MoeLayer)
    assert ours.layers[1].feed_forward.experts.w1.weight.shape == (16, 16, 64)  # (experts, hidden, dim)
    assert_packed_matches_hf(ours, hf, _tokens(), SEQLENS)


def test_grouped_routing_changes_the_choice(tmp_path):
    """The grouped configuration above really restricts experts to the best groups (so its parity
    test would fail without group-limited routing) and scales the weights."""
    _hf_model(tmp_path, q_lora_rank=None, n_layers=2, first_dense=1, **GROUPED)
    layer = _load(tmp_path).layers[1].feed_forward
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        weights, experts = layer.route(x)
        layer.groups = 1  # the same router without groups
        _, free = layer.route(x)
    groups = experts // 4  # 16 experts in 4 groups of 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # within topk_group = 2 groups
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(experts, free, strict=True))
    torch.testing.assert_close(weights.sum(-1), torch.full((200,), 2.5))  # renormalised, then scaled


def test_lora_targets_and_adapter_names(tmp_path):
    """Default targets cover attention, dense, routed and shared experts (stacked per layer); the router
    stays frozen; scoped names select routed or shared experts alone; the adapter file names every
    expert at the layer level, as Mistral's checkpoints name the weights."""
    _hf_model(tmp_path, q_lora_rank=32, n_layers=2, first_dense=1, **MOE)
    model = _load(tmp_path, LoraArgs(rank=4))
    adapted = {name for name in lora_modules(model)}
    assert {"layers.1.feed_forward.experts.w1", "layers.1.feed_forward.shared_experts.w3",
            "layers.0.feed_forward.w2", "layers.1.attention.wkv_a_with_mqa"} <= adapted
    assert isinstance(model.layers[1].feed_forward.experts.w2, GroupedLoRALinear)
    assert not isinstance(model.layers[1].feed_forward.gate, LoRALinear)
    keys = set(lora_file_state(model))
    assert {"layers.1.experts.15.w2.lora_B.weight", "layers.1.shared_experts.w1.lora_A.weight",
            "layers.0.feed_forward.w1.lora_A.weight", "layers.1.attention.wq_b.lora_A.weight"} <= keys
    assert not any("feed_forward.experts" in k or "gate" in k for k in keys)
    assert lora_file_state(model)["layers.1.experts.3.w1.lora_A.weight"].shape == (4, 64)

    scoped = _load(tmp_path, LoraArgs(rank=4, target_modules=["experts.w2", "shared_experts.w1", "feed_forward.w3"]))
    assert sorted(lora_modules(scoped)) == ["layers.0.feed_forward.w3", "layers.1.feed_forward.experts.w2",
                                            "layers.1.feed_forward.shared_experts.w1"]
    assert scoped.args.present_targets(["wq", "wq_a", "w1", "feed_forward.w2", "experts.w3"]) == [
        "wq_a", "w1", "feed_forward.w2", "experts.w3"]


def test_zero_lora_is_the_base_and_adapters_round_trip(tmp_path):
    _hf_model(tmp_path, q_lora_rank=32, n_layers=2, first_dense=1, **GROUPED)
    base = _load(tmp_path)
    model = _load(tmp_path, LoraArgs(rank=4))
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, SEQLENS), base(tokens, SEQLENS), rtol=0, atol=0)
    # Only adapters learn: every expert's adapter gets a gradient, the router and experts do not.
    freeze_all_but_lora(model)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    model(tokens, SEQLENS).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    stacked = grads["layers.1.feed_forward.experts.w1.lora_A.weight"]  # (experts, rank, dim)
    assert (stacked.flatten(1).abs().sum(-1) > 0).sum() >= 8  # the tokens reach many experts' adapters
    # lora.safetensors (one adapter per expert) loads back into the stacked adapters exactly.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in lora_file_state(model).items()}, str(tmp_path / "lora.safetensors"))
    again = _load(tmp_path, LoraArgs(rank=4))
    load_adapters(again, tmp_path / "lora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, SEQLENS), model(tokens, SEQLENS), rtol=0, atol=0)
