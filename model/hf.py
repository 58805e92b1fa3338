"""Key names and layout of Hugging Face ``MistralForCausalLM`` / ``MixtralForCausalLM`` /
``Mistral4ForCausalLM`` (whose fused routed experts ``model.hf_experts`` converts), and the PEFT adapter
written for them.

Hugging Face applies rotary embeddings to the two *halves* of each head, Mistral to *adjacent*
pairs, so HF checkpoints store the rows of ``q_proj``/``k_proj`` permuted: within every head,
row ``2i`` moves to ``i`` and row ``2i+1`` to ``head_dim/2 + i``. Any matrix whose *output*
rows feed q or k (the weight itself, or a LoRA ``B``) gets the same permutation; the vision encoder's
q/k too (``model.multimodal``), whose adapters a PEFT export of a multimodal model carries under
``Mistral3ForConditionalGeneration``'s module names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from model.args import VISION_TARGETS, LoraArgs, ModelArgs
from model.hf_experts import EXPERT_KEY, fuse_expert_weights, fused_parameters, peft_expert_adapters
from model.keys import to_checkpoint_names
from model.lora import is_target
from model.multimodal import (
    is_vision_key,
    text_key_to_mistral3,
    vision_block,
    vision_target_hf_modules,
    vision_to_hf,
)


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
    # Latent attention (model.mla) <-> transformers' Mistral4Attention.
    "attention.wq_a": "self_attn.q_a_proj",
    "attention.q_a_norm": "self_attn.q_a_layernorm",
    "attention.wq_b": "self_attn.q_b_proj",
    "attention.wkv_a_with_mqa": "self_attn.kv_a_proj_with_mqa",
    "attention.kv_a_norm": "self_attn.kv_a_layernorm",
    "attention.wkv_b": "self_attn.kv_b_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "mlp.gate",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+?)\.(weight|lora_A\.weight|lora_B\.weight)$")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])$")
# Fine-grained MoE layers (Mistral Small 4, model.keys) <-> Mistral4MoE: router, shared and routed experts.
_SWIGLU_HF = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_FINE_EXPERT = re.compile(r"(shared_experts|experts\.\d+)\.(w[123])$")
_FUSED_EXPERTS = re.compile(r"layers\.(\d+)\.experts\.(gate_up_proj|down_proj)")  # model.hf_experts' output


def module_to_hf(module: str, moe: bool) -> str:
    """Map a Mistral module path inside a layer (``attention.wq``) to its HF name."""
    expert = _EXPERT.match(module)
    if expert:
        # Mixtral's HF layout keeps w1/w2/w3 under block_sparse_moe.experts.{j}.
        return f"block_sparse_moe.experts.{expert.group(1)}.{expert.group(2)}"
    fine = _FINE_EXPERT.fullmatch(module)
    if fine:  # per expert: transformers' Mistral4 stacks them (gate_up_proj, down_proj) on top of this
        return f"mlp.{fine.group(1)}.{_SWIGLU_HF[fine.group(2)]}"
    if module == "gate":
        return "mlp.gate"
    if moe and module == "feed_forward.gate":
        return "block_sparse_moe.gate"
    if module not in _LAYER:
        raise KeyError(f"no Hugging Face name for module '{module}'")
    return _LAYER[module]


def key_to_hf(key: str, moe: bool = False) -> str:
    if key in _TOP:
        return _TOP[key]
    fused = _FUSED_EXPERTS.fullmatch(key)
    if fused:
        return f"model.layers.{fused.group(1)}.mlp.experts.{fused.group(2)}"
    m = _LAYER_KEY.match(key)
    if not m:
        raise KeyError(f"no Hugging Face name for '{key}'")
    layer, module, leaf = m.groups()
    return f"model.layers.{layer}.{module_to_hf(module, moe)}.{leaf}"


def tensor_to_hf(key: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One Mistral tensor -> (HF key, HF tensor). A ``lora_B`` of wq/wk is permuted like the weight;
    ``lora_A`` acts on the input side and stays as it is."""
    if args.mla is not None:
        pass  # latent attention rotates adjacent pairs in transformers too (rope_interleave): no permutation
    elif key.endswith(("attention.wq.weight", "attention.wq.lora_B.weight")):
        w = permute_to_hf(w, args.n_heads, args.head_dim)
    elif key.endswith(("attention.wk.weight", "attention.wk.lora_B.weight")):
        w = permute_to_hf(w, args.n_kv_heads, args.head_dim)
    return key_to_hf(key, args.moe is not None), w


