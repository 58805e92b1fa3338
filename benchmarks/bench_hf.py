"""The Hugging Face baseline: the training step of bench_train_step.py on transformers + PEFT.

Same model shape (``MistralForCausalLM`` with random weights), LoRA rank 16 (``lora_alpha`` 32,
i.e. our ``scaling`` 2.0) on all seven linears, frozen bf16 base, fp32 adapters (PEFT's default
``autocast_adapter_dtype``), AdamW on the adapters, gradient clipping at 1.0, and the same packed
rows (same document-length distribution and seed, checked by a fingerprint).

Packed documents are isolated the way transformers supports without flash-attention: rotary
``position_ids`` restart at 0 for every document, **no** 2-D attention mask and ``use_cache=False``.
transformers then detects the packing from the position ids and builds a block-diagonal causal
mask (one (tokens x tokens) mask per forward, used by every layer). A 2-D mask, or a cache (the
config's default ``use_cache=True`` creates one even in training), silently switches that off and
lets documents attend to each other; ``--check_isolation`` shows both.

The script runs in its own virtual environment, ``benchmarks/.venv-hf``, so the project's
dependencies are never touched; started with another interpreter it creates that environment
(torch first, the CPU build, so pip never pulls a CUDA one) and re-runs itself inside it:

    python benchmarks/bench_hf.py --setup                 # create/refresh the venv only
    python benchmarks/bench_hf.py --check_isolation       # packed logits == per-document logits?
    python benchmarks/bench_hf.py --preset small --seq_len 1024 --threads 2 --no_checkpoint

Prints one JSON line (keys as bench_train_step.py: tokens_per_s, peak_mem_gb = ru_maxrss, ...).
``benchmarks/side_by_side.py`` alternates it with ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-hf"
TORCH_REQ = "torch==2.13.0"
HF_REQS = ("transformers==5.24.0", "peft==0.21.2", "numpy")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.workload import PRESETS, packed_rows  # noqa: E402  (NumPy only: the same shapes and rows as ours)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(refresh: bool = False) -> Path:
    """Create benchmarks/.venv-hf with torch (CPU build, installed first), transformers and peft."""
    python = venv_python()
    marker = VENV / "requirements.txt"
    wanted = "\n".join((TORCH_REQ, *HF_REQS)) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted and not refresh:
        return python
    print(f"[bench_hf] creating {VENV} ({', '.join((TORCH_REQ, *HF_REQS))})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_REQ], check=True)  # first: else a CUDA build comes with transformers
    subprocess.run([*pip, *HF_REQS], check=True)
    marker.write_text(wanted)
    return python


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


# ---------------------------------------------------------------- batches (same as ours)


def fingerprint(rows) -> str:
    """Hash of the rows (tokens, targets, mask, document lengths); equal rows give equal hashes."""
    h = hashlib.sha256()
    for x, y, mask, seqlens in rows:
        for a in (x, y, mask):
            h.update(a.tobytes())
        h.update(json.dumps([int(s) for s in seqlens]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the HF model


def build_hf(shape: dict, *, dtype, attn: str, max_len: int, sliding_window: int | None = None):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["dim"],
        intermediate_size=shape["hidden_dim"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=sliding_window,
        max_position_embeddings=max(max_len, 4096),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the storage dtype: no float32 copy in RSS
    try:
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def positions(seqlens: list[int]):
    import torch

    return torch.cat([torch.arange(n) for n in seqlens])  # restart at 0 for every document


def check_isolation() -> dict:
    """Logits of a packed row versus each document run alone, per attn_implementation, plus the
    two traps (a 2-D all-ones mask; use_cache left at the config's default True)."""
    import torch

    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=128)
    seqlens = [5, 11, 3, 9]
    ids = torch.randint(0, shape["vocab_size"], (sum(seqlens),), generator=torch.Generator().manual_seed(0))
    pos = positions(seqlens)
    report = {}
    for attn in ("sdpa", "eager"):
        model = build_hf(shape, dtype=torch.float32, attn=attn, max_len=64).eval()
        with torch.no_grad():
            alone = torch.cat(
                [model(input_ids=d[None], use_cache=False).logits[0] for d in ids.split(seqlens)]
            )
            packed = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
            with_mask = model(
                input_ids=ids[None],
                position_ids=pos[None],
                use_cache=False,
                attention_mask=torch.ones_like(ids)[None],
            ).logits[0]
            with_cache = model(input_ids=ids[None], position_ids=pos[None]).logits[0]

        def err(t, alone=alone):
            return float((t - alone).abs().max())

        report[attn] = {
            "packed_no_mask_no_cache": err(packed),
            "with_2d_mask": err(with_mask),
            "with_default_cache": err(with_cache),
        }
    report["isolated"] = {attn: r["packed_no_mask_no_cache"] < 1e-4 for attn, r in report.items()}
    report["traps_leak"] = all(
        r["with_2d_mask"] > 1e-2 and r["with_default_cache"] > 1e-2
        for k, r in report.items()
        if k in ("sdpa", "eager")
    )
    return report


