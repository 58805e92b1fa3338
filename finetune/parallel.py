"""Transformations applied to a finished model, in this order: freeze -> activation
checkpointing -> shard (FSDP2 ``fully_shard`` per block, then the root).

Frozen base weights and trainable adapters live in the same block and are sharded together;
mixed precision is FSDP2's policy (compute in bf16/fp16, gradients reduced in float32), so the
parameters themselves keep their storage dtype: bfloat16 base, float32 adapters.

Activation checkpointing (``checkpoint`` in the config) has three modes:

- ``full``: each block keeps only its input; its whole forward is recomputed in backward.
- ``selective``: each block also keeps the outputs of its matrix products and of the attention
  kernel, except the two (tokens, hidden_dim) products of the feed-forward (w1, w3), which are
  the largest; backward recomputes those two products and the element-wise work (norms, rotary,
  SwiGLU). It keeps about 4 dim + 2 kv_dim more values per token and layer than ``full`` (q, k,
  v, attention output, wo and w2 outputs: 37 kB in bf16 for 7B, against 8 kB for the block input;
  docs/memory.md) and skips half of the matmul FLOPs that ``full`` recomputes, and the attention.
  Mixture-of-experts blocks follow the same rule: the routed experts' grouped products and the
  shared experts' products are kept except their w1 and w3 (the router's logits are kept too), and
  the experts' LoRA updates are recomputed (``selective_policy``).
- ``none``: autograd keeps everything.

Both checkpointing modes wrap the block's own forward in ``torch.utils.checkpoint`` (non-reentrant),
inside FSDP's hooks: the recomputation never re-runs FSDP's pre-forward (which selective
checkpointing would reject), and parameter names do not change.

``compile: true`` then compiles that (checkpointed) forward with ``torch.compile`` as one graph per
block (FSDP's hooks stay outside it, as do parameter names): inductor fuses the element-wise work
(norms, rotary, SwiGLU, the LoRA updates) and, under checkpointing, applies the same save/recompute
policy at trace time instead of dispatching every op through Python. All blocks share one compiled
graph (two: the first block's input needs no gradient); evaluation under ``no_grad`` adds its own.

A multimodal model (built with ``vision=True``) gets the same treatment for the vision encoder's
blocks: each is checkpointed with the configured mode and is an FSDP unit of its own, with the text
blocks' mixed precision. ``selective_policy`` recomputes a vision block's w1 and w3, as a text
block's, and keeps its per-picture attention outputs (fused SDPA kernels). Vision blocks are never
compiled: every picture size is a new graph. The encoder's stem and the adapter stay in the root. The
encoder runs first on every rank, on a blank picture when a batch has none, and a frozen block is
never gathered in backward (``parallelize`` says why).
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from finetune import distributed as D
from finetune.args import CHECKPOINT_MODES
from finetune.loss import TransformerWithLoss
from model.attention import DOCUMENT_ATTENTION_OP
from model.experts import GroupedExperts
from model.lora import freeze_all_but_lora
from model.moe import FeedForward

_ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
}
# FlexAttention runs as compiled code; under checkpointing its call is one higher-order op.
_ATTENTION_OPS |= {
    op for op in (getattr(torch._higher_order_ops, n, None) for n in ("flex_attention", "inductor_compiled_code")) if op
}
# Compiled blocks run per-document SDPA as one custom op (model/attention.py).
_ATTENTION_OPS.add(DOCUMENT_ATTENTION_OP)
# Matrix products: dense layers, and the routed experts' grouped GEMM (model/experts.py).
_GROUPED_MM = torch.ops.aten._grouped_mm.default
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default, _GROUPED_MM}


def freeze(model: TransformerWithLoss, lora_enabled: bool) -> None:
    if lora_enabled:
        freeze_all_but_lora(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def selective_policy(block: nn.Module):
    """The selective policy for ``block`` (or a whole model): save matmul outputs and attention outputs,
    except the feed-forward up-projections (products as wide as a w1 or w3 of its dense feed-forward,
    routed or shared experts) and the routed experts' LoRA updates ``B u``."""
    widths = {m.w1.out_features for m in block.modules() if isinstance(m, (FeedForward, GroupedExperts))}
    # Dense layers accumulate ``B u`` into their saved base product in place (model/lora.py); the
    # experts add it out of place, so it would be kept beside the base product. Its reduction is only
    # the rank long (narrower than any expert weight's input), so recomputing it is cheap.
    narrowest = min((w.in_features for m in block.modules() if isinstance(m, GroupedExperts)
                     for w in (m.w1, m.w2, m.w3)), default=0)

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        # Called in the forward pass, where ctx.op_output is the op's result.
        if func in _ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        if func is _GROUPED_MM and args[0].shape[-1] < narrowest:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if func in _MATMUL_OPS and ctx.op_output.shape[-1] not in widths:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Recompute ``block``'s forward in backward (``mode`` full or selective), in place."""
    options = {}
    if mode == "selective":
        # The LoRA update is accumulated into the (saved) base product in place, so a saved matmul
        # output may change version after it is saved; the recomputation then returns the final
        # value of both (model/lora.py), so the mutation is expected.
        options["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, selective_policy(block), allow_cache_entry_mutation=True
        )
    # (Full checkpointing passes no context_fn at all: torch.compile rejects an explicit no-op one.)
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **options)


