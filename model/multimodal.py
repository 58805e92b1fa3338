"""Multimodal checkpoints trained as text models (Mistral Small 3.x, Magistral, Devstral Small): the
Pixtral vision encoder and its adapter are carried, not built, unless asked for.

The language model loads and trains as any Mistral model. By default the vision weights stay out of
the model (``Transformer.from_folder(..., vision=True)`` builds and loads them: ``model.vision``):
they are streamed from the base folder into every merged checkpoint and export unchanged (a q/k row
permutation between the native and Hugging Face layouts is exact), except where an adapter trained on
a vision target (``model.args.VISION_TARGETS``) is folded in; the params.json ``vision_encoder`` block
travels in ``ModelArgs.extra``. Vision adapters keep the native names too
(``vision_encoder.transformer.layers.N.attention.wq.lora_A.weight``); a PEFT export renames them.

Native names (``consolidated.safetensors``), the ones used everywhere in this library:
``vision_encoder.{patch_conv,ln_pre}``, ``vision_encoder.transformer.layers.N.{attention.wq..wo,
attention_norm, ffn_norm, feed_forward.w1..w3}``, ``vision_language_adapter.{w_in,w_out}``,
``patch_merger.merging_layer``, ``pre_mm_projector_norm``. Hugging Face ``Mistral3ForConditionalGeneration``
names: ``vision_tower.*`` (``attention.q_proj``, ``feed_forward.gate_proj`` ...) and
``multi_modal_projector.{linear_1,linear_2,patch_merger.merging_layer,norm}``, with a ``model.`` prefix in
transformers' in-memory layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")

# native prefix -> Hugging Face prefix (the hub layout, without transformers' in-memory "model.")
_PREFIX_TO_HF = {
    "vision_encoder.": "vision_tower.",
    "vision_language_adapter.w_in.": "multi_modal_projector.linear_1.",
    "vision_language_adapter.w_out.": "multi_modal_projector.linear_2.",
    "patch_merger.": "multi_modal_projector.patch_merger.",
    "pre_mm_projector_norm.": "multi_modal_projector.norm.",
}
_PREFIX_FROM_HF = {v: k for k, v in _PREFIX_TO_HF.items()}
_LAYER_TO_HF = {
    "attention.wq": "attention.q_proj",
    "attention.wk": "attention.k_proj",
    "attention.wv": "attention.v_proj",
    "attention.wo": "attention.o_proj",
    "feed_forward.w1": "feed_forward.gate_proj",
    "feed_forward.w2": "feed_forward.down_proj",
    "feed_forward.w3": "feed_forward.up_proj",
}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
# A vision layer's weight or adapter: (layer prefix, module, leaf).
_LAYER = re.compile(r"(transformer\.layers\.\d+\.)(.+?)(\.weight|\.lora_A\.weight|\.lora_B\.weight)$")
# What the q/k permutation applies to: the weight and the adapter's B, whose output rows feed q or k
# (lora_A acts on the input side and is left as it is; model.hf).
_PERMUTED_LEAVES = (".weight", ".lora_B.weight")


def is_vision_key(key: str) -> bool:
    """A native checkpoint key of the vision encoder or its adapter (carried unless built, never trained)."""
    return key.startswith(VISION_PREFIXES)


def is_hf_vision_key(key: str) -> bool:
    return key.removeprefix("model.").startswith(tuple(_PREFIX_FROM_HF))


def text_key_from_mistral3(key: str) -> str:
    """A ``Mistral3ForConditionalGeneration`` key in the text-only ``MistralForCausalLM`` naming: the hub
    layout (``language_model.model.*``, ``language_model.lm_head``) and transformers 5's
    (``model.language_model.*``, ``lm_head``) alike; vision keys are left as they are."""
    for prefix, text in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                         ("model.language_model.", "model.")):
        if key.startswith(prefix):
            return text + key[len(prefix):]
    return key


def text_key_to_mistral3(hf_key: str, layout: str = "hub") -> str:
    """A ``MistralForCausalLM`` key inside ``Mistral3ForConditionalGeneration``: the hub layout that
    ``save_pretrained`` writes (``language_model.model.*``, ``language_model.lm_head.weight``), or the
    module names of the loaded model (``model.language_model.*``), which PEFT's keys follow."""
    if layout == "module":
        return "model.language_model." + hf_key[len("model."):] if hf_key.startswith("model.") else hf_key
    return "language_model." + hf_key


