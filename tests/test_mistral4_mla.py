"""Mistral Small 4's multi-head latent attention (``model.mla``), checked against transformers' own
``Mistral4ForCausalLM`` on tiny random all-dense checkpoints written by save_pretrained."""

from __future__ import annotations

import pytest
import torch

from model.args import LoraArgs
from model.lora import LoRALinear
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf

# Positions run past the original context (16) up to 40: YaRN's blend and llama-4's factors show.
SEQLENS = [41, 7, 23]
ORIGINAL = 16


def _hf_config(*, q_lora_rank: int | None, n_layers: int = 2, first_dense: int | None = None, **moe):
    """A tiny ``Mistral4Config``: all layers dense unless ``first_dense`` says otherwise; ``moe`` overrides
    the MoE keys (tests/test_mistral4_moe.py)."""
    from transformers import Mistral4Config

    moe = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, **moe}
    return Mistral4Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=n_layers if first_dense is None else first_dense,
        **moe, rms_norm_eps=1e-5,
        max_position_embeddings=4 * ORIGINAL,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 8.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.3, "partial_rotary_factor": 8 / 24,
        },
    )


def _hf_model(folder, *, q_lora_rank: int | None, n_layers: int = 2, first_dense: int | None = None, **moe):
    """A tiny random ``Mistral4ForCausalLM`` of ``_hf_config`` saved in ``folder``."""
    from transformers import Mistral4ForCausalLM

    config = _hf_config(q_lora_rank=q_lora_rank, n_layers=n_layers, first_dense=first_dense, **moe)
    torch.manual_seed(0)
    return save_random_hf(Mistral4ForCausalLM(config), folder)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (sum(SEQLENS),), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "plain_q"])
def test_packed_logits_match_transformers(tmp_path, q_lora_rank):
    hf = _hf_model(tmp_path, q_lora_rank=q_lora_rank)
    ours = Transformer.from_folder(tmp_path, device="cpu", dtype=torch.float32).eval()
    mla = ours.args.mla
    assert mla is not None and mla.q_lora_rank == q_lora_rank and mla.v_head_dim == 12
    assert mla.softmax_scale_factor > 1.0  # mscale_all_dim: the softmax scaling is exercised
    assert ours.args.yarn is not None and ours.args.llama_4_scaling is not None
    assert_packed_matches_hf(ours, hf, _tokens(), SEQLENS)


def test_lora_on_latent_attention_starts_at_the_base_model(tmp_path):
    _hf_model(tmp_path, q_lora_rank=32)
    base = Transformer.from_folder(tmp_path, device="cpu", dtype=torch.float32).eval()
    lora = LoraArgs(rank=4, target_modules=["wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo", "w1"])
    ours = Transformer.from_folder(tmp_path, device="cpu", dtype=torch.float32, lora=lora).eval()
    adapted = {name.split(".", 2)[-1] for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"attention.wq_a", "attention.wq_b", "attention.wkv_a_with_mqa", "attention.wkv_b", "attention.wo",
                       "feed_forward.w1"}
    with torch.no_grad():
        torch.testing.assert_close(ours(_tokens(), SEQLENS), base(_tokens(), SEQLENS), rtol=0, atol=0)
