"""Decoding Mistral Small 4's latent attention (``model.mla``) with a cache of latents: cached logits
equal the full forward, the cache holds one latent and one rotary key per token and layer, and
greedy generation equals transformers' own ``Mistral4ForCausalLM.generate``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.args import LoraArgs
from model.generate import KVCache, forward_cached, generate
from model.lora import LoRALinear
from model.mla import _dense_weight
from model.rope import apply_rope, query_key_rotations, rotations
from model.transformer import Transformer
from tests.test_mistral4_mla import ORIGINAL, _hf_model

# Two sequences decoded together, right-padded at prefill; the longer one runs to position 40, past
# the original context (16): YaRN's blend and llama-4's query factors differ from step to step.
PROMPT_LENS = (9, 3)
STEPS = 32
CASES = {
    "q_lora": {"q_lora_rank": 32},
    "plain_q": {"q_lora_rank": None},
    # Adapters on every projection, wkv_b's included: absorption must fold them into the weight.
    "q_lora_adapters": {"q_lora_rank": 32, "lora": True},
}


def _model(folder, q_lora_rank: int | None, lora: bool = False) -> Transformer:
    _hf_model(folder, q_lora_rank=q_lora_rank)
    adapters = LoraArgs(rank=4, target_modules=["wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo"]) if lora else None
    model = Transformer.from_folder(folder, device="cpu", dtype=torch.float32, lora=adapters)
    if lora:  # lora_B starts at zero: give the adapters a visible effect
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (n + STEPS,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_logits_equal_full_forward(tmp_path, case) -> None:
    model = _model(tmp_path, **CASES[case])
    seqs = _sequences()
    cache = KVCache.empty(model, batch=len(seqs), max_len=max(map(len, seqs)))
    width = max(PROMPT_LENS)
    # (batch, width): the short prompt right-padded with zeros, which decoding overwrites slot by slot
    padded = torch.tensor([s[:n] + [0] * (width - n) for s, n in zip(seqs, PROMPT_LENS, strict=True)])
    prefill = forward_cached(model, padded, torch.arange(width).expand(len(seqs), -1), cache)  # (batch, width, vocab)
    starts = torch.tensor(PROMPT_LENS)
    steps = []  # each (batch, vocab): one token per sequence at its own next position
    for i in range(STEPS):
        tokens = torch.tensor([[s[n + i]] for s, n in zip(seqs, PROMPT_LENS, strict=True)])  # (batch, 1)
        steps.append(forward_cached(model, tokens, (starts + i)[:, None], cache)[:, 0])
    with torch.no_grad():
        for b, (seq, n) in enumerate(zip(seqs, PROMPT_LENS, strict=True)):
            full = model(torch.tensor(seq), [len(seq)])  # (tokens, vocab): row p is the forward over seq[:p + 1]
            cached = torch.cat([prefill[b, :n], torch.stack([s[b] for s in steps])])
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # Batched generation, right-padded prompts, is the same with and without the cache.
    prompts = [s[:n] for s, n in zip(seqs, PROMPT_LENS, strict=True)]
    assert generate(model, prompts, max_new_tokens=24, eos_id=None) == generate(
        model, prompts, max_new_tokens=24, eos_id=None, use_cache=False
    )


def test_cache_holds_one_latent_and_rotary_key_per_token(tmp_path) -> None:
    model = _model(tmp_path, q_lora_rank=32)
    a, mla = model.args, model.args.mla
    (seq, _) = _sequences()
    cache = KVCache.empty(model, batch=2, max_len=len(seq))
    width = mla.kv_lora_rank + mla.qk_rope_head_dim
    # Per layer (batch, 1, max_len, rank + rope): 32 numbers a token, where keys and values per head take
    # heads * (qk + v) = 4 * (24 + 12) = 144.
    assert width < a.n_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    assert [tuple(k.shape) for k in cache.k] == [(2, 1, len(seq), width)] * a.n_layers
    assert cache.v == [None] * a.n_layers
    forward_cached(model, torch.tensor([seq, seq]), torch.arange(len(seq)).expand(2, -1), cache)
    # What layer 0 stored: its normed latent, then its key's rotary part, rotated at each position.
    with torch.no_grad():
        attention = model.layers[0].attention
        x = model.layers[0].attention_norm(model.tok_embeddings(torch.tensor(seq)))  # (tokens, dim)
        latent, k_rot = attention.wkv_a_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        _, k_freqs = query_key_rotations(rotations(torch.arange(len(seq)), a))
        k_rot = apply_rope(k_rot[:, None], k_freqs)[:, 0]  # (tokens, rope)
        expected = torch.cat((attention.kv_a_norm(latent), k_rot), dim=-1)  # (tokens, rank + rope)
    torch.testing.assert_close(cache.k[0][1, 0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "plain_q"])
def test_greedy_generation_matches_transformers(tmp_path, q_lora_rank) -> None:
    hf = _hf_model(tmp_path, q_lora_rank=q_lora_rank)
    ours = Transformer.from_folder(tmp_path, device="cpu", dtype=torch.float32).eval()
    prompt = _sequences()[0][: PROMPT_LENS[0]]
    new = 2 * ORIGINAL  # past the original context and twice it: positions up to 40
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert generate(ours, [prompt], max_new_tokens=new, eos_id=None) == [ref[0, len(prompt):].tolist()]


@pytest.mark.parametrize("kind", ["linear", "lora", "nf4"])
def test_absorbed_weight_is_what_the_layer_applies(kind) -> None:
    """Decoding multiplies by wkv_b's matrix instead of calling the layer: with adapters (and NF4
    codes) folded in, it must be the map the layer computes."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=False) if kind == "linear" else LoRALinear(64, 96, rank=4, scaling=2.0)
    if kind != "linear":
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.lora_B.weight)
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
        from model.quant import NF4LoRALinear, quantize_lora_layers

        holder = nn.ModuleDict({"wkv_b": layer})
        quantize_lora_layers(holder, torch.float32)
        layer = holder["wkv_b"]
        assert isinstance(layer, NF4LoRALinear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(x @ _dense_weight(layer).T, layer(x), rtol=1e-5, atol=1e-5)
