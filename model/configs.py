"""Model configuration files <-> ``ModelArgs``: Mistral's ``params.json`` and Hugging Face's
``config.json``, read and written in this one module.

Every reader refuses by key name what it does not understand, so a newer checkpoint fails with
a message naming the key rather than training a different network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.args import ModelArgs, MoeArgs

_REQUIRED_INT = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


def load_model_args(folder: str | Path) -> ModelArgs:
    """From ``params.json``, or from a Hugging Face folder's ``config.json`` when there is none."""
    path = Path(folder) / "params.json"
    hf_config = Path(folder) / "config.json"
    if not path.is_file() and hf_config.is_file():
        return args_from_hf_config(read_json_object(hf_config), source=str(hf_config))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: model_id_or_path must be a Mistral checkpoint folder with params.json "
            "or a Hugging Face Mistral/Mixtral folder with config.json."
        )
    return args_from_params(read_json_object(path), source=str(path))


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        params = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object.")
    return params


# --- Mistral params.json ---


def args_from_params(params: dict[str, Any], source: str = "params.json") -> ModelArgs:
    """Build from a params.json mapping; ``source`` names the file in error messages."""
    params = dict(params)
    values: dict[str, Any] = {}
    for key in _REQUIRED_INT:
        if key not in params:
            raise ValueError(f"{source}: missing required key '{key}' (an integer).")
        value = params.pop(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}.")
        values[key] = value
    if "norm_eps" not in params:
        raise ValueError(f"{source}: missing required key 'norm_eps' (a float such as 1e-5).")
    values["norm_eps"] = _positive_float(params.pop("norm_eps"), "norm_eps", source)
    if params.get("rope_theta") is not None:
        values["rope_theta"] = _positive_float(params.pop("rope_theta"), "rope_theta", source)
    else:
        params.pop("rope_theta", None)
    window = params.pop("sliding_window", None)
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ValueError(f"{source}: 'sliding_window' must be a positive integer or null, got {window!r}.")
        values["sliding_window"] = window
    moe = params.pop("moe", None)
    if moe is not None:
        if not isinstance(moe, dict):
            raise ValueError(f"{source}: 'moe' must be an object, got {moe!r}.")
        moe = dict(moe)
        moe_values = {}
        for key in ("num_experts", "num_experts_per_tok"):
            if key not in moe:
                raise ValueError(f"{source}: 'moe' is missing '{key}'.")
            moe_values[key] = moe.pop(key)
        values["moe"] = MoeArgs(**moe_values)
        if moe:  # keep unknown moe keys too
            params["_moe_extra"] = moe
    params.pop("lora", None)  # a checkpoint's own LoRA settings are not model shape
    return ModelArgs(**values, extra=params)


def params_from_args(args: ModelArgs) -> dict[str, Any]:
    """params.json contents: the original unknown keys plus every field we use."""
    extra = dict(args.extra)
    moe_extra = extra.pop("_moe_extra", {})
    out: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
    }
    if args.sliding_window is not None:
        out["sliding_window"] = args.sliding_window
    if args.moe is not None:
        out["moe"] = {
            "num_experts": args.moe.num_experts,
            "num_experts_per_tok": args.moe.num_experts_per_tok,
            **moe_extra,
        }
    out.update(extra)
    return out


def _positive_float(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{source}: '{key}' must be a positive number, got {value!r}.")
    return float(value)


# --- Hugging Face config.json ---


def args_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs for a transformers ``MistralForCausalLM``/``MixtralForCausalLM`` config.json."""
    model_type = config.get("model_type")
    if model_type not in ("mistral", "mixtral"):
        raise ValueError(
            f"{source}: model_type is {model_type!r}; only 'mistral' and 'mixtral' Hugging Face "
            "folders can be imported. Use a Mistral-format folder (params.json) for other models."
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act is {config['hidden_act']!r}; Mistral models use 'silu'.")
    required = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "rms_norm_eps", "vocab_size")
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}.")
    # transformers 5 nests RoPE settings under rope_parameters; 4.x kept rope_theta at the top.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"{source}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; "
            "only the default rotary embedding is implemented."
        )
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
        "sliding_window": config.get("sliding_window"),
    }
    if model_type == "mixtral":
        params["moe"] = {
            "num_experts": config.get("num_local_experts"),
            "num_experts_per_tok": config.get("num_experts_per_tok"),
        }
    return args_from_params(params, source=source)


def hf_config_from_args(args: ModelArgs, dtype: str = "bfloat16") -> dict[str, Any]:
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
