"""Will it fit? Peak memory per GPU (or per CPU process) of a training run, before running it.

    python -m utils.estimate_memory --train_yaml example/7B.yaml --gpus 8 [--gpu-memory 80]
    python -m utils.estimate_memory --train_yaml example/7B.yaml --gpus 1 --model /path/params.json \\
        --seq_len 8192 --checkpoint false            # overrides as train.py takes them
    python -m utils.estimate_memory --train_yaml CONFIG.yaml --device cpu --precision bf16
    python -m utils.estimate_memory --train_yaml example/mistral_small_3.2.yaml --model mistral-small-3.2-24b

The model shape comes from ``params.json`` (or a Hugging Face ``config.json``) in the config's
``model_id_or_path``, or from ``--model``: a folder holding only params.json is enough, or the name
of a release this file knows (``KNOWN_MODELS``). The estimate is a sum of explicit terms, each
printed; docs/memory.md derives them and gives the measured accuracy. In short, per device with
N = world size (FSDP2 shards every block and the root over all N):

- frozen base weights in the compute dtype (NF4 linears at 4.13 bits with ``quantization: nf4``) / N;
  a multimodal release's vision encoder and adapter are counted (``vision_params``) and said, but are
  not in the peak: text training never loads them (``model.multimodal`` carries them from the base folder);
  plus the all-gathered *unsharded* root (embedding, final norm, output: alive through forward and
  backward) and the largest block unsharded twice (the one computing and the one prefetched); on
  one device, frozen weights are not FSDP's, so only the adapters are gathered; on CPU with
  N > 1, a second copy of the root (the all-gather's buffers over gloo);
- adapters in float32 + their gradients + AdamW's two moments (16 bytes per trainable parameter) / N;
- activations: the tensors autograd saves per layer and token (``saved_bytes_per_token``, which
  equals what a real block saves; a test checks it), for every layer without activation
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
from model.args import Llama4Scaling, ModelArgs, YarnArgs
from model.configs import load_model_args
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
# Bytes per NF4 weight, statistics included, for a 7B-sized matrix (the share is the same for any large one).
NF4_BYTES = quantized_weight_bytes(4096 * 14336) / (4096 * 14336)
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class Plan:
    device: str  # "cuda" or "cpu"
    n_devices: int
    parts: dict[str, float]  # bytes per device, in print order; their sum is the peak
    capacity: float | None = None  # bytes per device (GPU memory, or RAM / processes on CPU)
    notes: list[str] = field(default_factory=list)

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


def linear_shapes(m: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer of a block."""
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    return {
        "wq": (m.dim, q),
        "wk": (m.dim, kv),
        "wv": (m.dim, kv),
        "wo": (q, m.dim),
        "w1": (m.dim, m.hidden_dim),
        "w2": (m.hidden_dim, m.dim),
        "w3": (m.dim, m.hidden_dim),
    }


def _copies(m: ModelArgs, name: str) -> int:
    """How many times a block holds this linear: once per expert for the feed-forward of MoE."""
    return m.moe.num_experts if (m.moe and name in ("w1", "w2", "w3")) else 1


def param_counts(m: ModelArgs, targets: list[str], rank: int) -> dict[str, int]:
    """Parameters of one block (base, adapters, base weights of LoRA-targeted linears) and of the root."""
    shapes = linear_shapes(m)
    block = sum(i * o * _copies(m, n) for n, (i, o) in shapes.items()) + 2 * m.dim
    block += m.dim * m.moe.num_experts if m.moe else 0  # router
    targeted = sum(i * o * _copies(m, n) for n, (i, o) in shapes.items() if n in targets)
    lora = sum(rank * (i + o) * _copies(m, n) for n, (i, o) in shapes.items() if n in targets)
    root = (1 if m.tied_embeddings else 2) * m.vocab_size * m.dim + m.dim  # embedding, output (unless tied), norm
    return {"block": block, "block_targeted": targeted, "block_lora": lora, "root": root}


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
    # Devstral Small 1.0 / 1.1 (2505 / 2507): Mistral Small 3.1 fine-tunes whose releases drop the vision
    # encoder (model cards); their own params.json was not found, so the shape is Small 3.1's.
    "devstral-small-24b": ModelArgs(**_SMALL_24B),
}