def vision_block(extra: dict[str, Any]) -> dict[str, Any] | None:
    """The params.json ``vision_encoder`` block a model carries, or None for a text-only model."""
    return extra.get("vision_encoder") or None


def merge_size(vision: dict[str, Any]) -> int:
    """Patches merged along each side into one ``[IMG]`` token: ``spatial_merge_size`` when the block has
    a patch merger (``mm_projector_id: patch_merge``, Mistral Small 3.1+), else 1 (Pixtral 12B)."""
    return vision.get("spatial_merge_size", 1) if vision.get("mm_projector_id") == "patch_merge" else 1


def token_side(vision: dict[str, Any]) -> int:
    """Pixels along each side of one ``[IMG]`` token (patch size x merge): a picture's sides are multiples."""
    return vision["patch_size"] * merge_size(vision)


def _qk_heads(vision: dict[str, Any]) -> tuple[int, int]:
    """(heads, head_dim) of the vision attention: Pixtral's head_dim is hidden_size // heads."""
    heads = vision["num_attention_heads"]
    return heads, vision.get("head_dim") or vision["hidden_size"] // heads


def vision_to_hf(key: str, w: torch.Tensor, vision: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """Native vision tensor -> (hub-layout HF key, tensor); q/k rows permuted for HF's rotate-half RoPE.
    Adapter tensors (``...attention.wq.lora_B.weight``) convert too, q/k ``lora_B`` rows permuted alike."""
    from model.hf import permute_to_hf

    for native, hf in _PREFIX_TO_HF.items():
        if key.startswith(native):
            rest = key[len(native):]
            m = _LAYER.match(rest) if native == "vision_encoder." else None
            if m:
                module = m.group(2)
                if module in ("attention.wq", "attention.wk") and m.group(3) in _PERMUTED_LEAVES:
                    w = permute_to_hf(w, *_qk_heads(vision))
                rest = m.group(1) + _LAYER_TO_HF.get(module, module) + m.group(3)
            return hf + rest, w
    raise KeyError(f"'{key}' is not a vision weight")


def vision_from_hf(key: str, w: torch.Tensor, vision: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """Inverse of ``vision_to_hf``; accepts the hub layout and transformers' ``model.``-prefixed one."""
    from model.hf import permute_from_hf

    bare = key.removeprefix("model.")
    for hf, native in _PREFIX_FROM_HF.items():
        if bare.startswith(hf):
            rest = bare[len(hf):]
            m = _LAYER.match(rest) if hf == "vision_tower." else None
            if m:
                module = _LAYER_FROM_HF.get(m.group(2), m.group(2))
                if module in ("attention.wq", "attention.wk") and m.group(3) in _PERMUTED_LEAVES:
                    w = permute_from_hf(w, *_qk_heads(vision))
                rest = m.group(1) + module + m.group(3)
            return native + rest, w
    raise KeyError(f"no native name for Hugging Face weight '{key}'")


def vision_target(key: str) -> str | None:
    """The ``lora.target_modules`` name (``model.args.VISION_TARGETS``) of a native vision adapter key:
    ``vision_encoder.transformer.layers.0.attention.wq.lora_A.weight`` -> ``vision_encoder.wq``."""
    if not is_vision_key(key):
        return None
    module = key.rsplit(".", 2)[0]  # without .lora_A.weight
    scope, _, rest = module.partition(".")
    return f"{scope}.{rest.rpartition('.')[2]}"


def vision_target_hf_modules(target: str) -> str:
    """A vision LoRA target (``model.args.VISION_TARGETS``: ``vision_encoder.wq``) -> a regex of the
    ``Mistral3ForConditionalGeneration`` module paths it adapts, hub layout (``vision_tower.transformer.
    layers.N.attention.q_proj``)."""
    scope, _, leaf = target.partition(".")
    if scope == "vision_encoder":
        module = f"{'feed_forward' if leaf in ('w1', 'w2', 'w3') else 'attention'}.{leaf}"
        return r"vision_tower\.transformer\.layers\.\d+\." + re.escape(_LAYER_TO_HF[module])
    key = f"{target}."  # vision_language_adapter.w_in. or patch_merger.merging_layer.
    native = next(p for p in _PREFIX_TO_HF if key.startswith(p))
    return re.escape((_PREFIX_TO_HF[native] + key[len(native):]).removesuffix("."))


def vision_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The base folder's vision weights under native names, in their stored dtype, one at a time."""
    from model.checkpoint import iter_checkpoint_tensors

    for key, tensor, _ in iter_checkpoint_tensors(folder):
        if is_vision_key(key):
            yield key, tensor
