"""Fine-tune a small model end to end on this machine, with no downloads.

    python -m utils.quickstart [--workdir quickstart_run] [--max_steps 300]

What it does, with the same tools you will use on a real model:
  1. creates a small Mistral-architecture model (seeded random weights, mistral-common's real v3
     tokenizer) in the standard folder layout: params.json, consolidated.safetensors, tokenizer.model.v3;
  2. writes a synthetic instruct data set whose answers can be checked (reverse a list of letters),
     as train.jsonl and a held-out eval.jsonl with prompts that never occur in training;
  3. runs ``python -m utils.validate_data --measure`` on the config it wrote (checks the data and
     times a short real run for the ETA);
  4. measures held-out exact-match accuracy of the untrained model (greedy, KV-cached decoding);
  5. trains LoRA adapters with ``torchrun train.py``: one process per GPU, or without a GPU one
     process with the cores other work leaves idle (the fastest on CPU, see docs/benchmarks.md);
  6. measures the accuracy again with the trained adapters, prints a few generations and compares
     the training time with validate_data's ETA.

Why this task and size: a random-init model's embeddings and output layer stay frozen under LoRA, so
the adapters must learn to route each letter to the right output position (attention, learnable
from the prompt) and to map input embeddings onto output rows (a linear map of rank about the
alphabet size). Reversal of 4 letters needs both and is not solvable by memorising: the eval prompts
are new letter combinations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from finetune.checkpointing import checkpoint_dir
from model.configs import params_from_args

REPO = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The one time claim, also in README.md and docs/tools.md (a test keeps them equal); measured in
# docs/benchmarks.md.
TIME_CLAIM = "1-2 minutes on 2 CPU cores"


@dataclass
class Task:
    n_letters: int = 4
    alphabet: str = LETTERS

    def sample(self, rng: random.Random) -> tuple[str, str]:
        letters = rng.sample(self.alphabet, self.n_letters)
        return " ".join(letters), " ".join(reversed(letters))

    def prompt(self, letters: str) -> str:
        return f"Reverse: {letters}"


def model_args(dim: int, n_layers: int):
    from model.args import ModelArgs

    head_dim = 64
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        hidden_dim=2 * dim,
        n_heads=dim // head_dim,
        n_kv_heads=max(1, dim // head_dim // 2),
        norm_eps=1e-5,
        vocab_size=32768,
        rope_theta=10000.0,
    )


def create_model(folder: Path, dim: int, n_layers: int, seed: int) -> None:
    """A seeded random base model in the official folder layout, with the real v3 tokenizer."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from model.checkpoint import save_model_folder
    from model.transformer import Transformer

    args = model_args(dim, n_layers)
    model = Transformer(args)
    model.init_weights(seed)
    save_model_folder(folder, params_from_args(args), model.state_dict())
    shutil.copy2(MistralTokenizer.v3().instruct_tokenizer.tokenizer.file_path, folder / "tokenizer.model.v3")


