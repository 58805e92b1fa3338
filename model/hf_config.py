"""Hugging Face ``config.json`` <-> ``ModelArgs``: a config.json is translated into the params.json
mapping ``model.configs`` reads (one set of validators), and written back from ``ModelArgs``.

Families: ``mistral``, ``mixtral``, ``ministral``, ``ministral3``, ``mistral4`` (latent attention,
fine-grained MoE), and ``mistral3`` / ``llava`` (a Pixtral vision encoder around one of them:
``model.hf_vision_config``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from model.args import MlaArgs, ModelArgs
from model.configs import (
    _mscale,
    _positive_float,
    _positive_int,
    _yarn_magnitude,
    args_from_params,
)

_HF_TEXT_MODEL_TYPES = ("mistral", "mixtral", "ministral", "ministral3", "mistral4")


def args_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs for a transformers ``MistralForCausalLM``/``MixtralForCausalLM``/``MinistralForCausalLM``
    config.json."""
    model_type = config.get("model_type")
    if model_type in ("mistral3", "llava"):
        from model.hf_vision_config import args_from_multimodal  # it reads its text_config with this function

        return args_from_multimodal(config, source)
    mla = _mistral4_mla(config, source) if model_type == "mistral4" else None
    if model_type not in _HF_TEXT_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type is {model_type!r}; only {[*_HF_TEXT_MODEL_TYPES, 'mistral3', 'llava']} Hugging Face "
            "folders can be imported. Use a Mistral-format folder (params.json) for other models."
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act is {config['hidden_act']!r}; Mistral models use 'silu'.")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"], dict) else None
        raise ValueError(
            f"{source}: 'quantization_config' (quant_method {method!r}): quantized Hugging Face folders cannot be "
            "read. Use the release's native folder (params.json + consolidated*.safetensors; FP8 loads there) "
            "or its unquantized weights."
        )
    for key, default in _HF_DEFAULT_ONLY.items():
        if config.get(key, default) not in (default, None):
            raise ValueError(
                f"{source}: '{key}' is {config[key]!r}; Mistral models have {default!r} and this library implements "
                "only that, so the network would differ."
            )
    required = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "rms_norm_eps", "vocab_size")
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}.")
    # transformers 5 nests RoPE settings under rope_parameters; 4.x kept rope_theta at the top.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params: dict[str, Any] = {
        "dim": config.get("hidden_size"),
        "n_layers": config.get("num_hidden_layers"),
        # HF's own rule when a config has no head_dim; every Mistral release states it explicitly.
        "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "hidden_dim": config.get("intermediate_size"),
        "n_heads": config.get("num_attention_heads"),
        "n_kv_heads": config.get("num_key_value_heads") or config.get("num_attention_heads"),
        "norm_eps": config.get("rms_norm_eps"),
        "vocab_size": config.get("vocab_size"),
        "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
        "sliding_window": _hf_sliding_window(config, model_type, source),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        **_rope_from_hf({k: v for k, v in rope.items() if not (mla and k == "partial_rotary_factor")},
                        model_type, source),
    }
    if model_type == "mixtral":
        params["moe"] = {
            "num_experts": config.get("num_local_experts"),
            "num_experts_per_tok": config.get("num_experts_per_tok"),
        }
    if mla is not None and (config.get("first_k_dense_replace") or 0) < config["num_hidden_layers"]:
        params["moe"] = _mistral4_moe(config, source)
    args = args_from_params(params, source=source)
    return replace(args, mla=mla) if mla is not None else args


def _mistral4_moe(config: dict[str, Any], source: str) -> dict[str, Any]:
    """params.json's ``moe`` block for a ``Mistral4ForCausalLM`` config.json (DeepSeek-V3's key names,
    as vLLM's Mistral config adapter maps them)."""
    if config.get("norm_topk_prob", True) is not True:
        raise ValueError(f"{source}: 'norm_topk_prob' false is not implemented; Mistral Small 4 renormalises "
                         "the chosen experts' weights (true).")
    names = {"n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
             "moe_intermediate_size": "expert_hidden_dim", "n_shared_experts": "num_shared_experts",
             "first_k_dense_replace": "first_k_dense_replace", "n_group": "num_expert_groups",
             "topk_group": "num_expert_groups_per_tok", "routed_scaling_factor": "routed_scale"}
    # transformers' Mistral4Config defaults for keys a config.json may leave out.
    defaults = {"n_routed_experts": 128, "num_experts_per_tok": 4, "moe_intermediate_size": 2048,
                "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
                "routed_scaling_factor": 1.0}
    return {ours: config[hf] if config.get(hf) is not None else defaults[hf] for hf, ours in names.items()}


