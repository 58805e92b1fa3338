"""Will it fit? Peak memory per GPU (or per CPU process) of a training run, before running it.

    python -m utils.estimate_memory --train_yaml example/7B.yaml --gpus 8 [--gpu-memory 80]
    python -m utils.estimate_memory --train_yaml example/7B.yaml --gpus 1 --model /path/params.json \\
        --seq_len 8192 --checkpoint false            # overrides as train.py takes them
    python -m utils.estimate_memory --train_yaml CONFIG.yaml --device cpu --precision bf16
    python -m utils.estimate_memory --train_yaml example/mistral_small_3.2.yaml --model mistral-small-3.2-24b
    python -m utils.estimate_memory --train_yaml example/mistral-small-4.yaml --model mistral-small-4 --gpus 8
    python -m utils.estimate_memory --train_yaml example/mistral_small_3.2.yaml --model mistral-small-3.2-24b \
        --images-per-row fill [--image-size 1540]    # image data: the vision side is built and counted

The model shape comes from ``params.json`` (or a Hugging Face ``config.json``) in the config's
``model_id_or_path``, or from ``--model``: a folder holding only params.json is enough, or the name
of a release this file knows (``KNOWN_MODELS``). The estimate is a sum of explicit terms, each
printed, and a GPU plan also says the fewest GPUs that fit; docs/memory.md derives them and gives the
measured accuracy. Blocks may differ (latent or grouped-query attention; dense, MoE, or MoE with
shared experts): each term is summed over the blocks, the largest being the one gathered or
recomputed. In short, per device with N = world size (FSDP2 shards every block and the root over all N):

- frozen base weights in the compute dtype (adapted linears, stacked experts included, at 4.13 bits
  with ``quantization: nf4``) / N;
  a multimodal release's vision encoder and adapter are counted (``vision_params``) and said, but are
  not in the peak for text-only data: text training never loads them (``model.multimodal`` carries them
  from the base folder); with image data (``--images-per-row``) they are two lines of their own
  (``vision_terms``): their weights, and the pixels, what the vision side saves when it trains, and
  the encoder's working set where that exceeds the text model's (on CPU, plus a calibrated share of it
  that the heap keeps);
  plus the all-gathered *unsharded* root (embedding, final norm, output: alive through forward and
  backward) and the largest block unsharded twice (the one computing and the one prefetched); on
  one device, frozen weights are not FSDP's, so only the adapters are gathered; on CPU with
  N > 1, a second copy of the root (the all-gather's buffers over gloo);
- adapters in float32 + their gradients + AdamW's two moments (16 bytes per trainable parameter) / N;
- activations: the tensors autograd saves per layer and token (``saved_bytes_per_token``) and per
  MoE layer (``saved_bytes_per_layer``: row offsets, the fused experts' lora_A, CPU half-precision
  padding rows), which equal what a real block saves (tests check it), for every layer without activation
  checkpointing; with it, only each block's input plus one recomputed block; with selective
  checkpointing, also the matmul and attention outputs it keeps (``selective_saved_bytes_per_token``);
- the fused loss: the final norm's saved input, the target rows' hidden states and their
  gradient, one chunk of ``loss_chunk_size x vocab`` compute-dtype logits (which then hold their
  gradient; each chunk is freed before the next) and one float32 block of them (``block_rows``);
- a fixed overhead: the CUDA context (~1 GB, outside ``max_memory_allocated``) on GPU, the Python +
  torch process baseline on CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.args import TrainArgs, load_train_args
from finetune.config import ConfigError
from finetune.loss import block_rows
from model.args import DEFAULT_TARGETS, Llama4Scaling, LoraArgs, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from model.configs import load_model_args
from model.lora import is_target
from model.moe import CPU_ROW_MULTIPLE
from model.multimodal import merge_size, token_side
from model.quant import quantized_weight_bytes

GB = 1e9
CUDA_CONTEXT = 1.0 * GB  # CUDA context + cuBLAS/NCCL workspaces; outside max_memory_allocated
CPU_BASELINE = 0.31 * GB  # RSS of python + torch + this project imported, gloo group of one
# Calibrated, not derived (docs/memory.md): on CPU the peak RSS also holds memory that glibc keeps
# after frees (heap fragmentation; autograd's backward thread allocates from another arena) and
# oneDNN/OpenMP scratch. Fitted by least squares on bench_train_step.py's small and tiny configs
# (every checkpointing mode; the runs and residuals are in docs/memory.md) as a constant, bytes per
# token and vocabulary entry (freed logits the heap keeps: the loss's compute-dtype chunks) and
# blocks' saved tensors (the forward's and the backward thread's arenas). On GPU
# max_memory_allocated counts live tensors only.
CPU_RUNTIME = 0.007 * GB
CPU_HEAP_PER_LOGIT = 3.48
CPU_HEAP_BLOCKS = 1.33
# Calibrated too (docs/memory.md): an MoE model's grouped products run on CPU as one matmul per expert,
# whose row counts change with every batch, so oneDNN's kernel caches (finetune/distributed.py) fill to
# their cap within a step or two, where a dense model's fill with document lengths only.
CPU_MOE_KERNEL_CACHES = 0.2 * GB
# Calibrated too (docs/memory.md): with image data on CPU the heap also keeps part of the vision
# encoder's working set (its forward's and backward's freed tensors, which the text model's later
# ones, of other sizes, do not reuse), as a share of that working set (``vision_transient_bytes``).
CPU_HEAP_VISION = 0.64
# Bytes per NF4 weight, statistics included, for a 7B-sized matrix (the share is the same for any large one).
NF4_BYTES = quantized_weight_bytes(4096 * 14336) / (4096 * 14336)
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LINEARS = DEFAULT_TARGETS  # every linear of any block: fully fine-tuned, all of them train


@dataclass(frozen=True)
class Images:
    """The images one row of ``seq_len`` tokens holds at most, all planned at the largest size the
    tokenizer keeps (``size`` px square; mistral-common shrinks larger pictures to fit)."""

    per_row: int
    size: int


@dataclass
class Plan:
    device: str  # "cuda" or "cpu"
    n_devices: int
    parts: dict[str, float]  # bytes per device, in print order; their sum is the peak
    capacity: float | None = None  # bytes per device (GPU memory, or RAM / processes on CPU)
    notes: list[str] = field(default_factory=list)
    images: Images | None = None  # the image data planned for, if any

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated would report: everything but the fixed overhead."""
        return self.total - self.parts.get("fixed overhead", 0.0)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity


def linear_shapes(m: ModelArgs, layer: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(in_features, out_features, copies) of every linear layer of block ``layer`` (default: the
    last, an MoE block when the model has any), under the names ``lora.target_modules`` matches.

    Attention is grouped-query (wq wk wv wo) or latent (``model.mla``: wq or wq_a + wq_b,
    wkv_a_with_mqa, wkv_b, wo). The feed-forward is dense (w1 w2 w3, ``hidden_dim`` wide) or, in an
    MoE layer, the routed experts stacked (``experts.w1`` ...: one copy per expert,
    ``expert_hidden_dim`` wide; Mixtral's too) and the shared experts as one wider dense
    feed-forward (``shared_experts.w1`` ...). The MoE router is no LoRA target: see ``param_counts``.
    """
    layer = m.n_layers - 1 if layer is None else layer
    d = m.dim
    if m.mla is None:
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        shapes = {"wq": (d, q, 1), "wk": (d, kv, 1), "wv": (d, kv, 1), "wo": (q, d, 1)}
    else:
        a = m.mla
        qk = m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        if a.q_lora_rank is None:
            shapes = {"wq": (d, qk, 1)}
        else:
            shapes = {"wq_a": (d, a.q_lora_rank, 1), "wq_b": (a.q_lora_rank, qk, 1)}
        shapes |= {
            "wkv_a_with_mqa": (d, a.kv_lora_rank + a.qk_rope_head_dim, 1),
            "wkv_b": (a.kv_lora_rank, m.n_heads * (a.qk_nope_head_dim + a.v_head_dim), 1),
            "wo": (m.n_heads * a.v_head_dim, d, 1),
        }
    if not m.is_moe_layer(layer):
        return shapes | {"w1": (d, m.hidden_dim, 1), "w2": (m.hidden_dim, d, 1), "w3": (d, m.hidden_dim, 1)}
    e, f = m.moe.num_experts, m.expert_hidden_dim
    shapes |= {"experts.w1": (d, f, e), "experts.w2": (f, d, e), "experts.w3": (d, f, e)}
    if m.moe.num_shared_experts:
        fs = f * m.moe.num_shared_experts
        shapes |= {"shared_experts.w1": (d, fs, 1), "shared_experts.w2": (fs, d, 1), "shared_experts.w3": (d, fs, 1)}
    return shapes


_SWIGLU = ("w1", "w2", "w3")


def _targeted(targets: list[str], name: str) -> bool:
    """Whether ``lora.target_modules`` selects this layer: ``model.lora.is_target``'s rule (the dense
    feed-forward's w1/w2/w3 are ``feed_forward.w1`` ... in the model)."""
    return is_target(LoraArgs(target_modules=list(targets)), f"feed_forward.{name}" if name in _SWIGLU else name)


def block_param_counts(m: ModelArgs, layer: int, targets: list[str], rank: int) -> dict[str, int]:
    """Parameters of block ``layer``: all of its base weights (norms and router included), those of
    its LoRA-targeted linears (what ``quantization: nf4`` stores in 4 bits, stacked experts included),
    those of its stacked experts, and its adapters (stacked: experts x (r x in + out x r) per projection)."""
    shapes = linear_shapes(m, layer)
    norms = 2 * m.dim
    if m.mla is not None:
        norms += (m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank  # q_a_norm, kv_a_norm
    router = m.dim * m.moe.num_experts if m.is_moe_layer(layer) else 0
    return {
        "params": sum(i * o * n for i, o, n in shapes.values()) + norms + router,
        "quantizable": sum(i * o * n for name, (i, o, n) in shapes.items() if _targeted(targets, name)),
        "stacked": sum(i * o * n for i, o, n in shapes.values() if n > 1),
        "lora": sum(rank * (i + o) * n for name, (i, o, n) in shapes.items() if _targeted(targets, name)),
    }


def param_counts(m: ModelArgs, targets: list[str], rank: int) -> dict[str, int]:
    """Parameters of the model's blocks, summed over layers (``layers``, ``layers_lora``,
    ``layers_quantizable``, ``layers_stacked``), of its largest block (``block``, ``block_lora``:
    what FSDP gathers whole) and of the root (embedding, final norm, output unless tied)."""
    blocks = [block_param_counts(m, i, targets, rank) for i in range(m.n_layers)]
    largest = max(blocks, key=lambda b: b["params"] + b["lora"])
    out = {f"layers_{k}": sum(b[k] for b in blocks) for k in ("lora", "quantizable", "stacked")}
    out["layers"] = sum(b["params"] for b in blocks)
    out["block"], out["block_lora"], out["block_quantizable"] = largest["params"], largest["lora"], largest["quantizable"]
    out["root"] = (1 if m.tied_embeddings else 2) * m.vocab_size * m.dim + m.dim
    return out


def vision_params(m: ModelArgs) -> int:
    """Parameters of a Pixtral vision encoder and its vision-language adapter, from params.json's
    ``vision_encoder`` block (kept in ``ModelArgs.extra``); 0 for a text-only model.

    Counted as mistral-inference and transformers build them (no biases unless ``adapter_bias``):
    the patch convolution (channels x patch^2 x h) and ``ln_pre``; per layer wq wk wv wo (4 h^2),
    w1 w2 w3 (3 h F_v) and two RMSNorms; then the adapter: the pre-projector norm, the patch merger
    (h s^2 -> h, for ``mm_projector_id: patch_merge``) and the two linears h -> dim -> dim. The 2D
    rotary tables are buffers, not weights. The image-token embeddings are the text vocabulary's.
    """
    v = m.extra.get("vision_encoder")
    if not v:
        return 0
    h, f, s = v["hidden_size"], v["intermediate_size"], v.get("spatial_merge_size", 1)
    encoder = v.get("num_channels", 3) * v["patch_size"] ** 2 * h + h
    encoder += v["num_hidden_layers"] * (4 * h * h + 3 * h * f + 2 * h)
    adapter = (h if v.get("add_pre_mm_projector_layer_norm") else 0)
    adapter += s * s * h * h if v.get("mm_projector_id") == "patch_merge" else 0
    adapter += h * m.dim + m.dim * m.dim + (2 * m.dim if v.get("adapter_bias") else 0)
    return encoder + adapter


def vision_args(m: ModelArgs) -> ModelArgs | None:
    """The vision encoder's blocks as a text-block shape, so the per-token formulas apply per patch: a
    Pixtral block is a text block without the causal mask (two RMSNorms, rotary attention with as many
    key/value heads as heads, SwiGLU). None for a text-only model."""
    v = m.extra.get("vision_encoder")
    if not v:
        return None
    h, heads = v["hidden_size"], v["num_attention_heads"]
    return ModelArgs(dim=h, n_layers=v["num_hidden_layers"], head_dim=v.get("head_dim") or h // heads,
                     hidden_dim=v["intermediate_size"], n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, vocab_size=1)


def max_image_size(m: ModelArgs) -> int:
    """The largest side, in pixels, an image keeps (params.json ``max_image_size``, else ``image_size``:
    the tokenizer's ``max_image_size`` in the releases)."""
    v = m.extra["vision_encoder"]
    return int(v.get("max_image_size") or v["image_size"])


def image_shape(m: ModelArgs, size: int) -> tuple[int, int]:
    """(patches, tokens) of one ``size`` x ``size`` image: (size / patch)² patches; each merge x merge
    block of them is one ``[IMG]``, and each row of those ends with ``[IMG_BREAK]`` (``[IMG_END]`` last)."""
    v = m.extra["vision_encoder"]
    side = -(-size // v["patch_size"])
    rows = -(-side // merge_size(v))
    return side * side, rows * (rows + 1)


def images_filling(m: ModelArgs, seq_len: int, size: int) -> int:
    """How many ``size`` px images one row of ``seq_len`` tokens holds: the worst case of image data."""
    return seq_len // image_shape(m, size)[1]


def vision_linear_shapes(m: ModelArgs) -> dict[str, tuple[int, int, int]]:
    """(in, out, copies) of every vision linear under its ``lora.target_modules`` name
    (``model.args.VISION_TARGETS``: ``vision_encoder.wq`` ... one copy per block, then the adapter's)."""
    va, v = vision_args(m), m.extra["vision_encoder"]
    shapes = {f"vision_encoder.{k}": (i, o, va.n_layers) for k, (i, o, _) in linear_shapes(va, 0).items()}
    if v.get("mm_projector_id") == "patch_merge":
        s = v["spatial_merge_size"]
        shapes["patch_merger.merging_layer"] = (va.dim * s * s, va.dim, 1)
    return shapes | {"vision_language_adapter.w_in": (va.dim, m.dim, 1), "vision_language_adapter.w_out": (m.dim, m.dim, 1)}


def vision_block_targets(targets: list[str]) -> list[str]:
    """The encoder blocks' linears that ``lora.target_modules`` adapts, by their names inside a block."""
    return [t.removeprefix("vision_encoder.") for t in targets if t.startswith("vision_encoder.")]


def vision_block_saved_bytes(m: ModelArgs, n_images: int, size: int, targets: list[str], rank: int,
                             dropout: float, c: int) -> float:
    """Bytes one vision block saves for backward over ``n_images`` images of ``size`` px, when gradients
    flow through the encoder (``targets``: its adapted, or in full fine-tuning all, linears).

    Per patch what a text block saves per token (``saved_bytes_per_token``): the fused attention
    kernel saves q, k, v, its output and log-sum-exp, as a text block's (model/vision.py calls SDPA
    with 4-D inputs, so no (patches, patches) scores exist; a test checks the kernel)."""
    va = vision_args(m)
    return n_images * image_shape(m, size)[0] * saved_bytes_per_token(va, targets, rank, dropout, c, 0)


def vision_selective_kept_bytes_per_patch(m: ModelArgs, targets: list[str], rank: int, c: int) -> float:
    """Bytes per patch the selective policy keeps in a vision block besides its input: a text block's
    (``selective_saved_bytes_per_token``), the fused attention kernel's output and log-sum-exp included."""
    return selective_saved_bytes_per_token(vision_args(m), targets, rank, c, 0)


def vision_outside_blocks_saved_bytes(m: ModelArgs, n_images: int, size: int, c: int,
                                      targets: list[str] | None = None, rank: int = 0, dropout: float = 0.0) -> float:
    """Bytes saved outside the vision blocks over ``n_images`` images of ``size`` px, with every
    vision part trained (``targets`` None: full fine-tuning) or LoRA on ``targets`` (their full
    names, ``model.args.VISION_TARGETS``).

    A frozen linear or norm saves nothing of an input that needs no gradient, so with LoRA the stem
    (patch convolution, ``ln_pre``) saves nothing, and what the adapter side saves depends on where
    gradients flow. Fully fine-tuned: the patch convolution's input in the compute dtype (in bf16 a
    copy of the float32 pixels) and ``ln_pre``'s input and float32 rsqrt. Both: the complex64
    rotary table (4 head_dim bytes a patch, one tensor all blocks share) once a block's q or k needs
    a gradient; the pre-projector norm's input and rsqrt once the encoder trains; the patch merger's
    input (the unfold output, as many values as the patches) when it trains; each adapted
    linear's input and rank-sized ``A x`` (the merger's, ``w_in``'s, ``w_out``'s: the GELU's
    output); the GELU's input once anything before it trains."""
    v = m.extra["vision_encoder"]
    va = vision_args(m)
    patches, _ = image_shape(m, size)
    hv = v["hidden_size"]
    merge = v.get("mm_projector_id") == "patch_merge"
    merged = patches // (v["spatial_merge_size"] ** 2 if merge else 1)
    full = targets is None
    block = list(LINEARS) if full else vision_block_targets(targets)
    trains = {k for k in vision_linear_shapes(m) if full or k in targets}
    total = 0.0
    if full:
        total += (3 * size * size * c if c != 4 else 0) + patches * (c * hv + 4)  # conv input, ln_pre
    if {"wq", "wk"} & set(block) or (block and va.n_layers > 1):  # some block's q, k need gradients
        total += patches * 4 * va.head_dim  # rotary table, complex64 (patches, head_dim / 2)
    if block and v.get("add_pre_mm_projector_layer_norm"):
        total += patches * (c * hv + 4)
    # The adapter side in its order: (linear, its input width, rows); gradients flow from the first trained part on.
    side = ([("patch_merger.merging_layer", hv * v["spatial_merge_size"] ** 2, merged)] if merge else [])
    side += [("vision_language_adapter.w_in", hv, merged), ("vision_language_adapter.w_out", m.dim, merged)]
    flowing = bool(block)
    for name, width, rows in side:
        if name == "vision_language_adapter.w_out" and flowing:
            total += rows * c * m.dim  # the GELU's input (w_in's output)
        if name in trains:
            flowing = True
            total += rows * (c * width + (c * rank if not full else 0) + ((c + 1) * width if dropout and not full else 0))
    return n_images * total


def vision_first_block_unsaved_bytes(m: ModelArgs, n_images: int, size: int, c: int, targets: list[str]) -> float:
    """What the first vision block, under LoRA on its linears ``targets`` (names inside a block), does
    not save of what ``vision_block_saved_bytes`` counts: its input comes from the frozen stem and
    needs no gradient, so its frozen ``attention_norm`` saves neither that input nor the rsqrt. Without
    attention adapters nothing in the attention needs a gradient (q, k, v, output, log-sum-exp
    unsaved), nor does the feed-forward's input (``ffn_norm`` unsaved); without w1 and w3 adapters
    too, the SwiGLU's products save nothing either (only w2's input and ``A x``)."""
    va = vision_args(m)
    hv = va.n_heads * va.head_dim
    per_patch = c * va.dim + 4
    if not {"wq", "wk", "wv", "wo"} & set(targets):
        per_patch += 4 * c * hv + 4 * va.n_heads + c * va.dim + 4
        if not {"w1", "w3"} & set(targets):
            per_patch += 3 * c * va.hidden_dim
    return n_images * image_shape(m, size)[0] * per_patch


def vision_transient_bytes(m: ModelArgs, n_images: int, size: int, c: int) -> float:
    """What the encoder's forward holds at once beyond what it saves: the patch convolution's
    per-image outputs (``VisionEncoder.forward`` keeps them referenced through the blocks) and the
    complex64 rotary table, then in one block its input, the residual stream and a normed copy
    (3 c hv per patch) and the larger of the feed-forward's three (patches, F_v) products and the
    attention's q, k, v. The fused kernels hold no (patches, patches) tensor. Backward holds as much
    again for the gradients of these, and no more."""
    va = vision_args(m)
    patches = n_images * image_shape(m, size)[0]
    hv = va.n_heads * va.head_dim
    attention = 3 * c * hv * patches
    stem = (c * va.dim + 4 * va.head_dim) * patches  # conv outputs, rotary table
    return stem + 3 * c * hv * patches + max(3 * c * va.hidden_dim * patches, attention)


def vision_terms(
    m: ModelArgs, args: TrainArgs, images: Images, *, n_devices: int, c: int, frozen_gathered: bool,
    text_dynamic: float, cpu: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """The vision side of a run on image data, as two lines (its weights, its activations; on CPU a
    third, the allocator's slack) and notes.

    Weights: the encoder and adapter in the compute dtype, sharded like the blocks (fully fine-tuned:
    float32 with gradients and AdamW, 16 bytes a parameter). Sharded, FSDP also holds the parts outside
    the blocks (patch convolution, ``ln_pre``, merger, adapter) gathered with the root for the whole
    step, and two vision blocks while the encoder runs. With LoRA the vision side is frozen unless
    ``lora.target_modules`` names vision layers in full (``model.args.VISION_TARGETS``): those get
    adapters (16 bytes a parameter) and, with ``quantization: nf4``, 4-bit base weights.

    Activations: kept through the step, the pixels (float32, as mistral-common gives them) and, when
    gradients flow through the encoder (vision targets in its blocks, or full fine-tuning; a frozen
    encoder saves nothing), what it saves: every block's saved tensors, or under checkpointing each block's
    input (and the selective policy's kept products) plus one block recomputed in backward, and
    what the stem and adapter save. The encoder runs first in forward and last in backward, when the
    text blocks hold no activations, so its working set counts only where it exceeds the text's
    (``text_dynamic``): peak = kept + max(text's, encoder's). On CPU (``cpu``) the heap keeps a
    calibrated share of the encoder's working set besides (``CPU_HEAP_VISION``)."""
    va = vision_args(m)
    n = images.per_row * args.batch_size
    patches, tokens = image_shape(m, images.size)
    full = not args.lora.enable
    block_targets, rank = (list(LINEARS), 0) if full else (vision_block_targets(args.lora.target_modules), args.lora.rank)
    dropout = 0.0 if full else args.lora.dropout
    adapted = {k: s for k, s in vision_linear_shapes(m).items() if full or k in args.lora.target_modules}
    trains = bool(adapted)
    hv, lv = va.n_heads * va.head_dim, va.n_layers
    block_params = block_param_counts(va, 0, list(LINEARS), 0)["params"]  # one encoder block
    params = vision_params(m)
    parts: dict[str, float] = {}
    gathered = (params - lv * block_params) * c if frozen_gathered else 0.0
    if full:
        parts["vision: weights (fp32 + grads + AdamW)"] = params * 16 / n_devices + gathered
    else:
        # Frozen in the compute dtype, adapted linears in NF4 with quantization: nf4 (model/quant.py
        # quantizes every LoRALinear); their adapters in float32 with gradients and AdamW.
        quantized = sum(i * o * k for i, o, k in adapted.values()) if args.quantization == "nf4" else 0
        lora_params = sum(rank * (i + o) * k for i, o, k in adapted.values())
        name = "vision: weights (sharded)" + (" + adapters (fp32 + grads + AdamW)" if adapted else "")
        parts[name] = ((params * c - quantized * (c - NF4_BYTES)) + lora_params * 16) / n_devices + gathered

    kept = n * 3 * images.size**2 * 4.0  # pixels
    recompute = 0.0
    mode = args.checkpoint_mode
    if trains:
        # Adapters on the adapter side only (w_in, w_out, merger): the encoder before them saves nothing.
        block = vision_block_saved_bytes(m, n, images.size, block_targets, rank, dropout, c) if block_targets else 0.0
        kept += vision_outside_blocks_saved_bytes(m, n, images.size, c, None if full else args.lora.target_modules,
                                                  rank, dropout)
        if mode == "none" or not block_targets:
            kept += lv * block
            if block_targets and not full:  # the first block's input comes from the frozen stem
                kept -= vision_first_block_unsaved_bytes(m, n, images.size, c, block_targets)
        else:
            recompute = block
            kept += lv * n * patches * hv * c
            if mode == "selective":
                kept += lv * n * patches * vision_selective_kept_bytes_per_patch(m, block_targets, rank, c)
    activations = recompute + vision_transient_bytes(m, n, images.size, c)
    working = activations + (2 * block_params * c if frozen_gathered else 0.0)
    parts[f"vision: activations ({n} x {images.size} px images)"] = kept + max(0.0, working - text_dynamic)
    if cpu:  # fitted on the activations alone (one process: no gathered blocks)
        parts["vision: CPU allocator slack (calibrated)"] = CPU_HEAP_VISION * activations

    notes = [
        f"vision: {images.per_row} image(s) of {images.size} x {images.size} px per row x batch {args.batch_size}: "
        f"{n * patches} patches through {lv} encoder blocks, {n * tokens} image tokens of the {args.seq_len * args.batch_size}; "
        + ("encoder and adapter train (full fine-tuning)" if full else
           f"LoRA on {', '.join(adapted)}" if trains else "encoder and adapter frozen: they save nothing for backward"),
        f"vision: the encoder's working set, {working / GB:.2f} GB, "
        + (f"exceeds the text model's activations and transients ({text_dynamic / GB:.2f} GB), which it never meets: "
           f"the excess is in the peak" if working > text_dynamic else
           f"stays under the text model's activations and transients ({text_dynamic / GB:.2f} GB), which it never meets"),
    ]
    return parts, notes


# Release shapes, for planning without a model folder (``--model NAME``). Where each value was read is
# said per entry; rotary settings do not change the plan but make ``describe`` name the variant. The
# Pixtral encoder below is Mistral Small 3.1's (the official HF config.json's vision_config:
# hidden 1024, 24 layers, F 4096, patch 14, spatial merge 2, no adapter bias), about 0.44B parameters.
PIXTRAL_SMALL_31 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "patch_size": 14, "image_size": 1540, "max_image_size": 1540, "rope_theta": 10000.0,
    "spatial_merge_size": 2, "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True,
    "adapter_bias": False,
}
PIXTRAL_12B = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "patch_size": 16, "image_size": 1024, "rope_theta": 10000.0, "adapter_bias": True,
}
_MINISTRAL3_ROPE = dict(
    rope_theta=1e6,
    yarn=YarnArgs(factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0),
    llama_4_scaling=Llama4Scaling(beta=0.1, original_max_position_embeddings=16384),
)
_COMMON = dict(head_dim=128, n_heads=32, n_kv_heads=8, norm_eps=1e-5, vocab_size=131072)
_SMALL_24B = dict(_COMMON, dim=5120, n_layers=40, hidden_dim=32768, rope_theta=1e9)
KNOWN_MODELS: dict[str, ModelArgs] = {
    # transformers' Ministral3Config defaults, documented as mistralai/Ministral-3-8B-Base-2512's.
    # Vision encoder: assumed to be the Pixtral block above (the model cards give ~0.4B for it); the
    # release's own vision_encoder block was not found.
    "ministral-3-8b": ModelArgs(**_COMMON, dim=4096, n_layers=34, hidden_dim=14336, **_MINISTRAL3_ROPE,
                                extra={"vision_encoder": PIXTRAL_SMALL_31}),
    # dim 3072, 26 layers, F 9216 from a copy of the release's text_config (and Megatron-Bridge's docs);
    # tied embeddings as the release's params.json says (issue 16). Rotary and vision assumed as 8B's.
    "ministral-3-3b": ModelArgs(**_COMMON, dim=3072, n_layers=26, hidden_dim=9216, tied_embeddings=True,
                                **_MINISTRAL3_ROPE, extra={"vision_encoder": PIXTRAL_SMALL_31}),
    # config.json of mistralai/Ministral-8B-Instruct-2410 (as fine-tunes copy it: window 32768, rope
    # 1e8) with transformers' documented pattern, one full layer then three windowed ones. The
    # release's params.json list itself was not found; its full layers are null here.
    "ministral-8b-2410": ModelArgs(**_COMMON, dim=4096, n_layers=36, hidden_dim=12288, rope_theta=1e8,
                                   sliding_window=(None, 32768, 32768, 32768)),
    # config.json of mistralai/Mistral-Small-3.1-24B-Instruct-2503 (transformers' Mistral3Config
    # defaults); 3.2 (2506) has the same text shape (a text-only copy of its config.json) and encoder.
    "mistral-small-3.2-24b": ModelArgs(**_SMALL_24B, extra={"vision_encoder": PIXTRAL_SMALL_31}),
    # Magistral Small 1.2 (2509) builds on Mistral Small 3.2 and adds its vision encoder back (model card).
    "magistral-small-24b": ModelArgs(**_SMALL_24B, extra={"vision_encoder": PIXTRAL_SMALL_31}),
    # Pixtral 12B (2409): Mistral Nemo's decoder (the release's params.json as transformers' Llava conversion
    # and mistral-community/pixtral-12b's config.json give it: rope 1e9) and its own encoder: patch 16, images
    # up to 1024 px (mistral-common's tekken_240911 image config), no spatial merge, an adapter with biases.
    "pixtral-12b": ModelArgs(**_COMMON, dim=5120, n_layers=40, hidden_dim=14336, rope_theta=1e9,
                             extra={"vision_encoder": PIXTRAL_12B}),
    # Devstral Small 1.0 / 1.1 (2505 / 2507): Mistral Small 3.1 fine-tunes whose releases drop the vision
    # encoder (model cards); their own params.json was not found, so the shape is Small 3.1's.
    "devstral-small-24b": ModelArgs(**_SMALL_24B),
    # Mistral Small 4 (mistralai/Mistral-Small-4-119B-2603): transformers' Mistral4Config defaults, which
    # its docstring documents as that release's (a test compares them). Latent attention in every layer,
    # 128 routed experts 2048 wide (top 4) + 1 shared, no dense layer (first_k_dense_replace 0; the dense
    # intermediate_size 12288 is then unused): 118.97B text parameters, which with a Pixtral encoder
    # (assumed Small 3.1's, as for Ministral 3: the vLLM recipe gives a Pixtral-style 1540 px, patch 14
    # encoder) make the 119.4B that third-party model listings give. YaRN x128 over 8192; the softmax
    # scale factor is YaRN's mscale(128, mscale_all_dim 1) squared, as transformers computes it.
    "mistral-small-4": ModelArgs(
        dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32, n_kv_heads=32, norm_eps=1e-6,
        vocab_size=131072, rope_theta=10000.0,
        moe=MoeArgs(num_experts=128, num_experts_per_tok=4, expert_hidden_dim=2048, num_shared_experts=1),
        mla=MlaArgs(q_lora_rank=1024, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                    softmax_scale_factor=(0.1 * math.log(128.0) + 1.0) ** 2),
        yarn=YarnArgs(factor=128.0, original_max_position_embeddings=8192),
        llama_4_scaling=Llama4Scaling(beta=0.1, original_max_position_embeddings=8192),
        extra={"vision_encoder": PIXTRAL_SMALL_31},
    ),
}


def saved_bytes_per_token(
    m: ModelArgs, targets: list[str], rank: int, dropout: float, c: int, layer: int | None = None,
    *, sdpa: bool = True, padded: bool = False,
) -> float:
    """Bytes autograd saves for backward, per token, in block ``layer`` (eager, frozen base; default
    the last block), with k routed rows per token (``expert_row_bytes`` each; on CPU in bf16/fp16
    the padding rows come on top, see ``saved_bytes_per_layer``).

    ``c`` is the compute dtype's size. A frozen linear saves nothing of its input; a LoRA linear saves
    its input (for lora_A's gradient; one tensor shared by the projections that read it) and the
    rank-sized ``A x`` (for lora_B's). RMSNorm saves its input and the (tokens, 1) float32 rsqrt.
    Attention (SDPA per document, or FlexAttention) saves q, k, v after rotary, its output and a
    float32 log-sum-exp per head; the output is copied once more into the input of wo. SwiGLU saves
    w1's and w3's outputs and silu(w1 x); the product is w2's input.

    Latent attention (``model.mla``) also saves the inner norms' inputs (kv_a_norm's is a view of
    wkv_a_with_mqa's whole output), the per-token scale of the unrotated query part, the
    concatenated q and k, and wkv_b's output, of which v is a view. With ``sdpa`` (the per-document
    SDPA path: CPU, ``attention: sdpa``; not FlexAttention) values narrower than the query/key head
    are zero-padded to its width (``model.attention.attend``): SDPA then saves the padded v instead
    of wkv_b's output, and an output as wide as the query head, sliced back for wo.

    An MoE layer saves the router's float32 softmax over all experts, the top-k indices, the
    renormalised weights and their sum; per (token, choice) the int64 ``order`` that sorts it by
    expert (``MoeLayer.rows_by_expert``) and, when the rows are ``padded`` (CPU bf16/fp16: some
    expert's rows were rounded up), the int64 ``slot`` that places it and its float32 weight there
    (saved by ``index_copy``); per routed row ``expert_row_bytes``; the shared experts save a dense SwiGLU.
    Dropout on the adapters adds, per LoRA linear, its dropped input and a one-byte mask.
    """
    layer = m.n_layers - 1 if layer is None else layer
    shapes = linear_shapes(m, layer)
    t = {name for name in shapes if _targeted(targets, name)}
    d, h, u = m.dim, m.n_heads, c * rank  # u: A x of one LoRA linear

    def inputs_and_updates(*names: str) -> int:
        return _inputs_and_updates(shapes, t, u, c, *names)

    total = 2 * (c * d + 4)  # two RMSNorms
    if m.mla is None:
        qd = h * m.head_dim
        total += inputs_and_updates("wq", "wk", "wv")
        total += c * (h + 2 * m.n_kv_heads) * m.head_dim + c * qd + 4 * h  # q k v, out, lse
    else:
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        total += inputs_and_updates(*[n for n in ("wq", "wq_a", "wkv_a_with_mqa") if n in shapes])
        if a.q_lora_rank is not None:
            total += c * a.q_lora_rank + 4 + inputs_and_updates("wq_b")  # q_a_norm; its output is wq_b's input
        total += c * (a.kv_lora_rank + a.qk_rope_head_dim) + 4 + inputs_and_updates("wkv_b")  # kv_a_norm
        total += c  # (tokens, 1, 1) scale of the unrotated query part
        total += 2 * c * h * qk  # q, k
        if sdpa and a.v_head_dim < qk:
            total += 2 * c * h * qk  # v and the output, zero-padded to the query width
        else:
            total += c * h * (a.qk_nope_head_dim + a.v_head_dim) + c * h * a.v_head_dim  # wkv_b's output (holds v), out
        total += 4 * h  # lse
    total += inputs_and_updates("wo")
    if not m.is_moe_layer(layer):
        total += _swiglu_bytes(shapes, t, "", u, c)
    else:
        k, e = m.moe.num_experts_per_tok, m.moe.num_experts
        total += 4 * e + 8 * k + 4 * k + 4  # softmax, top-k indices, renormalised weights, their sum
        # Per choice: ``order`` (int64, the expert-order gather of its weight saves it); when the rows are
        # padded (CPU bf16/fp16) also ``slot`` (int64) and the weight placed by ``index_copy`` (float32).
        total += k * (8 + (8 + 4 if padded else 0))
        total += k * expert_row_bytes(m, targets, rank, dropout, c, layer)
        total += _swiglu_bytes(shapes, t, "shared_experts.", u, c) if "shared_experts.w1" in shapes else 0
    if dropout > 0:
        total += sum((c + 1) * shapes[n][0] for n in t if shapes[n][2] == 1)  # the stacked experts: per row, above
    return float(total)


def _inputs_and_updates(shapes: dict[str, tuple[int, int, int]], t: set[str], u: int, c: int, *names: str) -> int:
    """One saved copy of the input the named linears share, if any is adapted (``t``), and their A x
    (``u`` bytes each)."""
    return (c * shapes[names[0]][0] if t & set(names) else 0) + u * len(t & set(names))


def _swiglu_bytes(shapes: dict[str, tuple[int, int, int]], t: set[str], prefix: str, u: int, c: int) -> int:
    """Saved per row by a SwiGLU (``prefix`` "", "experts.", "shared_experts."): w1 x, w3 x and
    silu(w1 x) (the product is w2's input), and its adapted linears' inputs and A x."""
    f = shapes[prefix + "w1"][1]
    return (3 * c * f + _inputs_and_updates(shapes, t, u, c, prefix + "w1", prefix + "w3")
            + _inputs_and_updates(shapes, t, u, c, prefix + "w2"))


def expert_row_bytes(m: ModelArgs, targets: list[str], rank: int, dropout: float, c: int, layer: int) -> int:
    """Bytes saved per row of block ``layer``'s routed experts (a (token, choice), or a padding row):
    the expert's SwiGLU (its input is the gathered copy ``x[token]``), the expert's output and the
    row's weight (saved by the weighting product, in the compute dtype), the weighted output (saved
    by ``index_add_``), the row's int64 token index (the gather's and ``index_add_``'s), and with
    LoRA dropout each adapted projection's dropped input and mask."""
    shapes = linear_shapes(m, layer)
    t = {name for name in shapes if _targeted(targets, name)}
    row = _swiglu_bytes(shapes, t, "experts.", c * rank, c) + 2 * c * m.dim + c + 8
    if dropout > 0:
        row += sum((c + 1) * shapes[n][0] for n in t if shapes[n][2] > 1)
    return row


def _fused_lora_a(m: ModelArgs, targets: list[str], dropout: float, nf4: bool, layer: int) -> bool:
    """Whether block ``layer``'s routed experts compute w1's and w3's ``A x`` as one grouped product
    (``GroupedExperts.forward``: both adapted, no dropout; NF4's experts do not)."""
    return (m.is_moe_layer(layer) and not nf4 and dropout == 0
            and _targeted(targets, "experts.w1") and _targeted(targets, "experts.w3"))


def saved_bytes_per_layer(
    m: ModelArgs, targets: list[str], rank: int, dropout: float, c: int, layer: int | None = None,
    *, nf4: bool = False, padding_rows: float = 0.0,
) -> float:
    """Bytes block ``layer`` saves that do not scale with tokens: an MoE layer's (experts,) int32 row
    offsets and, when w1's and w3's ``lora_A`` run as one grouped product, their concatenation
    (experts, 2 rank, dim) in the compute dtype, which that product saves for its input gradient;
    plus ``padding_rows`` routed rows (``expert_row_bytes`` each). Padding rows exist on CPU in
    bf16/fp16 only (``MoeLayer.forward`` rounds each expert's rows up to ``CPU_ROW_MULTIPLE``):
    their number depends on the routing, so the CPU plan takes its expectation
    (``expected_padding_rows``), and the byte-exact test counts the rows of its own routing."""
    layer = m.n_layers - 1 if layer is None else layer
    if not m.is_moe_layer(layer):
        return 0.0
    e = m.moe.num_experts
    total = 4 * e + padding_rows * expert_row_bytes(m, targets, rank, dropout, c, layer)
    if _fused_lora_a(m, targets, dropout, nf4, layer):
        total += e * 2 * rank * m.dim * c
    return float(total)


def expected_padding_rows(m: ModelArgs, layer: int, device: str, c: int) -> float:
    """Zero rows block ``layer`` adds to its routed experts: on CPU in bf16/fp16 each expert's rows
    are rounded up to a multiple of M = ``CPU_ROW_MULTIPLE``, (M - 1) / 2 rows per expert on average
    when the row counts' remainders are spread evenly; none on GPU or in float32."""
    if device != "cpu" or c == 4 or not m.is_moe_layer(layer):
        return 0.0
    return m.moe.num_experts * (CPU_ROW_MULTIPLE - 1) / 2


def selective_saved_bytes_per_token(
    m: ModelArgs, targets: list[str], rank: int, c: int, layer: int | None = None, *, sdpa: bool = True
) -> float:
    """Bytes per token that ``checkpoint: selective`` keeps in block ``layer`` besides its input,
    with k routed rows per token (``selective_kept_bytes_per_expert_row`` each; CPU padding rows
    come on top).

    The policy (finetune/parallel.py) keeps every matrix product's output except those as wide as the
    block's feed-forward up-projections (w1 and w3: ``hidden_dim``, or an MoE layer's routed and
    shared experts' widths) and the routed experts' LoRA updates ``B u``, and the attention kernel's
    output and float32 log-sum-exp. So: the outputs of the other linears (a 2-D LoRA update is
    accumulated into the same tensor), each LoRA linear's rank-sized ``A x``, the router's logits,
    and per routed row the experts' w2 output and each adapted projection's ``A x`` (w1's and w3's
    as one (rows, 2 rank) product when fused: the same bytes). The attention output is as wide as
    the query head when ``sdpa`` pads narrower values (``saved_bytes_per_token``).
    """
    layer = m.n_layers - 1 if layer is None else layer
    shapes = linear_shapes(m, layer)
    up = _up_widths(shapes)

    def kept(width: int) -> int:
        return c * width if width not in up else 0

    total = 0
    for name, (_, o, n) in shapes.items():
        if n == 1:
            total += kept(o) + (c * rank if _targeted(targets, name) else 0)
    if m.mla is None:
        out_dim = m.head_dim
    else:
        qk = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim
        out_dim = max(qk, m.mla.v_head_dim) if sdpa else m.mla.v_head_dim
    total += c * m.n_heads * out_dim + 4 * m.n_heads  # attention output, log-sum-exp
    if m.is_moe_layer(layer):
        total += kept(m.moe.num_experts)  # router logits
        total += m.moe.num_experts_per_tok * selective_kept_bytes_per_expert_row(m, targets, rank, c, layer)
    return float(total)


def _up_widths(shapes: dict[str, tuple[int, int, int]]) -> set[int]:
    return {shapes[n][1] for n in ("w1", "experts.w1", "shared_experts.w1") if n in shapes}


def selective_kept_bytes_per_expert_row(m: ModelArgs, targets: list[str], rank: int, c: int, layer: int) -> int:
    """Bytes the selective policy keeps per routed row (padding rows too): the outputs of the routed
    experts' products not as wide as an up-projection (w2's) and each adapted projection's ``A x``."""
    shapes = linear_shapes(m, layer)
    up = _up_widths(shapes)
    return sum((c * o if o not in up else 0) + (c * rank if _targeted(targets, name) else 0)
               for name, (i, o, n) in shapes.items() if n > 1)


def _widest_rows(m: ModelArgs, layer: int) -> int:
    """Hidden values per token of block ``layer``'s widest feed-forward part: the dense one, the
    routed experts' (k rows per token) or the shared experts'."""
    if not m.is_moe_layer(layer):
        return m.hidden_dim
    f = m.expert_hidden_dim
    return max(m.moe.num_experts_per_tok * f, m.moe.num_shared_experts * f)


def estimate(
    m: ModelArgs, args: TrainArgs, *, n_devices: int = 1, device: str = "cuda", capacity: float | None = None,
    images: Images | None = None,
) -> Plan:
    """Peak memory per device of ``train.py`` with this model and config on ``n_devices``; ``images``
    (a multimodal model's image data) builds the vision side and counts it (``vision_terms``)."""
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    c = _DTYPE_BYTES[precision]
    lora = args.lora.enable
    targets = list(args.lora.target_modules) if lora else list(LINEARS)
    rank = args.lora.rank if lora else 0
    counts = param_counts(m, targets, rank)
    nf4 = getattr(args, "quantization", "none") == "nf4"
    N, L = n_devices, m.n_layers
    T = args.seq_len * args.batch_size  # tokens of one micro-batch on one device
    parts: dict[str, float] = {}
    notes: list[str] = []

    # Weights. Frozen base in the compute dtype (trainable ones in float32 when fine-tuning fully).
    # NF4 stores the LoRA-targeted linears in 4 bits, stacked experts included (model/quant.py).
    base_b = 4 if not lora else c
    nf4_saving = (c - NF4_BYTES) if nf4 else 0.0
    block_base = counts["block"] * base_b - nf4_saving * counts["block_quantizable"]
    base_total = (counts["layers"] + counts["root"]) * base_b - nf4_saving * counts["layers_quantizable"]
    parts["base weights (sharded)"] = base_total / N
    if nf4:
        rest = counts["layers"] - counts["layers_quantizable"]
        notes.append(
            f"quantization: nf4 stores the LoRA-adapted linears' {counts['layers_quantizable'] / 1e9:.2f}B parameters "
            f"in 4 bits (stacked experts included: model/quant.py); the other {rest / 1e9:.2f}B block parameters "
            f"(norms, router, linears without an adapter) and the root stay in {precision}"
        )
    vision = vision_params(m)
    with_images = images is not None and images.per_row > 0
    if with_images and not vision:
        raise ConfigError(f"{images.per_row} image(s) per row were planned for a model without a vision encoder "
                          "(no params.json 'vision_encoder' block): drop --images-per-row, or plan a multimodal model.")
    if vision and not with_images:  # model.multimodal: carried from the base folder into merged outputs
        notes.append(f"the {vision / 1e9:.2f}B-parameter vision encoder and adapter ({vision * c / GB:.2f} GB in "
                     f"{precision}) are not loaded for text training: carried from the base folder into merged "
                     "checkpoints and exports, so not in the peak (image data: --images-per-row)")
    # All-gathered copies in the compute dtype: the root for the whole step, two blocks at a time.
    # Alone (N = 1), frozen weights are left out of FSDP (finetune/parallel.py): only the adapters
    # are gathered.
    frozen_gathered = N > 1 or not lora
    block_unsharded = (block_base * c / base_b if frozen_gathered else 0.0) + counts["block_lora"] * c
    gathered = "unsharded root + 2 blocks" if frozen_gathered else "unsharded adapters of 2 blocks"
    parts[gathered] = (counts["root"] * c if frozen_gathered else 0.0) + 2 * block_unsharded
    if frozen_gathered and N > 1 and device == "cpu":
        # The all-gather briefly holds the root twice: gloo receives into a flat buffer of its own and
        # copies it into FSDP's output buffer, from which FSDP copies the parameters out. On GPU that
        # moment (forward's start) holds no activations; on CPU the heap still holds the previous
        # step's freed memory, so the second copy adds to the peak.
        parts["all-gather: second copy of the root"] = counts["root"] * c
    trainable = counts["layers_lora"] if lora else counts["layers"] + counts["root"]
    parts["trainable: fp32 + grads + AdamW"] = (trainable * 16 - (base_total if not lora else 0)) / N
    if not lora:
        notes.append("full fine-tuning: trainable weights are counted in fp32 once, with grads and AdamW")
    if args.compile:
        notes.append("compile: true: activations as in eager mode, an upper bound (compiled graphs keep as much "
                     "or less); compiled kernels' workspaces are not counted")

    # Activations. Saved tensors of every block, or only block inputs + one recomputed block.
    # FlexAttention (GPU default) takes narrower values as they are; per-document SDPA pads them.
    flex = device == "cuda" and args.attention != "sdpa" and m.head_dim >= 16
    r, dropout = (rank, args.lora.dropout) if lora else (0, 0.0)
    pad = [expected_padding_rows(m, i, device, c) for i in range(L)]  # CPU bf16/fp16 MoE only
    saved = [  # bytes per layer
        T * saved_bytes_per_token(m, targets, r, dropout, c, i, sdpa=not flex, padded=pad[i] > 0)
        + saved_bytes_per_layer(m, targets, r, dropout, c, i, nf4=nf4, padding_rows=pad[i])
        for i in range(L)
    ]
    largest = max(saved)  # the block recomputed at the peak
    mode = args.checkpoint_mode
    if mode == "full":
        parts["activations: block inputs"] = L * T * m.dim * c
    elif mode == "selective":
        kept = sum(
            T * selective_saved_bytes_per_token(m, targets, r, c, i, sdpa=not flex)
            + (pad[i] * selective_kept_bytes_per_expert_row(m, targets, r, c, i) if pad[i] else 0.0)
            for i in range(L)
        )
        parts["activations: block inputs + kept products"] = L * T * m.dim * c + kept
    else:
        parts["activations: saved tensors"] = sum(saved)
    recompute = largest if mode != "none" else 0.0
    # Eager SDPA saves, for backward, the additive (len, len) mask of every document longer than a
    # layer's window; the layers of one window share it (model/attention.py). Bound: every row one
    # document of seq_len tokens. FlexAttention's block mask is small; the compiled op recomputes its masks.
    short = {w for w in m.layer_windows if w is not None and w < args.seq_len}
    if short and not flex and not args.compile:
        parts["activations: sliding-window masks"] = len(short) * args.batch_size * args.seq_len**2 * c
    # Backward of one block: gradients of its largest intermediates (three (tokens, hidden) at once:
    # the dense feed-forward's, the routed rows' (k per token) or the shared experts').
    backward = recompute + 3 * T * c * max(_widest_rows(m, i) for i in range(L))
    if nf4:
        quantized = [i * o * e for layer in range(L) for n, (i, o, e) in linear_shapes(m, layer).items()
                     if _targeted(targets, n)]
        backward += max(quantized, default=0) * c  # one dequantized weight (or expert stack) at a time

    # Loss: final norm's input, hidden states, target rows and their gradient, logits chunk.
    n_targets = T  # upper bound: every token a target
    chunk = min(args.loss_chunk_size, n_targets)
    loss_fixed = T * m.dim * 2 * c + 2 * n_targets * m.dim * c
    # The chunk's compute-dtype logits (then their gradient) + one float32 block of them.
    block = block_rows(device, m.vocab_size, chunk) if c < 4 else 0
    logits = (chunk * c + block * 4) * m.vocab_size
    parts["loss: hidden states"] = loss_fixed
    which = (
        "loss chunk"
        if logits >= backward
        else ("recomputed block + its backward" if mode != "none" else "block backward")
    )
    parts[f"transient: {which}"] = max(logits, backward)
    if device == "cpu":
        parts["CPU allocator slack (calibrated)"] = (
            CPU_RUNTIME + CPU_HEAP_PER_LOGIT * T * m.vocab_size + CPU_HEAP_BLOCKS * largest
        )
        if m.moe is not None:
            parts["CPU kernel caches: per-expert products (calibrated)"] = CPU_MOE_KERNEL_CACHES
    if with_images:
        text_dynamic = sum(v for k, v in parts.items() if k.startswith(("activations", "loss", "transient")))
        vision_parts, vision_notes = vision_terms(m, args, images, n_devices=N, c=c, frozen_gathered=frozen_gathered,
                                                  text_dynamic=text_dynamic, cpu=device == "cpu")
        parts |= vision_parts
        notes += vision_notes
    parts["fixed overhead"] = CUDA_CONTEXT if device == "cuda" else CPU_BASELINE
    return Plan(device, n_devices, parts, capacity, notes, images)


def advise(m: ModelArgs, args: TrainArgs, plan: Plan) -> list[str]:
    """Knobs that make a plan fit, each with the estimate it gives; when no single knob is
    enough, the ones that help most. Empty when the plan fits."""
    if plan.fits:
        return []
    cap = plan.capacity

    def total(a: TrainArgs, n: int = plan.n_devices) -> float:
        return estimate(m, a, n_devices=n, device=plan.device, capacity=cap, images=plan.images).total

    knobs: list[tuple[str, float]] = []
    if args.checkpoint_mode == "none":
        knobs.append(("checkpoint: selective (keep matmul outputs)", total(replace(args, checkpoint="selective"))))
    if args.checkpoint_mode != "full":
        knobs.append(("checkpoint: true (full activation checkpointing)", total(replace(args, checkpoint=True))))
    if args.batch_size > 1:
        a = replace(args, batch_size=1, num_microbatches=args.num_microbatches * args.batch_size)
        knobs.append(
            (f"batch_size: 1, num_microbatches: {a.num_microbatches} (same tokens per step)", total(a))
        )
    seq = args.seq_len
    held = 0 if plan.images is None else plan.images.per_row * image_shape(m, plan.images.size)[1]
    while seq > 512 and seq // 2 >= held and total(replace(args, seq_len=seq)) > cap:  # a row still holds the images
        seq //= 2
    if seq != args.seq_len:
        knobs.append((f"seq_len: {seq}", total(replace(args, seq_len=seq))))
    n = plan.n_devices
    while plan.device == "cuda" and n < 1024 and total(args, n) > cap:  # CPU processes share one RAM
        n *= 2
    if n != plan.n_devices:
        knobs.append((f"{n} GPUs (FSDP shards weights and optimizer state)", total(args, n)))
    if args.lora.enable and args.lora.rank > 8:
        a = replace(args, lora=replace(args.lora, rank=8))
        knobs.append(("lora.rank: 8", total(a)))
    if args.lora.enable and getattr(args, "quantization", None) == "none":
        knobs.append(
            ("quantization: nf4 (QLoRA: 4-bit base weights)", total(replace(args, quantization="nf4")))
        )
    if args.loss_chunk_size > 512:
        knobs.append(("loss_chunk_size: 512", total(replace(args, loss_chunk_size=512))))
    knobs = [(k, t) for k, t in knobs if t < plan.total * 0.98]  # only knobs that matter
    fitting = [(k, t) for k, t in knobs if t <= cap]
    shown = fitting or sorted(knobs, key=lambda kt: kt[1])[:3]
    def note(t: float) -> str:
        if not fitting:
            return " (not enough alone)"
        return " (tight: over 90%)" if t > 0.9 * cap else ""

    return [f"{k} -> {t / GB:.1f} GB{note(t)}" for k, t in shown]


def describe(m: ModelArgs, args: TrainArgs, plan: Plan) -> str:
    counts = param_counts(m, list(args.lora.target_modules), args.lora.rank)
    n_params = counts["layers"] + counts["root"]
    vision = vision_params(m)
    what = "GPU" if plan.device == "cuda" else "CPU process"
    lines = [
        f"model: {n_params / 1e9:.2f}B parameters (dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}"
        + (f"; {_moe_kind(m)}" if m.moe else "")
        + (", tied embeddings" if m.tied_embeddings else "")
        + f"; attention: {_attention_kinds(m)}"
        + (f"; rotary: YaRN x{m.yarn.factor:g} over {m.yarn.original_max_position_embeddings}" if m.yarn else "")
        + ")"
        + (f" + a {vision / 1e9:.2f}B vision encoder and adapter ("
           + ("built: image data" if plan.images is not None and plan.images.per_row else "not loaded") + ")"
           if vision else ""),
        "training: "
        + (
            f"LoRA rank {args.lora.rank} on {', '.join(m.present_targets(args.lora.target_modules))} "
            f"({counts['layers_lora'] / 1e6:.1f}M trainable)"
            if args.lora.enable
            else "full fine-tuning"
        )
        + f"; {args.seq_len} x {args.batch_size} tokens per micro-batch; activation checkpointing "
        + args.checkpoint_mode
        + f"; {plan.n_devices} {what}(s)",
        "",
        f"{'per ' + what:<44} {'GB':>8}",
    ]
    for name, value in plan.parts.items():
        lines.append(f"  {name:<42} {value / GB:8.2f}")
    lines.append(f"  {'total (peak)':<42} {plan.total / GB:8.2f}")
    lines += [f"note: {n}" for n in plan.notes]
    if plan.capacity is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"\n{verdict}: {plan.total / GB:.1f} GB of {plan.capacity / GB:.0f} GB "
            f"({100 * plan.total / plan.capacity:.0f}%)"
        )
        if plan.fits and plan.total > 0.9 * plan.capacity:
            lines.append("tight: allocator fragmentation can add 5-10% on top of this estimate")
        if plan.device == "cuda":
            n = fewest_devices(m, args, plan.capacity, plan.images)
            lines.append(
                f"fewest {plan.capacity / GB:.0f} GB GPUs that fit this config: "
                + (f"{n} ({estimate(m, args, n_devices=n, capacity=plan.capacity, images=plan.images).total / GB:.1f} GB each)"
                   if n else f"none up to {MAX_DEVICES}")
            )
        knobs = advise(m, args, plan)
        if knobs:
            lines.append("to make it fit, change one of:")
            lines += [f"  - {k}" for k in knobs]
    return "\n".join(lines)


MAX_DEVICES = 4096


def fewest_devices(m: ModelArgs, args: TrainArgs, capacity: float, images: Images | None = None) -> int | None:
    """The smallest GPU count whose plan fits ``capacity`` bytes per GPU (None: none up to
    MAX_DEVICES): more GPUs shard weights and optimizer state; activations and the gathered root
    and blocks stay, so past some count nothing helps."""
    n = 1
    while estimate(m, args, n_devices=n, capacity=capacity, images=images).total > capacity:
        if n == MAX_DEVICES:
            return None
        n = min(n + max(1, n // 8), MAX_DEVICES)  # every count up to 8, then steps of 1/8
    return n


def _moe_kind(m: ModelArgs) -> str:
    """ "128 experts (top 4, 1 shared, 2048 wide) in 36 of 36 layers" or "8 experts (top 2)"."""
    moe = m.moe
    shared = f", {moe.num_shared_experts} shared" if moe.num_shared_experts else ""
    wide = f", {moe.expert_hidden_dim} wide" if moe.expert_hidden_dim else ""
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    layers = f" in {n_moe} of {m.n_layers} layers" if n_moe < m.n_layers else ""
    return f"{moe.num_experts} experts (top {moe.num_experts_per_tok}{shared}{wide}){layers}"


def _attention_kinds(m: ModelArgs) -> str:
    """Layers per window, in order of first use: "9 full + 27 window 4096 layers"; latent attention
    (``model.mla``) is said with its ranks."""
    if m.mla is not None:
        a = m.mla
        return (f"{m.n_layers} latent (MLA: q rank {a.q_lora_rank}, kv rank {a.kv_lora_rank}, "
                f"qk {a.qk_nope_head_dim}+{a.qk_rope_head_dim}, v {a.v_head_dim}) layers")
    windows = m.layer_windows
    kinds = [("full" if w is None else f"window {w}", windows.count(w)) for w in dict.fromkeys(windows)]
    return " + ".join(f"{n} {kind}" for kind, n in kinds) + " layers"


def _load_model_args(path: str) -> ModelArgs:
    p = Path(path)
    if path in KNOWN_MODELS and not p.exists():  # a folder of that name wins
        return KNOWN_MODELS[path]
    if p.is_file() and p.name in ("params.json", "config.json"):
        p = p.parent
    if not p.is_dir():
        raise ConfigError(
            f"model folder '{path}' not found: give --model a folder with params.json (the file alone is enough "
            f"for planning) or a known release ({', '.join(KNOWN_MODELS)}), or set model_id_or_path in the config."
        )
    return load_model_args(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other --key value pairs override the YAML, as for train.py.",
    )
    parser.add_argument("--train_yaml", required=True)
    parser.add_argument(
        "--gpus", type=int, default=None,
        help="world size (processes sharding the model); default: this machine's GPUs, else 1 CPU process",
    )
    parser.add_argument(
        "--gpu-memory",
        "--gpu_memory",
        type=float,
        default=None,
        dest="gpu_memory",
        help="GB per GPU (default: this machine's GPU, else 80)",
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None,
        help="default: cuda with a GPU here or --gpus/--gpu-memory given, else cpu (this machine's RAM)",
    )
    parser.add_argument(
        "--model",
        help="folder with params.json (or the file), or a known release, instead of model_id_or_path: "
        + ", ".join(KNOWN_MODELS),
    )
    parser.add_argument(
        "--images-per-row",
        "--images_per_row",
        default="0",
        dest="images_per_row",
        help="image data for a multimodal model: max-size images per row of seq_len tokens, or 'fill' (as many "
        "as a row holds: the worst case); default 0, text-only data (the vision side is not built)",
    )
    parser.add_argument(
        "--image-size",
        "--image_size",
        type=int,
        default=None,
        dest="image_size",
        help="side in pixels of the planned images (default: the model's max_image_size, the largest the tokenizer keeps)",
    )
    opts, overrides = parser.parse_known_args(argv)
    try:
        if opts.gpus is not None and opts.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {opts.gpus}.")
        args = load_train_args(opts.train_yaml, overrides)
        m = _load_model_args(opts.model or args.model_id_or_path)
        images = _images(m, args, opts.images_per_row, opts.image_size)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device, n, capacity, assumed = target(opts.device, opts.gpus, opts.gpu_memory)
    print(f"planning for {assumed}\n")
    plan = estimate(m, args, n_devices=n, device=device, capacity=capacity, images=images)
    print(describe(m, args, plan))
    return 0 if plan.fits else 1


def _images(m: ModelArgs, args: TrainArgs, per_row: str, size: int | None) -> Images | None:
    """The image data the command line asks for (None: text-only), checked against the model and seq_len."""
    if per_row != "fill" and not per_row.isdigit():
        raise ConfigError(f"--images-per-row must be a count or 'fill', got {per_row!r}.")
    if per_row == "0":
        if size is not None:
            raise ConfigError(f"--image-size {size} needs image data: add --images-per-row N (or fill), "
                              "or drop --image-size.")
        return None
    if vision_args(m) is None:
        raise ConfigError(f"--images-per-row {per_row}: this model has no vision encoder (no params.json "
                          "'vision_encoder' block), so it cannot train on images; plan a multimodal model.")
    largest = max_image_size(m)
    step = token_side(m.extra["vision_encoder"])
    size = largest if size is None else size
    if not step <= size <= largest:
        raise ConfigError(f"--image-size {size}: choose from {step} to {largest} px (the model's max_image_size; "
                          "the tokenizer shrinks larger images to it).")
    fits = images_filling(m, args.seq_len, size)
    count = fits if per_row == "fill" else int(per_row)
    if count > fits or count == 0:
        tokens = image_shape(m, size)[1]
        raise ConfigError(f"--images-per-row {per_row}: a {size} px image is {tokens} tokens, so a row of seq_len "
                          f"{args.seq_len} holds {fits}; ask for at most that, a smaller --image-size, or a longer seq_len.")
    return Images(count, size)


def target(device: str | None, gpus: int | None, gpu_memory: float | None) -> tuple[str, int, float, str]:
    """(device, world size, bytes per device, what was assumed, in words) from the command line,
    filling what it leaves out from this machine: its GPUs, else its RAM."""
    import torch

    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        device = "cuda" if here or gpus is not None or gpu_memory is not None else "cpu"
    if device == "cpu":
        n = gpus or 1
        ram = _ram_bytes()
        return device, n, ram / n, (
            f"{n} CPU process(es) sharing this machine's {ram / GB:.1f} GB of available RAM"
            + ("" if here or gpus is not None else " (no GPU here; --gpus N [--gpu-memory GB] plans for GPUs)")
        )
    n = gpus or here or 1
    if gpu_memory is not None:
        return device, n, gpu_memory * GB, f"{n} GPU(s) of {gpu_memory:g} GB (--gpu-memory)"
    if here:
        props = torch.cuda.get_device_properties(0)
        return device, n, props.total_memory, f"{n} GPU(s) of {props.total_memory / GB:.0f} GB ({props.name}, this machine's)"
    return device, n, 80 * GB, f"{n} GPU(s) of 80 GB (assumed: no GPU here; --gpu-memory GB to change)"


def _ram_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return math.inf


if __name__ == "__main__":
    sys.exit(main())
