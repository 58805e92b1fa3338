"""Build the training model: meta-device construction, freezing, sharding, then weights streamed
from disk straight into each rank's shard.

No rank ever holds the full model on its accelerator, and host memory holds one checkpoint tensor
at a time (read from the memory-mapped file) besides the rank's own shard.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from finetune.args import TrainArgs
from finetune.config import ConfigError
from finetune.data.tokenizer import check_image_tokenizer
from finetune.loss import TransformerWithLoss
from finetune.parallel import freeze, parallelize
from model.args import VISION_TARGETS, LoraArgs, ModelArgs
from model.checkpoint import iter_base_weights, load_adapters_state, retie, tied_aliases
from model.keys import checkpoint_layout
from model.lora import init_lora_A_, is_lora_key, lora_modules
from model.multimodal import vision_block
from model.quant import NF4LoRALinear, import_bitsandbytes, quantize_lora_layers, quantize_nf4
from model.transformer import Transformer

logger = logging.getLogger("finetune")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Precision:
    name: str
    dtype: torch.dtype  # forward/backward matmuls and the storage of frozen weights


def resolve_precision(requested: str, device: torch.device) -> Precision:
    name = requested
    if requested == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    return Precision(name, _DTYPES[name])


# FlexAttention's GPU kernels need head_dim >= 16 (every released Mistral model has 128).
_FLEX_MIN_HEAD_DIM = 16


def resolve_attention(requested: str, device: torch.device, head_dim: int) -> str:
    flex_ok = device.type == "cuda" and head_dim >= _FLEX_MIN_HEAD_DIM
    if requested == "auto":
        return "flex" if flex_ok else "sdpa"
    if requested == "flex" and not flex_ok:
        raise ConfigError(
            "'attention: flex' needs a CUDA device (FlexAttention has no backward on CPU) and head_dim >= 16 "
            f"(this run: {device.type}, head_dim {head_dim}); use attention: sdpa or auto."
        )
    return requested


def check_trainable_vocab(model_args: ModelArgs, folder: str) -> None:
    if model_args.vocab_size == 32000:
        raise ConfigError(
            f"{folder} has vocab_size 32000 (v1 tokenizer), which cannot hold the instruct control tokens "
            "used for fine-tuning. Extend it to 32768 first:\n"
            f"  python -m utils.extend_model_vocab --original_model_ckpt {folder} "
            f"--extended_model_ckpt {folder}_extended\nthen set model_id_or_path to the extended folder."
        )


def check_compile(compile: bool, model_args: ModelArgs, folder: str) -> None:
    if compile and model_args.moe is not None:
        raise ConfigError(
            f"'compile: true' does not support mixture-of-experts models ({folder} has "
            f"{model_args.moe.num_experts} experts, and routing tokens to them gives data-dependent "
            "shapes); set compile: false."
        )


def check_pictures(args: TrainArgs, model_args: ModelArgs, tokenizer: Any, has_images: bool) -> None:
    """Data with pictures needs a model that reads them as its tokenizer cut them
    (``check_image_tokenizer``); vision LoRA targets need data with pictures (without, the vision side is
    not built and they would train nothing)."""
    if has_images:
        try:
            check_image_tokenizer(tokenizer, vision_block(model_args.extra), args.model_id_or_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    vision_targets = [t for t in args.lora.target_modules if t in VISION_TARGETS] if args.lora.enable else []
    if vision_targets and not has_images:
        raise ConfigError(
            f"lora.target_modules names vision layers ({', '.join(vision_targets)}), but the data has no pictures, "
            "so the vision encoder is not built and they would train nothing; remove them, or add image data."
        )


def check_model_settings(args: TrainArgs, model_args: ModelArgs, device: torch.device) -> None:
    """Refuse, before anything is built or written, the settings this model cannot train with."""
    check_compile(args.compile, model_args, args.model_id_or_path)
    check_quantization(args.quantization)
    resolve_attention(args.attention, device, model_args.head_dim)
    if args.init_lora_from and not args.lora.enable:
        raise ConfigError("'init_lora_from' needs lora.enable: true.")


def build_model(
    args: TrainArgs, model_args: ModelArgs, device: torch.device, precision: Precision, *, vision: bool = False
) -> TransformerWithLoss:
    """The sharded training model with the base weights of ``args.model_id_or_path`` and initial
    adapters; ``check_model_settings`` has accepted the settings. ``vision=True`` (the data has images)
    also builds and loads the checkpoint's vision encoder and adapter."""
    lora = args.lora if args.lora.enable else None
    model = build_sharded(
        model_args, lora, device, precision,
        attention_backend=resolve_attention(args.attention, device, model_args.head_dim),
        checkpoint_mode=args.checkpoint_mode, loss_chunk_size=args.loss_chunk_size,
        quantization=args.quantization, compile=args.compile, vision=vision,
    )
    _load_base(model, args.model_id_or_path, device)
    _init_adapters(model, seed=args.seed, device=device)
    if args.init_lora_from:
        _load_into_shards(model, load_adapters_state(model.transformer, args.init_lora_from), device)
        logger.info("Adapters initialised from %s", args.init_lora_from)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensors report global sizes
    n_total = sum(p.numel() for p in model.parameters())
    n_total += sum(math.prod(m.full_shape) - m.weight.numel()  # NF4 weights hold packed codes
                   for m in lora_modules(model.transformer).values() if isinstance(m, NF4LoRALinear))
    logger.info(
        "%s out of %s parameters are fine-tuned (%.2f%%).", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total
    )
    return model