def bench(opts) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    if opts.threads:
        torch.set_num_threads(opts.threads)
    shape = dict(PRESETS[opts.preset])
    if opts.n_layers:
        shape["n_layers"] = opts.n_layers
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.precision]
    model = build_hf(shape, dtype=dtype, attn=opts.attn_implementation, max_len=opts.seq_len)
    if not opts.no_checkpoint:
        # Non-reentrant, like ours (torch.utils.checkpoint around each block) and PEFT's advice.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lora = LoraConfig(
        r=opts.rank,
        lora_alpha=2 * opts.rank,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # adapters upcast to float32 (autocast_adapter_dtype=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "PEFT adapters should be float32"
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    rows = packed_rows(
        opts.warmup + opts.steps,
        opts.seq_len,
        opts.batch_size,
        opts.doc_min,
        opts.doc_max,
        shape["vocab_size"],
    )
    times = []
    for i, (x, y, mask, seqlens) in enumerate(rows):
        # One packed row of batch_size * seq_len tokens, exactly as ours sees it.
        input_ids = torch.from_numpy(x)[None]
        shift_labels = torch.from_numpy(np.where(mask, y, -100))[None]  # target of position i
        pos = positions(seqlens)[None]
        t0 = time.perf_counter()
        out = model(
            input_ids=input_ids,
            position_ids=pos,
            labels=shift_labels,
            shift_labels=shift_labels,
            use_cache=False,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {
        "stack": "hf+peft",
        "preset": opts.preset,
        "n_layers": shape["n_layers"],
        "seq_len": opts.seq_len,
        "batch_size": opts.batch_size,
        "precision": opts.precision,
        "attention": opts.attn_implementation,
        "checkpoint": not opts.no_checkpoint,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "step_s": step,
        "tokens_per_s": opts.seq_len * opts.batch_size / step,
        "peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "batches": fingerprint(rows),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "final_loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup", action="store_true", help="create (or --refresh) the venv and exit")
    parser.add_argument("--refresh", action="store_true", help="reinstall the venv's packages")
    parser.add_argument("--check_isolation", action="store_true", help="packed == per-document logits check")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--n_layers", type=int)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--doc_min", type=int, default=64)
    parser.add_argument("--doc_max", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--no_checkpoint", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    opts = parser.parse_args()
    if opts.batch_size != 1:
        # Ours packs batch_size rows into one stream of tokens; one HF row of the same tokens would
        # be the same work, but keep the comparison to the batch 1.
        parser.error("--batch_size: only 1 is compared")

    if not in_venv():
        python = ensure_venv(refresh=opts.refresh)
        if opts.setup:
            return
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])
    if opts.setup:
        return
    result = check_isolation() if opts.check_isolation else bench(opts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