def saved_bytes_per_token(m: ModelArgs, targets: list[str], rank: int, dropout: float, c: int) -> float:
    """Bytes autograd saves for backward, per token, in one transformer block (eager, frozen base).

    ``c`` is the compute dtype's size. A frozen linear saves nothing of its input; a LoRA linear saves
    its input (for lora_A's gradient; one tensor shared by wq/wk/wv and by w1/w3) and the rank-sized
    ``A x`` (for lora_B's). RMSNorm saves its input and the (tokens, 1) float32 rsqrt. Attention
    (SDPA per document, or FlexAttention) saves q, k, v after rotary, its output and a float32
    log-sum-exp per head; the output is copied once more into the (tokens, heads*head_dim) input
    of wo. SwiGLU saves w1's and w3's outputs and silu(w1 x); the product is w2's input.
    Dropout on the adapters adds, per LoRA linear, its dropped input and a one-byte mask.
    """
    shapes = linear_shapes(m)
    qd = m.n_heads * m.head_dim
    t = set(targets)
    lora_u = c * rank  # A x of one LoRA linear
    total = 2 * (c * m.dim + 4)  # two RMSNorms
    total += (c * m.dim if t & {"wq", "wk", "wv"} else 0) + lora_u * len(t & {"wq", "wk", "wv"})
    total += c * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim + c * qd + 4 * m.n_heads  # q k v, out, lse
    total += (c * qd + lora_u) if "wo" in t else 0
    ffn = 3 * c * m.hidden_dim + (c * m.dim if t & {"w1", "w3"} else 0)
    ffn += lora_u * len(t & {"w1", "w2", "w3"}) + (c * m.hidden_dim if "w2" in t else 0)
    if m.moe is None:
        total += ffn
    else:
        k = m.moe.num_experts_per_tok
        # Router: top-k indices (int64) and softmax weights (float32). Per routed token, the expert's
        # feed-forward as above (its input is a gathered copy), its output and gathered mixing
        # weight (saved by the weighting product), the weighted output (saved by index_add_) and
        # two int64 indices.
        total += 8 * k + 4 * k + k * (ffn + 2 * c * m.dim + c + 16)
    if dropout > 0:
        total += sum((c + 1) * shapes[n][0] for n in t) * (m.moe.num_experts_per_tok if m.moe else 1)
    return float(total)


def selective_saved_bytes_per_token(m: ModelArgs, targets: list[str], rank: int, c: int) -> float:
    """Bytes per token that ``checkpoint: selective`` keeps in one block besides its input.

    The policy (finetune/parallel.py) keeps every matrix product's output except the
    (tokens, hidden_dim) ones, and the attention kernel's output and float32 log-sum-exp. So: the
    outputs of wq, wk, wv, wo and w2 (a LoRA update is accumulated into the same tensor), each
    LoRA linear's rank-sized ``A x`` (w1's and w3's too), and for MoE the router's logits and,
    per routed token, the expert's w2 output and its ``A x``.
    """
    qd, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    t = set(targets)
    total = c * (qd + 2 * kv + m.dim) + c * rank * len(t & {"wq", "wk", "wv", "wo"})
    total += c * qd + 4 * m.n_heads  # attention output, log-sum-exp
    ffn = c * m.dim + c * rank * len(t & {"w1", "w2", "w3"})
    if m.moe is None:
        total += ffn
    else:
        total += c * m.moe.num_experts + m.moe.num_experts_per_tok * ffn
    return float(total)