def tensor_to_hf_model(key: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """``tensor_to_hf`` for a whole model's checkpoint: a model carrying a vision encoder is written in
    ``Mistral3ForConditionalGeneration``'s hub layout, its vision weights converted by ``model.multimodal``."""
    vision = vision_block(args.extra)
    if vision is None:
        return tensor_to_hf(key, w, args)
    if is_vision_key(key):
        return vision_to_hf(key, w, vision)
    hf_key, w = tensor_to_hf(key, w, args)
    return text_key_to_mistral3(hf_key), w


def hf_tensors(
    weights: Iterable[tuple[str, torch.Tensor]], args: ModelArgs, convert: Callable = tensor_to_hf_model
) -> Iterator[tuple[str, torch.Tensor]]:
    """Mistral (key, tensor) pairs -> HF ones, each by ``convert`` (a whole model's layout by default); a
    fine-grained MoE model's routed experts are fused per layer into ``mlp.experts.gate_up_proj``/``down_proj``
    (``model.hf_experts``), the only form transformers loads for mistral4."""
    if args.moe is not None and args.moe.fine_grained:
        weights = fuse_expert_weights(weights, args.moe.num_experts)
    for key, w in weights:
        yield convert(key, w, args)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Mistral consolidated tensors of the text model (or a model's state dict: stacked experts are split)
    -> HF tensors (q/k rows permuted, fine-grained experts fused)."""
    return dict(hf_tensors(to_checkpoint_names(state, args).items(), args, tensor_to_hf))


# --- Hugging Face -> Mistral (importing an HF-format base model) ---

_TOP_FROM_HF = {v: k for k, v in _TOP.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER.items() if k != "feed_forward.gate"}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_HF_FINE_EXPERT = re.compile(r"mlp\.(shared_experts|experts\.\d+)\.(gate_proj|down_proj|up_proj)")
_SWIGLU_FROM_HF = {v: k for k, v in _SWIGLU_HF.items()}


def key_from_hf(key: str, moe: bool, fine_grained: bool = False) -> str:
    """Inverse of ``key_to_hf`` for HF's on-disk (hub) layout; ``fine_grained``: a Mistral Small 4
    MoE model, whose MoE layers are named at the layer level (``model.keys``)."""
    if key in _TOP_FROM_HF:
        return _TOP_FROM_HF[key]
    m = _HF_LAYER_KEY.match(key)
    if m:
        layer, rest = m.groups()
        expert = _HF_EXPERT.match(rest)
        if expert:
            return f"layers.{layer}.feed_forward.experts.{expert.group(1)}.{expert.group(2)}.weight"
        module, _, leaf = rest.rpartition(".")
        fine = _HF_FINE_EXPERT.fullmatch(module) if fine_grained else None
        if fine:
            return f"layers.{layer}.{fine.group(1)}.{_SWIGLU_FROM_HF[fine.group(2)]}.{leaf}"
        if fine_grained and module == "mlp.gate":
            return f"layers.{layer}.gate.{leaf}"
        if moe and module in ("block_sparse_moe.gate", "mlp.gate"):
            return f"layers.{layer}.feed_forward.gate.{leaf}"
        # Mixtral has no dense mlp; Mistral Small 4's first_k_dense_replace layers do.
        if module in _LAYER_FROM_HF and not (moe and not fine_grained and module.startswith("mlp.")):
            return f"layers.{layer}.{_LAYER_FROM_HF[module]}.{leaf}"
    raise KeyError(f"no Mistral name for Hugging Face weight '{key}'")


def tensors_from_hf(key: str, w: torch.Tensor, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF tensor -> the Mistral tensor(s) it holds: q/k rows un-permuted; the fused expert
    tensors of transformers 5 (``mlp.experts.gate_up_proj``/``down_proj``) split per expert."""
    fused = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", key)
    fine_grained = args.moe is not None and args.moe.fine_grained
    if fused and args.moe is not None:
        prefix = f"layers.{fused.group(1)}.{'' if fine_grained else 'feed_forward.'}experts"
        for j in range(w.shape[0]):
            if fused.group(2) == "down_proj":  # (experts, dim, hidden)
                yield f"{prefix}.{j}.w2.weight", w[j].clone()
            else:  # (experts, 2 * hidden, dim): gate (w1) rows first, then up (w3)
                w1, w3 = w[j].chunk(2, dim=0)
                yield f"{prefix}.{j}.w1.weight", w1.clone()
                yield f"{prefix}.{j}.w3.weight", w3.clone()
        return
    ours = key_from_hf(key, args.moe is not None, fine_grained)
    if args.mla is not None:
        pass  # rope_interleave: the rotary rows are already in adjacent pairs
    elif ours.endswith("attention.wq.weight"):
        w = permute_from_hf(w, args.n_heads, args.head_dim)
    elif ours.endswith("attention.wk.weight"):
        w = permute_from_hf(w, args.n_kv_heads, args.head_dim)
    yield ours, w


# --- LoRA adapters as a PEFT checkpoint ---

_PEFT_PREFIX = "base_model.model."


def _routed(lora: LoraArgs, args: ModelArgs) -> list[str]:
    """Our routed-expert projections (w1, w2, w3) that carry adapters; none in a dense model."""
    return [w for w in _SWIGLU_HF if is_target(lora, f"experts.{w}")] if args.moe is not None else []


def peft_targets(lora: LoraArgs, args: ModelArgs) -> tuple[list[str], list[str]]:
    """PEFT's (``target_modules``, ``target_parameters``): the HF names of the modules our targets adapt in
    this model (leaf names PEFT matches as suffixes), and Mistral Small 4's fused expert parameters."""
    moe = args.moe is not None
    modules = {module_to_hf(f"attention.{t}", moe).rsplit(".", 1)[-1]
               for t in args.attention_linears if is_target(lora, t)}
    if args.moe is None:
        return sorted(modules | {_SWIGLU_HF[w] for w in _SWIGLU_HF if is_target(lora, f"feed_forward.{w}")}), []
    if not args.moe.fine_grained:
        # Mixtral's experts keep w1/w2/w3 in HF's hub layout (PEFT fuses them itself on load); all three
        # or none, see to_peft_state_dict.
        return sorted(modules | (set(_SWIGLU_HF) if _routed(lora, args) else set())), []
    dense = any(not args.is_moe_layer(i) for i in range(args.n_layers))
    for w, hf in _SWIGLU_HF.items():
        if dense and is_target(lora, f"feed_forward.{w}"):  # the dense layers' projections
            modules.add(f"mlp.{hf}")
        if args.moe.num_shared_experts and is_target(lora, f"shared_experts.{w}"):
            modules.add(f"shared_experts.{hf}")
    return sorted(modules), [f"mlp.experts.{p}" for p in fused_parameters(_routed(lora, args))]


def to_peft_state_dict(lora_state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """``lora.safetensors`` tensors -> PEFT's ``adapter_model.safetensors`` (HF names, wq/wk ``lora_B``
    rows permuted like the weights).

    Mistral Small 4's routed experts become one adapter per fused parameter (``model.hf_experts``).
    transformers 5 fuses each Mixtral expert's w1 and w3 into one ``gate_up_proj``; PEFT 0.21 refuses
    an adapter on only one of them and loads expert adapters wrongly unless w1, w2 and w3 are all
    targeted. So Mixtral expert projections the run did not train are exported as exact zero adapters
    (A = 0 and B = 0: no change to the output, and no gradient if training continues).
    """
    state = to_checkpoint_names(lora_state, args)  # an adapter file's names, or a model's (stacked experts)
    vision = vision_block(args.extra)
    # Vision adapters (model.args.VISION_TARGETS) under transformers' module names: model.vision_tower...,
    # model.multi_modal_projector...; q/k lora_B rows permuted like the weights (model.multimodal).
    peft = {}
    for key in [k for k in state if is_vision_key(k)]:
        if vision is None:
            raise ValueError(f"adapter '{key}' belongs to a vision layer but params.json has no 'vision_encoder' "
                             "block; export with the params.json of the multimodal model the adapter was trained on.")
        hf_key, w = vision_to_hf(key, state.pop(key), vision)
        peft[f"{_PEFT_PREFIX}model.{hf_key}"] = w.contiguous()
    hf = {}
    if args.moe is not None and args.moe.fine_grained:
        layers: dict[str, dict[tuple[str, int, str], torch.Tensor]] = {}
        for key in list(state):
            m = EXPERT_KEY.fullmatch(key)
            if m and m.group(4) != "weight":
                layer, expert, w, leaf = m.groups()
                layers.setdefault(layer, {})[(w, int(expert), leaf[len("lora_")])] = state.pop(key)
        for layer, adapters in layers.items():
            for name, t in peft_expert_adapters(adapters, args.moe.num_experts).items():
                hf[f"model.layers.{layer}.mlp.experts.{name}"] = t
    elif args.moe is not None:
        experts = {}
        for key, w in list(state.items()):
            m = re.fullmatch(r"(layers\.\d+\.feed_forward\.experts\.\d+)\.(w[123])\.lora_([AB])\.weight", key)
            if m:
                experts.setdefault(m.group(1), {})[(m.group(2), m.group(3))] = w
        dims = {"w1": (args.hidden_dim, args.dim), "w2": (args.dim, args.hidden_dim), "w3": (args.hidden_dim, args.dim)}
        for expert, present in experts.items():
            a = next(t for (_, ab), t in present.items() if ab == "A")  # (rank, in_features)
            for w, (out_features, in_features) in dims.items():
                state.setdefault(f"{expert}.{w}.lora_A.weight", a.new_zeros(a.shape[0], in_features))
                state.setdefault(f"{expert}.{w}.lora_B.weight", a.new_zeros(out_features, a.shape[0]))
    hf.update(to_hf_state_dict(state, args))
    # In Mistral3ForConditionalGeneration the text model's modules are model.language_model.layers.N...
    multimodal = vision is not None
    peft.update({_PEFT_PREFIX + (text_key_to_mistral3(key, "module") if multimodal else key): w.contiguous()
                 for key, w in hf.items()})
    return peft


def _peft_targets(modules: list[str], args: ModelArgs, lora: LoraArgs) -> list[str] | str:
    """Leaf names; for a multimodal model a regex (PEFT full-matches a string) on the language model's
    module paths, because the vision tower has q_proj ... gate_proj leaves of its own, and on the paths
    of the vision layers ``lora.target_modules`` names (``model.multimodal.vision_target_hf_modules``).
    Mistral Small 4's scoped names (``mlp.gate_proj``, ``shared_experts.gate_proj``) are paths under
    the layer's ``mlp``."""
    if vision_block(args.extra) is None:
        return modules
    leaves = [m for m in modules if "." not in m]
    paths = [re.escape(m.removeprefix("mlp.")) for m in modules if "." in m]
    layer = r"model\.language_model\.layers\.\d+\."
    alternatives = [rf"(self_attn|mlp)\.({'|'.join(leaves)})"] if leaves else []
    if paths:
        alternatives.append(rf"mlp\.({'|'.join(paths)})")
    language = [rf"{layer}({'|'.join(alternatives)})"] if alternatives else []
    vision = [vision_target_hf_modules(t) for t in args.present_targets(lora.target_modules, vision=True)
              if t in VISION_TARGETS]
    if not vision:
        return language[0] if language else modules  # no module at all: PEFT's own error names it
    return "|".join(language + [rf"model\.({'|'.join(vision)})"])


def peft_adapter_config(lora: LoraArgs, args: ModelArgs, base_model: str | None) -> dict[str, Any]:
    """PEFT ``adapter_config.json``. Our ``scaling`` multiplies B A directly; PEFT multiplies by
    ``lora_alpha / r``, so ``lora_alpha = scaling * rank``."""
    alpha = lora.scaling * lora.rank
    modules, parameters = peft_targets(lora, args)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        # PEFT cannot apply dropout to fused expert parameters; dropout only matters in training.
        "lora_dropout": 0.0 if _routed(lora, args) else lora.dropout,
        "target_modules": _peft_targets(modules, args, lora),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    if parameters:  # Mistral Small 4's fused experts (model.hf_experts)
        config["target_parameters"] = parameters
        if {"w1", "w3"} <= set(_routed(lora, args)):  # gate_up_proj's adapter is w1's and w3's side by side
            pattern = r"mlp\.experts\.gate_up_proj"
            config["rank_pattern"] = {pattern: 2 * lora.rank}
            config["alpha_pattern"] = {pattern: 2 * config["lora_alpha"]}
    return config
