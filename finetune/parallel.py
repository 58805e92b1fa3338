"""Transformations applied to a finished model, in this order: freeze -> activation
checkpointing -> shard (FSDP2 ``fully_shard`` per block, then the root).

Frozen base weights and trainable adapters live in the same block and are sharded together;
mixed precision is FSDP2's policy (compute in bf16/fp16, gradients reduced in float32), so the
parameters themselves keep their storage dtype: bfloat16 base, float32 adapters.
"""

from __future__ import annotations

import torch
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from finetune.loss import CausalLMLoss
from model.lora import freeze_all_but_lora


def freeze(model: CausalLMLoss, lora_enabled: bool) -> None:
    if lora_enabled:
        freeze_all_but_lora(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def parallelize(
    model: CausalLMLoss,
    *,
    compute_dtype: torch.dtype,
    activation_checkpointing: bool,
) -> CausalLMLoss:
    """Checkpoint and shard every block, then shard the root (embedding, norm, output)."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        if activation_checkpointing:
            # Composable checkpointing hooks the block in place, so parameter names do not change.
            activation_checkpoint(block)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model
