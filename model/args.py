"""Model hyper-parameters. Reading and writing them: ``model.configs`` (params.json), ``model.hf_config`` (config.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoeArgs:
    """Mixture-of-experts feed-forward (``model.moe``). Mixtral: 8 experts, top-2, every layer.
    Fine-grained (Mistral Small 4, params.json's ``moe`` block as vLLM reads it): many narrow routed
    experts (``expert_hidden_dim`` wide) chosen within the best ``num_expert_groups_per_tok`` of
    ``num_expert_groups`` groups, their normalised weights scaled by ``routed_scale``, plus
    ``num_shared_experts`` always-on experts; the first ``first_k_dense_replace`` layers stay dense."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    # None: experts are ``ModelArgs.hidden_dim`` wide (Mixtral) and named under ``feed_forward``.
    expert_hidden_dim: int | None = None
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    num_expert_groups: int = 1
    num_expert_groups_per_tok: int = 1
    routed_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"moe.num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"moe.num_experts ({self.num_experts})."
            )
        groups, chosen = self.num_expert_groups, self.num_expert_groups_per_tok
        if groups < 1 or self.num_experts % groups or not 0 < chosen <= groups:
            raise ValueError(
                f"moe.num_expert_groups ({groups}) must divide num_experts ({self.num_experts}) and "
                f"num_expert_groups_per_tok ({chosen}) must be between 1 and it."
            )
        if chosen * (self.num_experts // groups) < self.num_experts_per_tok:
            raise ValueError(
                f"moe: {chosen} group(s) of {self.num_experts // groups} experts cannot hold "
                f"num_experts_per_tok={self.num_experts_per_tok} experts."
            )

    @property
    def fine_grained(self) -> bool:
        """Mistral Small 4's layout: checkpoint keys ``layers.N.gate``/``experts.E``/``shared_experts``
        sit at the layer level (Mixtral's under ``feed_forward``)."""
        return self.expert_hidden_dim is not None


# wq_a, wq_b, wkv_a_with_mqa, wkv_b: latent attention's projections (model.mla).
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "w1", "w2", "w3")
# The vision side of a multimodal model built with vision=True (model.vision): the encoder's attention and
# SwiGLU projections, the adapter MLP and the patch merger. Never default, and only selected by these full
# names: ``wq`` or ``w1`` alone adapt the language model only (model.lora.is_target).
VISION_TARGETS = (
    *(f"vision_encoder.{w}" for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
    "vision_language_adapter.w_in", "vision_language_adapter.w_out", "patch_merger.merging_layer",
)
LORA_TARGETS = frozenset(
    DEFAULT_TARGETS
    + tuple(f"{scope}.{w}" for scope in ("feed_forward", "experts", "shared_experts") for w in ("w1", "w2", "w3"))
    + VISION_TARGETS
)


@dataclass
class LoraArgs:
    """LoRA settings. ``scaling`` multiplies ``B A x`` directly (mistral-finetune's convention);
    PEFT's ``lora_alpha`` equals ``scaling * rank``."""

    enable: bool = True
    rank: int = 16
    scaling: float = 2.0
    dropout: float = 0.0
    # Names of the linear layers that get adapters: a leaf name (``w1``: every w1, dense, routed expert
    # and shared expert alike) or a scoped one (``feed_forward.w1``: dense layers only, ``experts.w1``:
    # routed experts only, ``shared_experts.w1``).
    # Names a model does not have match nothing, so the default covers grouped-query and latent
    # attention (model.mla) alike. The MoE router never gets an adapter. The vision side's layers
    # (``VISION_TARGETS``: ``vision_encoder.wq``, ``patch_merger.merging_layer`` ...) are named in full.
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if not self.enable:
            return
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}; 8 to 128 is usual.")
        if self.scaling <= 0:
            raise ValueError(f"lora.scaling must be > 0, got {self.scaling!r}; the default is 2.0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        if bad or not self.target_modules:
            raise ValueError(
                f"lora.target_modules has {bad or 'no entries'}; choose from {sorted(LORA_TARGETS)}."
            )


@dataclass(frozen=True)
class YarnArgs:
    """YaRN rotary scaling (Ministral 3): frequencies blended between the plain ones (fast-rotating
    dimensions) and ones divided by ``factor`` (slow ones); ``model.rope.yarn_inv_freq`` has the math."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0  # params.json "beta"
    beta_slow: float = 1.0  # params.json "alpha"
    # Magnitude of the rotations (transformers' ``attention_factor``, applied to cos and sin, so the
    # attention logits scale by its square): 1 for params.json ``apply_scale: false``.
    attention_factor: float = 1.0


@dataclass(frozen=True)
class Llama4Scaling:
    """Llama 4's query scaling by position: queries at position p are multiplied by
    ``1 + beta * log(1 + floor(p / original_max_position_embeddings))``."""

    beta: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MlaArgs:
    """Multi-head latent attention (Mistral Small 4, DeepSeek-V3 style; ``model.mla``): queries through
    a rank-``q_lora_rank`` bottleneck (None: one projection), keys and values expanded per head from a
    shared rank-``kv_lora_rank`` latent, plus one rotary key part shared by every head."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int  # per-head query/key dimensions without rotation
    qk_rope_head_dim: int  # per-head query/key dimensions that rotate (the partial rotary part)
    v_head_dim: int
    # Multiplies the softmax scale 1/sqrt(qk head dim): YaRN's mscale(factor, mscale_all_dim) squared
    # in transformers' Mistral4Attention; 1 without it.
    softmax_scale_factor: float = 1.0


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    # Attention window in tokens (None: full causal attention). An int applies to every layer; a
    # tuple is a pattern repeated over the layers (params.json's list form, Ministral 8B's
    # [None, W, W, W]). Read it through ``layer_windows``, never directly.
    sliding_window: int | tuple[int | None, ...] | None = None
    moe: MoeArgs | None = None
    # The rotary variant: plain (None) or YaRN; Llama 4's query scaling by position, if any.
    yarn: YarnArgs | None = None
    llama_4_scaling: Llama4Scaling | None = None
    # The output layer is the token embedding (Ministral 3 3B): one weight, no ``output`` in the checkpoint.
    tied_embeddings: bool = False
    # Multi-head latent attention in every layer instead of grouped-query attention (None).
    mla: MlaArgs | None = None
    # Keys of params.json this code does not use, kept so a saved params.json round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if isinstance(self.sliding_window, list):
            self.sliding_window = tuple(self.sliding_window)
        pattern = self.sliding_window if isinstance(self.sliding_window, tuple) else (self.sliding_window,)
        if not pattern or any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0)
                              for w in pattern):
            raise ValueError(
                f"sliding_window must be a positive integer, null, or a non-empty list of them; got {self.sliding_window!r}."
            )
        if self.n_layers % len(pattern):
            raise ValueError(
                f"sliding_window lists {len(pattern)} windows, which does not divide n_layers ({self.n_layers}); "
                "the list is a pattern repeated over the layers."
            )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s feed-forward is a mixture of experts (the rest are dense)."""
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    @property
    def expert_hidden_dim(self) -> int:
        """A routed (and each shared) expert's hidden width."""
        assert self.moe is not None
        return self.moe.expert_hidden_dim or self.hidden_dim

    @property
    def attention_linears(self) -> tuple[str, ...]:
        """The attention's linear layers in this model: grouped-query or latent (model.mla)."""
        if self.mla is None:
            return ("wq", "wk", "wv", "wo")
        query = ("wq",) if self.mla.q_lora_rank is None else ("wq_a", "wq_b")
        return (*query, "wkv_a_with_mqa", "wkv_b", "wo")

    def present_targets(self, targets: list[str], vision: bool | None = None) -> list[str]:
        """The entries of ``lora.target_modules`` that select some layer of this model: the default list
        names grouped-query and latent attention's projections alike. ``vision``: whether the model is
        built with its vision side (default: whether the checkpoint has one, ``vision_encoder``)."""
        block = self.extra.get("vision_encoder") or None
        if vision is None:
            vision = block is not None
        names = set(self.attention_linears)
        swiglu = ("w1", "w2", "w3")
        if any(not self.is_moe_layer(i) for i in range(self.n_layers)):
            names |= {f"feed_forward.{w}" for w in swiglu}
        if self.moe is not None:
            names |= {f"experts.{w}" for w in swiglu}
            if self.moe.num_shared_experts:
                names |= {f"shared_experts.{w}" for w in swiglu}
        leaves = {n.rpartition(".")[2] for n in names}
        if vision and block is not None:
            merger = block.get("mm_projector_id") == "patch_merge"
            names |= {t for t in VISION_TARGETS if merger or not t.startswith("patch_merger.")}
        return [t for t in targets if t in names or t in leaves]

    @property
    def rope_dim(self) -> int:
        """The rotated dimensions of a query or key head: all of ``head_dim``, or MLA's rope part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Layer i's attention window (None: full attention): the one place that says it."""
        pattern = self.sliding_window if isinstance(self.sliding_window, tuple) else (self.sliding_window,)
        return pattern * (self.n_layers // len(pattern))
