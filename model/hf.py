"""Key names and layout of Hugging Face ``MistralForCausalLM`` / ``MixtralForCausalLM``.

Hugging Face applies rotary embeddings to the two *halves* of each head, Mistral to *adjacent*
pairs, so HF checkpoints store the rows of ``q_proj``/``k_proj`` permuted: within every head,
row ``2i`` moves to ``i`` and row ``2i+1`` to ``head_dim/2 + i``. Any matrix whose *output*
rows feed q or k (the weight itself, or a LoRA ``B``) gets the same permutation.
"""

from __future__ import annotations

import re

import torch

from model.args import ModelArgs


def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    rows, cols = w.shape
    # (heads, head_dim/2, 2, cols) -> (heads, 2, head_dim/2, cols): evens first, then odds.
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    rows, cols = w.shape
    # (heads, 2, head_dim/2, cols) -> (heads, head_dim/2, 2, cols): interleave the halves back.
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "mlp.gate",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|lora_A\.weight|lora_B\.weight)$")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])$")


def module_to_hf(module: str, moe: bool) -> str:
    """Map a Mistral module path inside a layer (``attention.wq``) to its HF name."""
    expert = _EXPERT.match(module)
    if expert:
        # Mixtral's HF layout keeps w1/w2/w3 under block_sparse_moe.experts.{j}.
        return f"block_sparse_moe.experts.{expert.group(1)}.{expert.group(2)}"
    if moe and module == "feed_forward.gate":
        return "block_sparse_moe.gate"
    if module not in _LAYER:
        raise KeyError(f"no Hugging Face name for module '{module}'")
    return _LAYER[module]


def key_to_hf(key: str, moe: bool = False) -> str:
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.match(key)
    if not m:
        raise KeyError(f"no Hugging Face name for '{key}'")
    layer, module, leaf = m.groups()
    return f"model.layers.{layer}.{module_to_hf(module, moe)}.{leaf}"


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Mistral consolidated tensors -> HF tensors (q/k rows permuted)."""
    out = {}
    for key, w in state.items():
        if key.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads, args.head_dim)
        elif key.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.n_kv_heads, args.head_dim)
        out[key_to_hf(key, args.moe is not None)] = w
    return out


def hf_config_dict(args: ModelArgs, dtype: str = "bfloat16") -> dict:
    """A ``config.json`` for transformers describing the same network."""
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "sliding_window": args.sliding_window,
        "max_position_embeddings": 32768 if args.sliding_window is None else max(32768, args.sliding_window),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if args.moe is None:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": args.moe.num_experts,
        "num_experts_per_tok": args.moe.num_experts_per_tok,
        **common,
    }