def build_sharded(
    model_args: ModelArgs,
    lora: LoraArgs | None,
    device: torch.device,
    precision: Precision,
    *,
    attention_backend: str,
    checkpoint_mode: str,
    loss_chunk_size: int,
    quantization: str = "none",
    compile: bool = False,
    vision: bool = False,
) -> TransformerWithLoss:
    """The model built on the meta device, frozen, sharded, then given (uninitialised) storage."""
    with torch.device("meta"):
        transformer = Transformer(model_args, lora=lora, attention_backend=attention_backend, vision=vision)
        model = TransformerWithLoss(transformer, chunk_size=loss_chunk_size)
    if quantization == "nf4":
        # Packed codes stored in the compute dtype: FSDP2 shards them and its cast is a no-op.
        quantize_lora_layers(model.transformer, storage_dtype=precision.dtype)
    freeze(model, lora is not None)
    # Storage dtypes before sharding: frozen base in the compute dtype, trainable weights in float32.
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else precision.dtype)
    parallelize(model, compute_dtype=precision.dtype, checkpoint_mode=checkpoint_mode, compile=compile)
    aliases = tied_aliases(model)
    model.to_empty(device=device)
    # to_empty gives each module its own new tensor where FSDP does not manage a tied weight (a frozen
    # one on a single process): one parameter again, so output stays the embedding.
    retie(model, aliases)
    return model


def _copy_into(param: torch.Tensor, full: torch.Tensor, row: int | None = None) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard when it is sharded; with
    ``row``, ``full`` is that row (one expert) of a stacked parameter, which FSDP shards by rows."""
    with torch.no_grad():
        if row is not None:
            if isinstance(param, DTensor):
                local = param.to_local()  # this rank's rows [start, start + len)
                _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                if offset[0] <= row < offset[0] + local.shape[0]:
                    local[row - offset[0]].copy_(full)
            else:
                param[row].copy_(full)
        elif isinstance(param, DTensor):
            # src_data_rank=None: every rank has the full tensor and slices its own shard; no traffic.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def _load_into_shards(model: TransformerWithLoss, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    params = dict(model.transformer.named_parameters())
    for key, value in tensors.items():
        _copy_into(params[key], value.to(device=device, dtype=params[key].dtype))


def check_quantization(quantization: str) -> None:
    if quantization == "none":
        return
    try:
        import_bitsandbytes()
    except ImportError as e:
        raise ConfigError(f"'quantization: {quantization}': {e}; or set quantization: none.") from None


def _load_base(model: TransformerWithLoss, folder: str, device: torch.device) -> None:
    params = {k: v for k, v in model.transformer.named_parameters() if not is_lora_key(k)}
    nf4 = {f"{n}.weight": m for n, m in lora_modules(model.transformer).items() if isinstance(m, NF4LoRALinear)}
    # Checkpoint shapes: NF4 layers hold packed codes, but the file holds the (out, in) weight.
    shapes = {k: nf4[k].full_shape if k in nf4 else tuple(p.shape) for k, p in params.items()}
    layout = checkpoint_layout(shapes, model.transformer.args)  # experts are stored one by one
    stacks: dict[str, list] = {}  # NF4 expert stacks being assembled: [tensor, rows still missing]
    for file_key, tensor in iter_base_weights(folder, {k: shape for k, (_, _, shape) in layout.items()}):
        key, row, _ = layout[file_key]
        if key in nf4:
            if row is not None:  # an NF4 expert stack is quantized whole, once all its experts have arrived
                stack = stacks.setdefault(key, [torch.empty(shapes[key], dtype=tensor.dtype), shapes[key][0]])
                stack[0][row].copy_(tensor)
                stack[1] -= 1
                if stack[1]:
                    continue
                tensor = stacks.pop(key)[0]
            # Quantized from the checkpoint's own dtype, one tensor at a time: the full-precision
            # model never exists; every rank quantizes the same tensor and keeps its shard.
            packed, stats = quantize_nf4(tensor.to(device).reshape(-1, tensor.shape[-1]), storage_dtype=params[key].dtype)
            nf4[key].set_quant_stats(stats)
            _copy_into(params[key], packed.view(params[key].shape))
        else:
            _copy_into(params[key], tensor.to(device=device, dtype=params[key].dtype), row)


def _init_adapters(model: TransformerWithLoss, seed: int, device: torch.device) -> None:
    """Initialise full adapter matrices from one seeded generator, then keep each rank's shard, so
    the initial adapters are identical for every world size."""
    gen = torch.Generator().manual_seed(seed)
    for _name, module in sorted(lora_modules(model.transformer).items()):
        a = init_lora_A_(torch.empty(module.lora_A.weight.shape), generator=gen)
        _copy_into(module.lora_A.weight, a.to(device))
        _copy_into(module.lora_B.weight, torch.zeros(module.lora_B.weight.shape, device=device))