def write_data(folder: Path, task: Task, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Train and eval files with disjoint prompts (the eval answers cannot be memorised)."""
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    while len(pairs) < n_train + n_eval:
        question, answer = task.sample(rng)
        pairs.setdefault(question, answer)
    items = list(pairs.items())
    out = []
    for name, chunk in (("train.jsonl", items[:n_train]), ("eval.jsonl", items[n_train:])):
        path = folder / name
        with path.open("w") as f:
            for question, answer in chunk:
                messages = [
                    {"role": "user", "content": task.prompt(question)},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
        out.append(path)
    return out[0], out[1]


def write_config(
    path: Path, workdir: Path, train: Path, eval_: Path, opts: argparse.Namespace, nproc: int
) -> None:
    config = {
        "model_id_or_path": str(workdir / "model"),
        "run_dir": str(workdir / "run"),
        "data": {
            "instruct_data": str(train),
            "eval_instruct_data": str(eval_),
            "cache_dir": str(workdir / "cache"),
        },
        "seq_len": opts.seq_len,
        # At least 2 packed rows per optimizer step whatever the device count (the lr is tuned for it).
        "batch_size": max(1, 2 // nproc),
        "max_steps": opts.max_steps,
        "optim": {"lr": opts.lr, "weight_decay": 0.0, "pct_start": 0.05},
        "lora": {"rank": opts.rank, "scaling": 2.0},
        "seed": opts.seed,
        "log_freq": max(1, opts.max_steps // 10),
        "eval_freq": 0,
        "no_eval": False,
        "ckpt_freq": 0,
        "num_ckpt_keep": 1,
        "checkpoint": False,  # activation checkpointing only costs time at this size
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def accuracy(
    model, tokenizer, eval_file: Path, task: Task, batch: int = 64
) -> tuple[float, list[tuple[str, str, str]]]:
    """Held-out exact match of greedy generations; returns (accuracy, [(prompt, expected, generated)])."""
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from model.generate import generate

    rows = [json.loads(line)["messages"] for line in eval_file.read_text().splitlines()]
    prompts = [m[0]["content"] for m in rows]
    expected = [m[1]["content"] for m in rows]
    tokens = [
        tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=p)])).tokens
        for p in prompts
    ]
    eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
    answer_len = max(
        len(tokenizer.instruct_tokenizer.tokenizer.encode(e, bos=False, eos=False)) for e in expected
    )
    generated: list[str] = []
    for i in range(0, len(tokens), batch):
        outs = generate(model, tokens[i : i + batch], max_new_tokens=answer_len + 2, eos_id=eos)
        generated += [tokenizer.decode(o).strip() for o in outs]
    correct = sum(g == e for g, e in zip(generated, expected, strict=True))
    return correct / len(expected), list(zip(prompts, expected, generated, strict=True))


def load_for_eval(model_folder: Path, adapter: Path | None, rank: int, vision: bool = False):
    from model.args import LoraArgs
    from model.checkpoint import load_adapters
    from model.transformer import Transformer

    lora = LoraArgs(rank=rank) if adapter is not None else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer.from_folder(
        model_folder, device=device, dtype=torch.float32, lora=lora, attention_backend="sdpa", vision=vision
    )
    if adapter is not None:
        load_adapters(model, adapter)
    return model.eval()


def launch_processes() -> tuple[int, int, str]:
    """(processes, threads each, why): one process per GPU; without a GPU, one process with the
    cores that other work leaves idle.

    On CPU, more processes only split the same cores and add FSDP's all-gathers of the frozen
    weights over gloo. And OpenMP threads that share their cores with other work wait for each
    other at every barrier: on a busy machine two threads ran several times slower than one, on
    an idle one faster (docs/benchmarks.md). So the threads are the cores minus the 1-minute load
    average.
    """
    if torch.cuda.is_available():
        return torch.cuda.device_count(), 1, "one process per GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(cores, cores - round(load)))
    return 1, threads, f"{cores} cores, load average {load:.1f} at the start"


def fresh_workdir(path: str, marker: str) -> Path:
    """``path`` emptied for a new run: it may hold only an earlier run of this tool (its ``marker``
    config file); any other non-empty folder is refused, never deleted."""
    workdir = Path(path).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / marker).is_file():
            raise SystemExit(f"error: --workdir {workdir} exists and is not a {marker.removesuffix('.yaml')} "
                             "folder; choose another.")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def run_command(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: command failed with exit status {result.returncode}: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m utils.quickstart", description=f"{__doc__.splitlines()[0]} It takes {TIME_CLAIM}."
    )
    parser.add_argument(
        "--workdir", default="quickstart_run", help="where the model, data and run go (replaced)"
    )
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--n_train", type=int, default=20000)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    nproc, threads, why = launch_processes()  # before this run adds to the load
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    workdir = fresh_workdir(opts.workdir, "quickstart.yaml")
    task = Task()
    print(
        f"[1/6] model: dim {opts.dim}, {opts.n_layers} layers, vocab 32768 (v3 tokenizer) -> {workdir / 'model'}"
    )
    create_model(workdir / "model", opts.dim, opts.n_layers, opts.seed)
    train, eval_ = write_data(workdir, task, opts.n_train, opts.n_eval, opts.seed)
    print(
        f"[2/6] data: {opts.n_train} training and {opts.n_eval} held-out samples, e.g. "
        f"{train.read_text().splitlines()[0]}"
    )
    config = workdir / "quickstart.yaml"
    write_config(config, workdir, train, eval_, opts, nproc)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": str(threads),
    }
    print("[3/6] validating the data and timing a short run for the ETA")
    stats = workdir / "validate_data.json"
    run_command(
        [
            sys.executable,
            "-m",
            "utils.validate_data",
            "--train_yaml",
            str(config),
            "--measure",
            "--num_gpus",
            str(nproc),
            "--stats_json",
            str(stats),
        ],
        env,
    )
    eta = json.loads(stats.read_text())["plan"]["eta_seconds"]

    tokenizer = MistralTokenizer.from_file(str(workdir / "model" / "tokenizer.model.v3"))
    torch.set_num_threads(max(1, threads * nproc))
    before, _ = accuracy(load_for_eval(workdir / "model", None, opts.rank), tokenizer, eval_, task)
    print(f"[4/6] held-out exact match before fine-tuning: {before:.1%}")

    print(f"[5/6] training LoRA adapters: {nproc} process(es) x {threads} thread(s) ({why})")
    t0 = time.perf_counter()
    run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "train.py",
            str(config),
        ],
        env,
    )
    train_seconds = time.perf_counter() - t0

    adapter = checkpoint_dir(workdir / "run", opts.max_steps) / "consolidated" / "lora.safetensors"
    after, samples = accuracy(load_for_eval(workdir / "model", adapter, opts.rank), tokenizer, eval_, task)
    print(f"[6/6] held-out exact match after fine-tuning: {after:.1%} (before: {before:.1%})")
    for prompt, expected, got in samples[:5]:
        print(
            f"    {prompt!r:>24} -> {got!r:<12} {'ok' if got == expected else 'expected ' + repr(expected)}"
        )
    total = time.perf_counter() - start
    print(
        f"Done in {total:.0f} s (training {train_seconds:.0f} s; validate_data --measure predicted "
        f"{eta:.0f} s, {100 * (eta - train_seconds) / train_seconds:+.0f}%). Try the adapter yourself:\n"
        f"  python -m utils.generate --model {workdir / 'model'} --lora {adapter} --prompt 'Reverse: q u i t'"
    )
    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "seconds": total,
        "train_seconds": train_seconds,
        "eta_seconds": eta,
        "processes": nproc,
        "threads": threads,
    }
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
