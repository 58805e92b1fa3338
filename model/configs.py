"""Mistral's ``params.json`` <-> ``ModelArgs``, and the validators ``model.hf_config`` (Hugging
Face's ``config.json``) shares: a config.json is translated into params.json's terms and read here.

Every reader refuses by key name what it does not understand, so a newer checkpoint fails with
a message naming the key rather than training a different network.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from model.args import Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from model.fp8 import check_quantization

_REQUIRED_INT = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


def load_model_args(folder: str | Path) -> ModelArgs:
    """From ``params.json``, or from a Hugging Face folder's ``config.json`` when there is none."""
    path = Path(folder) / "params.json"
    hf_config = Path(folder) / "config.json"
    if not path.is_file() and hf_config.is_file():
        from model.hf_config import args_from_hf_config  # it builds on this module's readers

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
        values[key] = _positive_int(params.pop(key), key, source)
    if "norm_eps" not in params:
        raise ValueError(f"{source}: missing required key 'norm_eps' (a float such as 1e-5).")
    values["norm_eps"] = _positive_float(params.pop("norm_eps"), "norm_eps", source)
    if params.get("rope_theta") is not None:
        values["rope_theta"] = _positive_float(params.pop("rope_theta"), "rope_theta", source)
    else:
        params.pop("rope_theta", None)
    window = params.pop("sliding_window", None)
    if window is not None:
        values["sliding_window"] = _sliding_window(window, values["n_layers"], source)
    moe = params.pop("moe", None)
    if moe is not None:
        values["moe"] = _moe(moe, values["n_layers"], source)
    mla = _mla(params, values, source)
    for key, read in (("yarn", _yarn), ("llama_4_scaling", _llama_4_scaling)):
        value = params.pop(key, None)
        if value is not None:
            values[key] = read(value, source)
    if mla is not None:
        # Latent attention's YaRN is DeepSeek's (vLLM's Mistral Large 3 / Small 4): the rotations keep
        # magnitude 1 and apply_scale's 0.1 ln(factor) + 1, squared, multiplies the whole softmax scale.
        yarn = values.get("yarn")
        if yarn is not None:
            mla = replace(mla, softmax_scale_factor=yarn.attention_factor**2)
            values["yarn"] = replace(yarn, attention_factor=1.0)
        values["mla"] = mla
    tied = params.pop("tied_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"{source}: 'tied_embeddings' must be true or false, got {tied!r}.")
    values["tied_embeddings"] = tied
    # FP8 weights are dequantized while loading (model.fp8): the block describes the files, not the
    # network, so it is not kept, and a merged (dequantized) checkpoint's params.json does not claim FP8.
    # A null block round-trips like other irrelevant keys.
    check_quantization(params.get("quantization"), source)
    if params.get("quantization"):
        del params["quantization"]
    if params.get("vision_encoder") not in (None, {}):
        _check_vision_encoder(params["vision_encoder"], source)  # carried in extra (model.multimodal)
    _refuse_unimplemented(params, source)
    params.pop("lora", None)  # a checkpoint's own LoRA settings are not model shape
    return ModelArgs(**values, extra=params)


def params_from_args(args: ModelArgs) -> dict[str, Any]:
    """params.json contents: the original unknown keys plus every field we use."""
    extra = dict(args.extra)
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
    if isinstance(args.sliding_window, tuple):
        out["sliding_window"] = list(args.sliding_window)  # the pattern as written, null = full attention
    elif args.sliding_window is not None:
        out["sliding_window"] = args.sliding_window
    if args.moe is not None:
        m = args.moe
        out["moe"] = {"num_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok}
        if m.fine_grained:  # Mistral Small 4's block, every key as Mistral writes it
            out["moe"].update(
                expert_hidden_dim=m.expert_hidden_dim, num_shared_experts=m.num_shared_experts,
                first_k_dense_replace=m.first_k_dense_replace, num_expert_groups=m.num_expert_groups,
                num_expert_groups_per_tok=m.num_expert_groups_per_tok, routed_scale=m.routed_scale,
                route_every_n=1,
            )
    if args.mla is not None:
        out.update({key: getattr(args.mla, key) for key in _MLA_KEYS})
    if args.yarn is not None:
        y = args.yarn
        out["yarn"] = {
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta": y.beta_fast,
            "alpha": y.beta_slow,
            **(_mla_yarn_magnitude(args) if args.mla is not None else _yarn_magnitude(y.factor, y.attention_factor)),
        }
    elif args.mla is not None and args.mla.softmax_scale_factor != 1.0:
        raise ValueError(f"latent attention's softmax_scale_factor {args.mla.softmax_scale_factor!r} without YaRN "
                         "has no params.json spelling (it is YaRN's apply_scale).")
    if args.llama_4_scaling is not None:
        out["llama_4_scaling"] = {
            "original_max_position_embeddings": args.llama_4_scaling.original_max_position_embeddings,
            "beta": args.llama_4_scaling.beta,
        }
    if args.tied_embeddings:
        out["tied_embeddings"] = True
    out.update(extra)
    return out


# params.json ``moe`` keys beyond Mixtral's two: Mistral Small 4's fine-grained experts (vLLM's Mistral
# config adapter maps them to DeepSeek-V3's n_shared_experts, moe_intermediate_size, ...).
_FINE_GRAINED_MOE = ("expert_hidden_dim", "num_shared_experts", "first_k_dense_replace", "num_expert_groups",
                     "num_expert_groups_per_tok", "routed_scale")


def _moe(value: Any, n_layers: int, source: str) -> MoeArgs:
    """params.json's ``moe`` block: Mixtral's (num_experts, num_experts_per_tok) or Mistral Small 4's."""
    if not isinstance(value, dict):
        raise ValueError(f"{source}: 'moe' must be an object, got {value!r}.")
    moe = dict(value)
    unknown = sorted(set(moe) - {"num_experts", "num_experts_per_tok", "route_every_n", *_FINE_GRAINED_MOE})
    if unknown:
        raise ValueError(
            f"{source}: 'moe' has {unknown}, which this library does not implement (it implements "
            f"num_experts, num_experts_per_tok, {', '.join(_FINE_GRAINED_MOE)}); this model cannot be trained here."
        )
    if moe.pop("route_every_n", 1) != 1:
        raise ValueError(f"{source}: 'moe.route_every_n' is {value['route_every_n']!r}; only 1 (every layer "
                         "after first_k_dense_replace is MoE) is implemented.")
    values: dict[str, Any] = {}
    for key in ("num_experts", "num_experts_per_tok"):
        if key not in moe:
            raise ValueError(f"{source}: 'moe' is missing '{key}'.")
        values[key] = _positive_int(moe.pop(key), f"moe.{key}", source)
    if moe and "expert_hidden_dim" not in moe:
        raise ValueError(f"{source}: 'moe' has {sorted(moe)} but no 'expert_hidden_dim' (the routed experts' width).")
    for key in ("expert_hidden_dim", "num_expert_groups", "num_expert_groups_per_tok"):
        if key in moe:
            values[key] = _positive_int(moe.pop(key), f"moe.{key}", source)
    for key in ("num_shared_experts", "first_k_dense_replace"):
        if key in moe:
            count = moe.pop(key)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{source}: 'moe.{key}' must be an integer >= 0, got {count!r}.")
            values[key] = count
    if "routed_scale" in moe:
        values["routed_scale"] = _positive_float(moe.pop("routed_scale"), "moe.routed_scale", source)
    if values.get("first_k_dense_replace", 0) >= n_layers:
        raise ValueError(f"{source}: 'moe.first_k_dense_replace' ({values['first_k_dense_replace']}) leaves no "
                         f"MoE layer of {n_layers}; drop the 'moe' block for a dense model.")
    try:
        return MoeArgs(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# Multi-head latent attention's top-level params.json keys (Mistral Small 4, Mistral Large 3), as
# vLLM's Mistral config adapter passes them to DeepSeek-V3's config; q_lora_rank may be null.
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _mla(params: dict[str, Any], values: dict[str, Any], source: str) -> MlaArgs | None:
    """The latent attention the MLA keys describe (popped from ``params``), or None without them.
    vLLM ignores n_kv_heads for such a model and transformers' Mistral4 requires it equal to n_heads;
    head_dim is the query/key head (qk_nope_head_dim + qk_rope_head_dim)."""
    if all(params.get(key) is None for key in _MLA_KEYS):
        return None  # a dense model's null keys stay (round-trip) like other unused keys
    raw = {key: params.pop(key, None) for key in _MLA_KEYS}
    dims = {}
    for key in _MLA_KEYS[1:]:
        if raw[key] is None:
            raise ValueError(f"{source}: '{key}' is missing; latent attention needs all of {list(_MLA_KEYS[1:])} "
                             "(q_lora_rank may be null).")
        dims[key] = _positive_int(raw[key], key, source)
    q_lora_rank = None if raw["q_lora_rank"] is None else _positive_int(raw["q_lora_rank"], "q_lora_rank", source)
    if dims["qk_rope_head_dim"] % 2:
        raise ValueError(f"{source}: 'qk_rope_head_dim' must be even (rotations pair dimensions), "
                         f"got {dims['qk_rope_head_dim']}.")
    qk_dim = dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]
    if values["head_dim"] != qk_dim:
        raise ValueError(f"{source}: 'head_dim' {values['head_dim']} is not qk_nope_head_dim + qk_rope_head_dim "
                         f"({qk_dim}), the latent-attention query/key head.")
    if values["n_kv_heads"] != values["n_heads"]:
        raise ValueError(f"{source}: 'n_kv_heads' {values['n_kv_heads']} differs from 'n_heads' {values['n_heads']}; "
                         "latent attention expands keys and values to every head (set n_kv_heads to n_heads).")
    if "sliding_window" in values:
        raise ValueError(f"{source}: 'sliding_window' with latent attention is not implemented; "
                         "Mistral's latent-attention models attend to the full context.")
    if isinstance(params.get("yarn"), dict) and "attention_factor" in params["yarn"]:
        raise ValueError(f"{source}: 'yarn.attention_factor' is not read for latent attention; its YaRN "
                         "scale is 'apply_scale' (true: the softmax scale times (0.1 ln(factor) + 1)^2).")
    return MlaArgs(q_lora_rank=q_lora_rank, **dims)


def _mla_yarn_magnitude(args: ModelArgs) -> dict[str, Any]:
    """The yarn block's ``apply_scale`` for latent attention (the inverse of ``args_from_params``)."""
    assert args.mla is not None and args.yarn is not None
    scale, factor = args.mla.softmax_scale_factor, args.yarn.factor
    if args.yarn.attention_factor == 1.0 and scale in (1.0, _mscale(factor) ** 2):
        return {"apply_scale": scale != 1.0}
    raise ValueError(
        f"latent attention with rotation magnitude {args.yarn.attention_factor!r} and softmax_scale_factor "
        f"{scale!r} has no params.json spelling: apply_scale expresses magnitude 1 with a factor of 1 (false) "
        f"or (0.1 ln(factor) + 1)^2 = {_mscale(factor) ** 2!r} (true)."
    )


# params.json keys of architectures this code does not implement (a non-null value changes the network).
_UNIMPLEMENTED = {
    "multimodal": "a vision or audio encoder (only the Pixtral 'vision_encoder' block is supported)",
}


def _refuse_unimplemented(params: dict[str, Any], source: str) -> None:
    for key, what in _UNIMPLEMENTED.items():
        if params.get(key) not in (None, {}, [], False):
            raise ValueError(f"{source}: '{key}' describes {what}; this model cannot be trained here.")
    if params.get("model_type", "transformer") != "transformer":
        raise ValueError(f"{source}: model_type {params['model_type']!r} is not implemented; only 'transformer'.")
    if params.get("activation", "silu") != "silu":
        raise ValueError(f"{source}: activation {params['activation']!r} is not implemented; only 'silu'.")


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction (transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_magnitude(factor: float, attention_factor: float) -> dict[str, Any]:
    """params.json's spelling of the rotations' magnitude: ``apply_scale`` (false: 1, true: YaRN's
    0.1 ln(factor) + 1, vLLM's reading), else this library's own ``attention_factor`` (a transformers
    config's mscale/mscale_all_dim ratio that apply_scale cannot express)."""
    if attention_factor == 1.0:
        return {"apply_scale": False}
    if attention_factor == _mscale(factor):
        return {"apply_scale": True}
    return {"attention_factor": attention_factor}


def _object(value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...], source: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: '{key}' must be an object, got {value!r}.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: '{key}' has unknown key(s) {unknown}; only {list(allowed)} are implemented.")
    missing = [k for k in required if value.get(k) is None]
    if missing:
        raise ValueError(f"{source}: '{key}' is missing {missing}.")
    return value


def _positive_int(value: Any, key: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}.")
    return value


def _yarn(value: Any, source: str) -> YarnArgs:
    """params.json ``yarn``: beta and alpha are YaRN's beta_fast and beta_slow; ``apply_scale``
    (absent: true, as vLLM reads it) multiplies the rotations by 0.1 ln(factor) + 1."""
    y = _object(value, "yarn", ("factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale",
                                "attention_factor"), ("factor", "original_max_position_embeddings"), source)
    factor = _positive_float(y["factor"], "yarn.factor", source)
    if "attention_factor" in y:
        if "apply_scale" in y:
            raise ValueError(f"{source}: 'yarn' has both 'apply_scale' and 'attention_factor'; keep one.")
        attention_factor = _positive_float(y["attention_factor"], "yarn.attention_factor", source)
    else:
        apply_scale = y.get("apply_scale", True)
        if not isinstance(apply_scale, bool):
            raise ValueError(f"{source}: 'yarn.apply_scale' must be true or false, got {apply_scale!r}.")
        attention_factor = _mscale(factor) if apply_scale else 1.0
    return YarnArgs(
        factor=factor,
        original_max_position_embeddings=_positive_int(
            y["original_max_position_embeddings"], "yarn.original_max_position_embeddings", source),
        beta_fast=_positive_float(y.get("beta", 32.0), "yarn.beta", source),
        beta_slow=_positive_float(y.get("alpha", 1.0), "yarn.alpha", source),
        attention_factor=attention_factor,
    )


def _llama_4_scaling(value: Any, source: str) -> Llama4Scaling:
    keys = ("original_max_position_embeddings", "beta")
    v = _object(value, "llama_4_scaling", keys, keys, source)
    beta = v["beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"{source}: 'llama_4_scaling.beta' must be a number >= 0, got {beta!r}.")
    original = _positive_int(v["original_max_position_embeddings"],
                             "llama_4_scaling.original_max_position_embeddings", source)
    return Llama4Scaling(beta=float(beta), original_max_position_embeddings=original)


def _sliding_window(window: Any, n_layers: int, source: str) -> int | tuple[int | None, ...]:
    """An int (every layer), or a list repeated cyclically over the layers with null meaning full
    attention, as mistral-inference's cache sizes read it (the list's length divides n_layers)."""

    def valid(w: Any) -> bool:
        return isinstance(w, int) and not isinstance(w, bool) and w > 0

    if isinstance(window, list):
        if not window or not all(w is None or valid(w) for w in window):
            raise ValueError(
                f"{source}: 'sliding_window' as a list must hold positive integers or nulls (one per layer "
                f"of a repeating pattern), got {window!r}."
            )
        if n_layers % len(window):
            raise ValueError(
                f"{source}: 'sliding_window' lists {len(window)} windows, which does not divide "
                f"n_layers ({n_layers}); the list is a pattern repeated over the layers."
            )
        return tuple(window)
    if not valid(window):
        raise ValueError(
            f"{source}: 'sliding_window' must be a positive integer, null or a list of them, got {window!r}."
        )
    return window


def _positive_float(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{source}: '{key}' must be a positive number, got {value!r}.")
    return float(value)


def _check_vision_encoder(block: Any, source: str) -> None:
    """Its heads and width convert the q/k rows, and build the encoder when asked for (``model.vision``)."""
    if not isinstance(block, dict):
        raise ValueError(f"{source}: 'vision_encoder' must be an object, got {block!r}.")
    for key in ("hidden_size", "num_attention_heads"):
        _positive_int(block.get(key), f"vision_encoder.{key}", source)