def estimate(
    m: ModelArgs, args: TrainArgs, *, n_devices: int = 1, device: str = "cuda", capacity: float | None = None
) -> Plan:
    """Peak memory per device of ``train.py`` with this model and config on ``n_devices``."""
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
    base_b = 4 if not lora else c
    block_base = counts["block"] * base_b
    if nf4:
        block_base -= counts["block_targeted"] * (c - NF4_BYTES)
    base_total = L * block_base + counts["root"] * base_b
    parts["base weights (sharded)"] = base_total / N
    vision = vision_params(m)
    if vision:  # model.multimodal: carried from the base folder into merged outputs, never built
        notes.append(f"the {vision / 1e9:.2f}B-parameter vision encoder and adapter ({vision * c / GB:.2f} GB in "
                     f"{precision}) are not loaded for text training: carried from the base folder into merged "
                     "checkpoints and exports, so not in the peak")
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
    trainable = L * counts["block_lora"] if lora else L * counts["block"] + counts["root"]
    parts["trainable: fp32 + grads + AdamW"] = (trainable * 16 - (base_total if not lora else 0)) / N
    if not lora:
        notes.append("full fine-tuning: trainable weights are counted in fp32 once, with grads and AdamW")
    if args.compile:
        notes.append("compile: true: activations as in eager mode, an upper bound (compiled graphs keep as much "
                     "or less); compiled kernels' workspaces are not counted")

    # Activations. Saved tensors of every block, or only block inputs + one recomputed block.
    per_layer = saved_bytes_per_token(m, targets, rank if lora else 0, args.lora.dropout if lora else 0.0, c)
    mode = args.checkpoint_mode
    if mode == "full":
        parts["activations: block inputs"] = L * T * m.dim * c
        recompute = T * per_layer
    elif mode == "selective":
        kept = selective_saved_bytes_per_token(m, targets, rank if lora else 0, c)
        parts["activations: block inputs + kept products"] = L * T * (m.dim * c + kept)
        recompute = T * per_layer
    else:
        parts["activations: saved tensors"] = L * T * per_layer
        recompute = 0.0
    # Eager SDPA saves, for backward, the additive (len, len) mask of every document longer than a
    # layer's window; the layers of one window share it (model/attention.py). Bound: every row one
    # document of seq_len tokens. FlexAttention's block mask is small; the compiled op recomputes its masks.
    flex = device == "cuda" and args.attention != "sdpa" and m.head_dim >= 16
    short = {w for w in m.layer_windows if w is not None and w < args.seq_len}
    if short and not flex and not args.compile:
        parts["activations: sliding-window masks"] = len(short) * args.batch_size * args.seq_len**2 * c
    # Backward of one block: gradients of its largest intermediates (three (tokens, hidden) at once).
    k = m.moe.num_experts_per_tok if m.moe else 1
    backward = recompute + 3 * T * k * m.hidden_dim * c
    if nf4:
        i, o = max(linear_shapes(m).values(), key=lambda s: s[0] * s[1])
        backward += i * o * c  # one dequantized weight at a time

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
            CPU_RUNTIME + CPU_HEAP_PER_LOGIT * T * m.vocab_size + CPU_HEAP_BLOCKS * T * per_layer
        )
    parts["fixed overhead"] = CUDA_CONTEXT if device == "cuda" else CPU_BASELINE
    return Plan(device, n_devices, parts, capacity, notes)


def advise(m: ModelArgs, args: TrainArgs, plan: Plan) -> list[str]:
    """Knobs that make a plan fit, each with the estimate it gives; when no single knob is
    enough, the ones that help most. Empty when the plan fits."""
    if plan.fits:
        return []
    cap = plan.capacity

    def total(a: TrainArgs, n: int = plan.n_devices) -> float:
        return estimate(m, a, n_devices=n, device=plan.device, capacity=cap).total

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
    while seq > 512 and total(replace(args, seq_len=seq)) > cap:
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
    n_params = m.n_layers * counts["block"] + counts["root"]
    vision = vision_params(m)
    what = "GPU" if plan.device == "cuda" else "CPU process"
    lines = [
        f"model: {n_params / 1e9:.2f}B parameters (dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}"
        + (f", {m.moe.num_experts} experts" if m.moe else "")
        + (", tied embeddings" if m.tied_embeddings else "")
        + f"; attention: {_attention_kinds(m)}"
        + (f"; rotary: YaRN x{m.yarn.factor:g} over {m.yarn.original_max_position_embeddings}" if m.yarn else "")
        + ")"
        + (f" + a {vision / 1e9:.2f}B vision encoder and adapter (not loaded)" if vision else ""),
        "training: "
        + (
            f"LoRA rank {args.lora.rank} on {', '.join(args.lora.target_modules)} "
            f"({m.n_layers * counts['block_lora'] / 1e6:.1f}M trainable)"
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
        knobs = advise(m, args, plan)
        if knobs:
            lines.append("to make it fit, change one of:")
            lines += [f"  - {k}" for k in knobs]
    return "\n".join(lines)


def _attention_kinds(m: ModelArgs) -> str:
    """Layers per window, in order of first use: "9 full + 27 window 4096 layers"."""
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
    opts, overrides = parser.parse_known_args(argv)
    try:
        if opts.gpus is not None and opts.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {opts.gpus}.")
        args = load_train_args(opts.train_yaml, overrides)
        m = _load_model_args(opts.model or args.model_id_or_path)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device, n, capacity, assumed = target(opts.device, opts.gpus, opts.gpu_memory)
    print(f"planning for {assumed}\n")
    plan = estimate(m, args, n_devices=n, device=device, capacity=capacity)
    print(describe(m, args, plan))
    return 0 if plan.fits else 1


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