def _not_the_sac_mutation_warning(record: logging.LogRecord) -> bool:
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def compile_block(block: nn.Module) -> None:
    """Compile ``block``'s forward (after checkpoint_block, if any), in place; one graph or an error."""
    # The complex rotations enter the graph only to be viewed as real (cos, sin) pairs (model/rope.py);
    # inductor warns about any complex tensor, this view included.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    # Selective checkpointing under torch.compile warns, whatever the region holds, that the region
    # must not mutate; ours does not once compiled (model/lora.py). Added once: same function.
    logging.getLogger("torch._higher_order_ops.wrap").addFilter(_not_the_sac_mutation_warning)
    block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)


def vision_blocks(model: TransformerWithLoss) -> list[nn.Module]:
    """The vision encoder's blocks of a model built with ``vision=True``; none for a text model."""
    encoder = getattr(model.transformer, "vision_encoder", None)
    return list(encoder.transformer.layers) if encoder is not None else []


def parallelize(
    model: TransformerWithLoss, *, compute_dtype: torch.dtype, checkpoint_mode: str, compile: bool = False
) -> TransformerWithLoss:
    """Checkpoint, compile and shard every block (the vision encoder's, then the language model's),
    then shard the root (embedding, norm, output, and the vision stem and adapter).

    Every rank must issue the same collectives in the same order. The vision side runs first, inside
    the embedding, on every rank and every forward: on the batch's pictures, or on one blank picture
    when it has none (``TransformerWithLoss`` passes ``always_encode``), whose features enter the
    embeddings times zero, so gradients reach the same parameters in the same order too."""
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"unknown activation checkpointing mode {checkpoint_mode!r}; use one of {CHECKPOINT_MODES}")
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Alone, a process has nothing to shard frozen weights with: FSDP would only copy them into and
    # out of a one-rank all-gather for every forward and backward, which costs memory and copies
    # (docs/benchmarks.md). They stay plain tensors, already stored in the compute dtype
    # (build_sharded), so no cast is lost.
    alone = D.world_size() == 1
    ignored = {p for p in model.parameters() if not p.requires_grad and p.dtype == compute_dtype} if alone else None
    vision = vision_blocks(model)
    for block in vision:
        if checkpoint_mode != "none":
            checkpoint_block(block, checkpoint_mode)
        # Not compiled: each picture size gives new patch counts and a new ``lengths`` list (one
        # attention call per picture), so a static graph recompiles for every size, and a dynamic
        # one would still specialise on the number of pictures (that loop unrolls). Eager it is.
        fully_shard(block, mp_policy=mp, ignored_params=ignored)
        if not any(p.requires_grad for p in block.parameters()):
            # A frozen block's backward needs no weights (no gradient flows into the encoder when
            # none of its blocks trains), so it is not gathered again in backward.
            block.set_unshard_in_backward(False)
    for block in model.transformer.layers:
        if checkpoint_mode != "none":
            checkpoint_block(block, checkpoint_mode)
        if compile:
            compile_block(block)
        fully_shard(block, mp_policy=mp, ignored_params=ignored)
    # The vision stem (patch_conv, ln_pre) and the adapter (pre-projector norm, patch merger, MLP) run
    # on either side of the encoder's blocks. They are about a tenth of the encoder's weights and
    # small beside the embedding and output, so they stay in the root: no collectives of their own.
    fully_shard(model, mp_policy=mp, ignored_params=ignored)
    return model
