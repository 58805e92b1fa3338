"""Hugging Face multimodal configs <-> the params.json ``vision_encoder`` block: transformers'
``Mistral3ForConditionalGeneration`` (Mistral Small 3.x, Ministral 3: a patch merger and the pre-projector
norm) and ``LlavaForConditionalGeneration`` with a Pixtral tower (Pixtral 12B: neither). The text model
inside is read and written by ``model.hf_config``; the vision weights' names by ``model.multimodal``.
"""

from __future__ import annotations

from typing import Any

from model.args import ModelArgs
from model.configs import _positive_int

# params.json vision_encoder keys a Mistral3 config.json expresses; others are carried in params.json only.
_VISION_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "max_image_size", "patch_size")


def args_from_multimodal(config: dict[str, Any], source: str) -> ModelArgs:
    """``Mistral3ForConditionalGeneration`` (Mistral Small 3.x, Ministral 3) or ``LlavaForConditionalGeneration``
    with a Pixtral vision tower (Pixtral 12B): the text model from ``text_config``; the vision side as the
    params.json ``vision_encoder`` block a native release of the same model has."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} needs a 'text_config' object, got {text!r}.")
    text = {"model_type": "mistral", **text}  # Mistral3Config's default text model
    if config.get("quantization_config"):
        text["quantization_config"] = config["quantization_config"]  # refused by name below
    top_tie = config.get("tie_word_embeddings")
    if top_tie is not None and bool(top_tie) != bool(text.get("tie_word_embeddings", False)):
        raise ValueError(
            f"{source}: 'tie_word_embeddings' is {top_tie!r} but text_config's is "
            f"{text.get('tie_word_embeddings', False)!r}; make them agree."
        )
    from model.hf_config import args_from_hf_config

    args = args_from_hf_config(text, source=f"{source} (text_config)")
    args.extra["vision_encoder"] = _vision_encoder_from_hf(config, source)
    return args


def _vision_encoder_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    v = config.get("vision_config")
    if not isinstance(v, dict) or v.get("model_type", "pixtral") != "pixtral":
        raise ValueError(f"{source}: 'vision_config' must be a Pixtral vision config, got {v!r}.")
    # Values the native block cannot express (it implies each of these) are refused by key name.
    for key, value, implied in (
        ("vision_config.hidden_act", v.get("hidden_act", "gelu"), "silu"),
        ("projector_hidden_act", config.get("projector_hidden_act", "gelu"), "gelu"),
        ("vision_feature_layer", config.get("vision_feature_layer", -1), -1),
        ("vision_config.rope_parameters.rope_type", (v.get("rope_parameters") or {}).get("rope_type", "axial"),
         "axial"),
    ):
        if value != implied:
            raise ValueError(f"{source}: {key} is {value!r}; Mistral's Pixtral encoder uses {implied!r} only.")
    llava = config.get("model_type") == "llava"  # Pixtral 12B: no patch merger, no pre-projector norm
    if llava and config.get("vision_feature_select_strategy", "default") != "full":
        raise ValueError(
            f"{source}: vision_feature_select_strategy is {config.get('vision_feature_select_strategy')!r}; "
            "Pixtral uses every patch ('full')."
        )
    hf = {"max_image_size": v.get("image_size", 1024), "patch_size": v.get("patch_size", 16), "num_channels": 3,
          **{k: v.get(k) for k in _VISION_INTS if k in v}}
    for key in _VISION_INTS:
        _positive_int(hf.get(key), f"vision_config.{key}", source)
    if v.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"{source}: vision_config.head_dim {v['head_dim']!r} is not hidden_size // num_attention_heads.")
    block = {
        **{k: hf[k] for k in _VISION_INTS},
        "rope_theta": (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0)),
        "image_token_id": config.get("image_token_index", 10),
        # LlavaConfig's projector has a bias by default, Mistral3Config's none.
        "adapter_bias": bool(config.get("multimodal_projector_bias", llava)),
    }
    if llava:
        return block
    return {**block, "spatial_merge_size": config.get("spatial_merge_size", 2), "mm_projector_id": "patch_merge",
            "add_pre_mm_projector_layer_norm": True}


def multimodal_config(text: dict[str, Any], vision: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``Mistral3ForConditionalGeneration``'s config for a text config and a params.json vision block with a
    patch merger and the pre-projector norm (Mistral Small 3.x, Ministral 3); ``LlavaForConditionalGeneration``'s
    for one with neither (Pixtral 12B)."""
    missing = [k for k in _VISION_INTS if not isinstance(vision.get(k), int)]
    merger = vision.get("mm_projector_id") == "patch_merge"
    if missing or merger != bool(vision.get("add_pre_mm_projector_layer_norm")):
        raise ValueError(
            f"vision_encoder {'lacks ' + str(missing) if missing else 'has only one of a patch merger and a pre-projector norm'}: "
            "transformers has Mistral3ForConditionalGeneration (both: mm_projector_id 'patch_merge' and "
            "add_pre_mm_projector_layer_norm) and LlavaForConditionalGeneration (neither: Pixtral 12B)."
        )
    text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
    return {
        "architectures": ["Mistral3ForConditionalGeneration" if merger else "LlavaForConditionalGeneration"],
        "model_type": "mistral3" if merger else "llava",
        "text_config": text,
        "vision_config": _pixtral_vision_config(vision),
        "image_token_index": vision.get("image_token_id", 10),
        "multimodal_projector_bias": bool(vision.get("adapter_bias", False)),
        "projector_hidden_act": "gelu",
        **({"spatial_merge_size": vision.get("spatial_merge_size", 2)} if merger else {}),
        "vision_feature_layer": -1,
        # Llava's default selection drops the first patch (a CLS token Pixtral does not have).
        **({} if merger else {"vision_feature_select_strategy": "full"}),
        "tie_word_embeddings": text["tie_word_embeddings"],
        "torch_dtype": dtype,
    }


def _pixtral_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_type": "pixtral",
        **{k: vision[k] for k in _VISION_INTS if k != "max_image_size"},
        "image_size": vision["max_image_size"],
        "head_dim": vision["hidden_size"] // vision["num_attention_heads"],
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": vision.get("rope_theta", 10000.0)},
    }