def _mistral4_mla(config: dict[str, Any], source: str) -> MlaArgs:
    """Latent attention of a ``Mistral4ForCausalLM`` config.json; what transformers computes
    differently from ``model.mla`` is refused by name."""
    n_heads = config.get("num_attention_heads")
    if config.get("rope_interleave", True) is not True:
        raise ValueError(f"{source}: 'rope_interleave' false (rotating head halves) is not implemented for "
                         "model_type 'mistral4'; Mistral Small 4 has true.")
    if config.get("num_key_value_heads") not in (None, n_heads):
        raise ValueError(f"{source}: 'num_key_value_heads' {config['num_key_value_heads']!r} differs from "
                         f"'num_attention_heads' {n_heads!r}; latent attention expands keys to every head.")
    values = {}
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        values[key] = _positive_int(config.get(key), key, source)
    q_lora_rank = config.get("q_lora_rank")
    values["q_lora_rank"] = None if q_lora_rank is None else _positive_int(q_lora_rank, "q_lora_rank", source)
    qk_dim = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
    if config.get("head_dim") not in (None, qk_dim):
        raise ValueError(f"{source}: 'head_dim' {config['head_dim']!r} is not qk_nope_head_dim + qk_rope_head_dim ({qk_dim}).")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) != "yarn":
        # transformers' default rope for Mistral4 rotates head_dim dimensions, which does not fit its rope part.
        raise ValueError(f"{source}: model_type 'mistral4' needs rope_parameters 'rope_type: yarn' (its release config).")
    partial = rope.get("partial_rotary_factor", values["qk_rope_head_dim"] / qk_dim)
    if int(qk_dim * partial) != values["qk_rope_head_dim"]:
        raise ValueError(f"{source}: rope_parameters 'partial_rotary_factor' {partial!r} does not rotate exactly "
                         f"qk_rope_head_dim ({values['qk_rope_head_dim']}) of {qk_dim} dimensions.")
    factor, mscale_all_dim = rope.get("factor"), rope.get("mscale_all_dim")
    scale = _mscale(float(factor), float(mscale_all_dim)) ** 2 if factor and mscale_all_dim else 1.0
    return MlaArgs(**values, softmax_scale_factor=scale)


