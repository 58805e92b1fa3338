"""Fine-grained MoE training step (Mistral Small 4 shape, scaled down): ours against transformers + PEFT.

    python3 benchmarks/bench_moe_vs_peft.py                     # 3 alternated pairs at seq_len 1024
    python3 benchmarks/bench_moe_vs_peft.py --pairs 5 --precision fp32
    python3 benchmarks/bench_moe_vs_peft.py --worker ours       # one run, one JSON line

One config.json-style dict (``CONFIGS``) is the model on both sides: transformers'
``Mistral4Config(**config)`` builds ``Mistral4ForCausalLM``; ``model.configs.load_model_args``
reads the same dict, written as a folder's config.json, into our ``ModelArgs`` (latent attention
with a query bottleneck, 128 routed experts chosen top-4, one shared expert, the first layer
dense), so the shapes cannot drift apart. Weights are random on both sides (not the same values;
the routing is therefore not the same either). ``--precision`` is the compute dtype of both sides
and the storage dtype of their frozen base; adapters and AdamW state are float32 on both.

Ours: the model exactly as training builds it (``finetune.build.build_sharded``: frozen base in the
compute dtype, float32 adapters, FSDP2 over one process, fused chunked loss), ``LoraArgs(rank=16)``
with its default targets (every attention projection, dense FFN, routed experts' w1/w2/w3 as
stacked per-expert adapters, shared experts), ``finetune.trainer.train_step`` with its AdamW.

Theirs: PEFT LoRA r=16, ``lora_alpha`` 32 (= our scaling 2.0), on ``q_a_proj``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` (the
dense FFN and the shared experts) by ``target_modules``, and on the routed experts' fused 3-D
parameters ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` by ``target_parameters``
(one adapter per expert; on the fused gate_up one adapter covers both halves, where ours has one
each for w1 and w3). The router gets no adapter on either side. transformers' experts
implementation is its default, ``grouped_mm`` (``torch._grouped_mm`` over tokens sorted by
expert, as ours). Frozen base in the compute dtype, float32 adapters (PEFT's default), AdamW over
the adapters with gradient clipping at 1.0, ``attn_implementation="sdpa"``, ``use_cache=False``.

A step is forward + backward of the next-token loss over one sequence of ``--seq_len`` tokens plus
the optimizer step, no activation checkpointing on either side. Each run is a fresh process timing
``--steps`` steps after ``--warmup``; its peak memory is its own ``ru_maxrss`` (as in
``side_by_side.py``). Pairs alternate the order (ours first, then theirs first, ...); the ratios
are medians of per-pair ratios. The driver imports neither torch nor the project: a child starts
with its parent's ``ru_maxrss``, so the parent must stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_YARN = {  # Mistral4Config's default rope_parameters (the release's), as a config.json spells them
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
}

CONFIGS = {
    # Mistral Small 4's layout, narrowed: 128 routed experts (top-4), one shared expert, a dense first layer.
    "small": {
        "model_type": "mistral4", "vocab_size": 32768, "hidden_size": 512, "intermediate_size": 1536,
        "moe_intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "n_shared_experts": 1, "n_routed_experts": 128, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "q_lora_rank": 256, "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "rope_interleave": True, "tie_word_embeddings": False,
        "rope_parameters": _YARN,
    },
}
HF_TARGET_MODULES = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj"]
HF_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _rows(opts, vocab: int):
    from utils.workload import packed_rows

    # doc_min = doc_max = seq_len: one document filling the row.
    return packed_rows(opts.warmup + opts.steps, opts.seq_len, 1, opts.seq_len, opts.seq_len, vocab)


def _result(opts, times: list[float], loss: float, trainable: int, **extra) -> dict:
    step = statistics.median(times)
    return {"stack": opts.worker, "config": opts.config, "seq_len": opts.seq_len, "precision": opts.precision,
            "step_s": step, "tokens_per_s": opts.seq_len / step,
            "peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "trainable_params": trainable, "final_loss": loss, **extra}


def _our_args(config: str):
    """Our ModelArgs for ``CONFIGS[config]``, read the way an HF folder's config.json is."""
    import tempfile

    from model.configs import load_model_args

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(CONFIGS[config]))
        return load_model_args(folder)


def run_ours(opts) -> dict:
    import torch

    from finetune import distributed as D
    from finetune.args import TrainArgs
    from finetune.build import build_sharded, resolve_precision
    from finetune.data.loader import Batch
    from finetune.trainer import TrainState, build_optimizer, train_step
    from model.args import LoraArgs
    from model.experts import GroupedLoRALinear
    from model.lora import lora_modules
    from utils.bench_train_step import _random_init

    torch.set_num_threads(opts.threads)
    device = D.init_distributed()
    model_args = _our_args(opts.config)
    lora = LoraArgs(rank=16)
    precision = resolve_precision(opts.precision, device)
    model = build_sharded(model_args, lora, device, precision, attention_backend="sdpa", checkpoint_mode="none",
                          loss_chunk_size=2048)
    _random_init(model)
    adapted = lora_modules(model)
    assert any(isinstance(m, GroupedLoRALinear) for m in adapted.values()), "routed experts have no adapters"
    train_args = TrainArgs(model_id_or_path="-", run_dir="-", num_microbatches=1, lora=lora)
    optimizer = build_optimizer(model, train_args)
    state, times = TrainState(), []
    for i, row in enumerate(_rows(opts, model_args.vocab_size)):
        t0 = time.perf_counter()
        loss, _, _ = train_step(model, optimizer, [Batch(*row)], train_args, state, precision, device)
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = _result(opts, times, float(loss), trainable, torch=torch.__version__, adapted_layers=len(adapted))
    D.destroy()
    return result