# config.json keys that change the network or its training arithmetic when not at the Mistral value.
_HF_DEFAULT_ONLY = {"attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "router_jitter_noise": 0.0}
_HF_ROPE_KEYS = ("rope_type", "type", "rope_theta", "max_position_embeddings")
_HF_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor")


def _rope_from_hf(rope: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """params.json's ``yarn`` and ``llama_4_scaling`` for a config.json's ``rope_parameters``, with
    transformers' own defaults and arithmetic (``_compute_yarn_parameters``); an unknown key is refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(
            f"{source}: RoPE scaling {rope_type!r} is not supported; only the default rotary embedding and "
            "'yarn' are implemented."
        )
    allowed = _HF_ROPE_KEYS + (_HF_YARN_KEYS if rope_type == "yarn" else ())
    llama_4 = model_type in ("ministral3", "mistral4")  # both scale queries by position, always
    allowed += ("llama_4_scaling_beta", "original_max_position_embeddings") if llama_4 else ()
    unknown = sorted(set(rope) - set(allowed))
    if unknown:
        raise ValueError(
            f"{source}: rope_parameters has {unknown}, which model_type {model_type!r} with rope_type "
            f"{rope_type!r} does not implement here."
        )
    if rope.get("truncate", True) is not True or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: rope_parameters 'truncate: false' and 'partial_rotary_factor' are not supported.")
    out: dict[str, Any] = {}
    if rope_type == "yarn":
        if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
            raise ValueError(f"{source}: yarn rope_parameters need 'factor' and 'original_max_position_embeddings'.")
        factor = _positive_float(rope["factor"], "rope_parameters.factor", source)
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
            else:
                attention_factor = _mscale(factor)
        out["yarn"] = {
            "factor": factor,
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope.get("beta_fast") or 32.0,  # transformers' defaults, for 0 or null too
            "alpha": rope.get("beta_slow") or 1.0,
            **_yarn_magnitude(factor, float(attention_factor)),
        }
    if llama_4:
        # Ministral3Attention (and Mistral4Attention) scales queries by position with the rope's original context.
        if rope.get("llama_4_scaling_beta") is None or rope.get("original_max_position_embeddings") is None:
            raise ValueError(
                f"{source}: model_type {model_type!r} needs rope_parameters 'llama_4_scaling_beta' and "
                "'original_max_position_embeddings' (transformers' attention reads both)."
            )
        out["llama_4_scaling"] = {"beta": rope["llama_4_scaling_beta"],
                                  "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    return out


_HF_LAYER_TYPES = ("full_attention", "sliding_attention")


def _hf_sliding_window(config: dict[str, Any], model_type: str, source: str) -> Any:
    """params.json's ``sliding_window`` for a config.json: Ministral's ``layer_types`` (one per layer)
    with its single ``sliding_window`` become the shortest repeating list (an int or null when every
    layer agrees), so a native pattern exported and read back is the same ``ModelArgs``."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    n_layers = config["num_hidden_layers"]
    default = ["full_attention" if window is None else "sliding_attention"] * n_layers
    if layer_types is None:
        return window
    if model_type != "ministral":
        # MistralForCausalLM/MixtralForCausalLM ignore layer_types: accept only the uniform list they imply.
        if list(layer_types) != default:
            raise ValueError(
                f"{source}: 'layer_types' {layer_types!r} differs per layer, but model_type {model_type!r} "
                "applies one sliding_window to every layer in transformers; use model_type 'ministral'."
            )
        return window
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ValueError(f"{source}: 'layer_types' must list one entry per layer ({n_layers}), got {layer_types!r}.")
    unknown = sorted({t for t in layer_types if t not in _HF_LAYER_TYPES}, key=str)
    if unknown:
        raise ValueError(
            f"{source}: 'layer_types' has {unknown}; only {list(_HF_LAYER_TYPES)} are implemented."
        )
    if window is None and "sliding_attention" in layer_types:
        raise ValueError(f"{source}: 'layer_types' has 'sliding_attention' layers but 'sliding_window' is null.")
    windows = [window if t == "sliding_attention" else None for t in layer_types]
    period = next(p for p in range(1, n_layers + 1) if n_layers % p == 0 and windows == windows[:p] * (n_layers // p))
    return windows[0] if period == 1 else windows[:period]


def hf_config_from_args(args: ModelArgs, dtype: str = "bfloat16") -> dict[str, Any]:
    """A ``config.json`` for transformers describing the same network: ``ministral`` (per-layer
    ``layer_types``) when layers attend differently, else ``mistral``/``mixtral``; wrapped in a
    ``mistral3`` (or, for Pixtral 12B's layout, ``llava``) config when the model carries a vision encoder."""
    text = _mistral4_config(args, dtype) if args.mla is not None else _text_hf_config(args, dtype)
    vision = args.extra.get("vision_encoder")
    if not vision:
        return text
    from model.hf_vision_config import multimodal_config

    return multimodal_config(text, vision, dtype)


def _text_hf_config(args: ModelArgs, dtype: str) -> dict[str, Any]:
    windows = args.layer_windows
    sized = {w for w in windows if w is not None}
    if len(sized) > 1:
        raise ValueError(
            f"sliding_window {args.sliding_window!r} uses several window sizes; a transformers config "
            "has one sliding_window for all its sliding layers."
        )
    window = sized.pop() if sized else None
    interleaved = len(set(windows)) > 1
    if interleaved and args.moe is not None:
        raise ValueError("a mixture-of-experts model with per-layer windows has no transformers config class.")
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
        "sliding_window": window,
        "max_position_embeddings": max(32768, window or 0),
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if args.yarn is not None or args.llama_4_scaling is not None:
        return _ministral3_config(args, common, interleaved)
    if interleaved:
        layer_types = ["full_attention" if w is None else "sliding_attention" for w in windows]
        return {"architectures": ["MinistralForCausalLM"], "model_type": "ministral", **common,
                "layer_types": layer_types}
    if args.moe is None:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": args.moe.num_experts,
        "num_experts_per_tok": args.moe.num_experts_per_tok,
        **common,
    }


def _ministral3_config(args: ModelArgs, common: dict[str, Any], interleaved: bool) -> dict[str, Any]:
    """Ministral 3's transformers config: YaRN and the llama-4 query scaling share ``rope_parameters``
    (Ministral3Attention divides positions by the rope's original context)."""
    y = args.yarn
    if y is None or interleaved or args.moe is not None:
        raise ValueError(
            "only YaRN with llama-4 query scaling, one attention kind and a dense feed-forward has a transformers "
            "config class (Ministral3ForCausalLM)."
        )
    rope = _yarn_rope_parameters(args, "Ministral3")
    if y.attention_factor == 1.0:
        rope.update(mscale=1.0, mscale_all_dim=1.0)  # the releases' spelling (ratio 1)
    elif y.attention_factor != _mscale(y.factor):
        rope["attention_factor"] = y.attention_factor
    common = {k: v for k, v in common.items() if k != "rope_theta"}
    # The extended context, as the releases state it (transformers warns when it is not factor x original).
    common["max_position_embeddings"] = int(y.factor * y.original_max_position_embeddings)
    return {"architectures": ["Ministral3ForCausalLM"], "model_type": "ministral3", **common,
            "rope_parameters": rope}


def _yarn_rope_parameters(args: ModelArgs, family: str) -> dict[str, Any]:
    """transformers' YaRN ``rope_parameters`` with llama-4 query scaling (``family``: Ministral3, Mistral4),
    which reads one original context for both."""
    y, l4 = args.yarn, args.llama_4_scaling
    assert y is not None
    if l4 is not None and l4.original_max_position_embeddings != y.original_max_position_embeddings:
        raise ValueError(
            f"llama_4_scaling.original_max_position_embeddings ({l4.original_max_position_embeddings}) differs "
            f"from yarn's ({y.original_max_position_embeddings}); transformers' {family} uses one value for both."
        )
    return {
        "rope_type": "yarn",
        "rope_theta": args.rope_theta,
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        # No llama-4 scaling is beta 0: every factor 1 + 0 * log(...) is exactly 1.
        "llama_4_scaling_beta": l4.beta if l4 is not None else 0.0,
    }


def _mistral4_config(args: ModelArgs, dtype: str) -> dict[str, Any]:
    """``Mistral4ForCausalLM``'s config.json (the inverse of ``_mistral4_mla``/``_mistral4_moe``): YaRN on
    the rope part, its ``mscale``/``mscale_all_dim`` chosen so transformers derives both our rotation
    magnitude (mscale / mscale_all_dim) and our softmax factor (mscale_all_dim's, squared), llama-4
    query scaling (beta 0 when the model has none: Mistral4Attention always applies it)."""
    mla, y = args.mla, args.yarn
    assert mla is not None
    if y is None:
        raise ValueError("a latent-attention (Mistral 4) model without YaRN has no transformers config: "
                         "Mistral4ForCausalLM's default rope does not fit its rope part; add yarn to params.json.")
    if args.sliding_window is not None:
        raise ValueError(f"sliding_window {args.sliding_window!r}: Mistral4ForCausalLM attends to the full context.")
    qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    rope = {
        **_yarn_rope_parameters(args, "Mistral4"),
        "partial_rotary_factor": mla.qk_rope_head_dim / qk_dim,
        **_mistral4_mscales(y.factor, y.attention_factor, mla.softmax_scale_factor),
    }
    moe = args.moe
    experts: dict[str, Any] = {"first_k_dense_replace": args.n_layers}  # all dense
    if moe is not None:
        assert moe.fine_grained, "latent attention comes with Mistral Small 4's fine-grained MoE"
        experts = {
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": args.expert_hidden_dim, "n_shared_experts": moe.num_shared_experts,
            "first_k_dense_replace": moe.first_k_dense_replace, "n_group": moe.num_expert_groups,
            "topk_group": moe.num_expert_groups_per_tok, "routed_scaling_factor": moe.routed_scale,
            "norm_topk_prob": True,
        }
    return {
        "architectures": ["Mistral4ForCausalLM"],
        "model_type": "mistral4",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,  # latent attention expands keys and values to every head
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "head_dim": qk_dim,
        "rope_interleave": True,  # adjacent pairs rotate, as in model.mla
        **experts,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": int(y.factor * y.original_max_position_embeddings),
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": args.tied_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def _mistral4_mscales(factor: float, attention_factor: float, softmax_scale_factor: float) -> dict[str, Any]:
    """rope_parameters' ``mscale``/``mscale_all_dim`` (plus ``attention_factor`` where they cannot say it)
    from which transformers derives ``attention_factor`` (the rotations' magnitude, mscale(m) / mscale(m_all))
    and Mistral4Attention's softmax factor mscale(m_all)**2 (``_mistral4_mla`` reads them back)."""

    def solve(target: float) -> float:  # m with _mscale(factor, m) == target; 1.0 (the release's) when it is
        return 1.0 if _mscale(factor, 1.0) == target else (target - 1.0) / (0.1 * math.log(factor))

    if factor <= 1:
        if attention_factor != 1.0 or softmax_scale_factor != 1.0:
            raise ValueError(f"yarn factor {factor} with attention_factor {attention_factor} or a softmax factor "
                             f"{softmax_scale_factor} other than 1 has no Mistral4 config (YaRN's mscale is 1).")
        return {"mscale": 1.0, "mscale_all_dim": 1.0}
    if softmax_scale_factor == 1.0:  # no mscale_all_dim: transformers takes attention_factor as given
        return {"attention_factor": attention_factor}
    all_dim = solve(math.sqrt(softmax_scale_factor))
    mscale = solve(attention_factor * _mscale(factor, all_dim))
    out = {"mscale": mscale, "mscale_all_dim": all_dim}
    if mscale == 0.0:  # transformers reads 0 as unset and would use _mscale(factor)
        out["attention_factor"] = attention_factor
    return out