def run_hf(opts) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import Mistral4Config, Mistral4ForCausalLM

    torch.set_num_threads(opts.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.precision]
    config = Mistral4Config(**{k: v for k, v in CONFIGS[opts.config].items() if k != "model_type"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the storage dtype: no float32 copy in RSS
    try:
        torch.manual_seed(0)
        model = Mistral4ForCausalLM._from_config(config, attn_implementation="sdpa", experts_implementation="grouped_mm")
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGET_MODULES,
                      target_parameters=HF_TARGET_PARAMETERS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)  # adapters upcast to float32 (autocast_adapter_dtype=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "PEFT adapters should be float32"
    wrapped = [n for n, _ in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert wrapped, "PEFT put no adapter on the routed experts"
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    times = []
    for i, (x, y, mask, _) in enumerate(_rows(opts, config.vocab_size)):
        input_ids = torch.from_numpy(x)[None]
        shift_labels = torch.from_numpy(np.where(mask, y, -100))[None]  # target of position i
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, shift_labels=shift_labels, labels=shift_labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    experts = model.base_model.model.config._experts_implementation
    return _result(opts, times, loss, sum(p.numel() for p in params), torch=torch.__version__,
                   transformers=transformers.__version__, peft=peft.__version__, experts_implementation=experts)


def _child(stack: str, opts) -> dict:
    cmd = [sys.executable, __file__, "--worker", stack, "--config", opts.config, "--seq_len", str(opts.seq_len),
           "--precision", opts.precision, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
           "--threads", str(opts.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def drive(opts) -> None:
    t_start, pairs = time.time(), []
    for rep in range(opts.pairs):
        pair = {}
        for stack in ("ours", "hf") if rep % 2 == 0 else ("hf", "ours"):
            load = os.getloadavg()[0]
            pair[stack] = r = _child(stack, opts) | {"load1": load}
            print(f"[{time.time() - t_start:5.0f}s] pair {rep} {stack:4s} {r['tokens_per_s']:7.1f} tok/s "
                  f"{r['peak_mem_gb']:.2f} GB  loss {r['final_loss']:.3f}  load {load:.2f}", flush=True)
        pairs.append(pair)
    if opts.json_out:
        opts.json_out.write_text(json.dumps(pairs, indent=1))
    speed = [p["ours"]["tokens_per_s"] / p["hf"]["tokens_per_s"] for p in pairs]
    mem = [p["ours"]["peak_mem_gb"] / p["hf"]["peak_mem_gb"] for p in pairs]

    def med(stack: str, key: str) -> float:
        return statistics.median(p[stack][key] for p in pairs)

    hf = pairs[0]["hf"]
    print(f"\n{opts.config}, {opts.precision}, seq_len {opts.seq_len}, {opts.threads} threads, {opts.pairs} pairs x "
          f"{opts.steps} steps (+{opts.warmup} warm-up); torch {hf['torch']}, transformers {hf['transformers']}, "
          f"peft {hf['peft']}, experts_implementation {hf['experts_implementation']}; trainable parameters "
          f"ours {pairs[0]['ours']['trainable_params']:,}, theirs {hf['trainable_params']:,}")
    print("| ours tok/s | HF+PEFT tok/s | **tok/s ours/HF** | ours peak RSS | HF+PEFT peak RSS | **RSS ours/HF** | load |")
    print("|---|---|---|---|---|---|---|")
    loads = [p[s]["load1"] for p in pairs for s in p]
    print(f"| {med('ours', 'tokens_per_s'):.0f} | {med('hf', 'tokens_per_s'):.0f} | **{statistics.median(speed):.2f}×** "
          f"({', '.join(f'{s:.2f}' for s in speed)}) | {med('ours', 'peak_mem_gb'):.2f} GB | "
          f"{med('hf', 'peak_mem_gb'):.2f} GB | **{statistics.median(mem):.2f}×** "
          f"({', '.join(f'{m:.2f}' for m in mem)}) | {min(loads):.1f}–{max(loads):.1f} |")
    print(f"\ntotal {time.time() - t_start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "hf"], help="run one side once and print its JSON line")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--pairs", type=int, default=3, help="alternated (ours, theirs) pairs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--json_out", type=Path, help="write every run's result here")
    opts = parser.parse_args()
    if opts.steps < 1:
        parser.error(f"--steps must be at least 1, got {opts.steps}")
    if opts.worker:
        print(json.dumps(run_ours(opts) if opts.worker == "ours" else run_hf(opts)))
    else:
        drive(opts)


if __name__ == "__main__":
    main()
