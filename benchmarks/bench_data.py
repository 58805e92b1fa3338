"""Data pipeline benchmark: tokenization, packing, time to first batch, cached re-run, peak memory.

    python benchmarks/bench_data.py --conversations 100000 --tokenizer spm --workdir /tmp/bench_data

Generates a synthetic instruct data set (multi-turn chats, system prompts, weight-0 turns and
function-calling conversations), then
  1. cold run: tokenizes it into an empty cache (check_data), builds the train loader, times the first
     batch and packing throughput, reports the filler fraction;
  2. cached run, in a fresh process: time to first batch and peak RSS with the cache already built.
Figures are printed as JSON. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SYLLABLES = "ka lo mi ne ru ta shi po ven dra ex in on al er gu tor mas pli que zo ba fe".split()
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]


def _text(rng: random.Random, vocab: list[str], n: int) -> str:
    out = []
    for i in range(n):
        w = rng.choice(vocab)
        out.append(w + ("." if i % 12 == 11 else "," if i % 7 == 6 else ""))
    return " ".join(out)


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijkLMNOPQ0123456789") for _ in range(9))


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    with open(path, "w") as f:
        for _i in range(n):
            kind = rng.random()
            if kind < 0.15:  # function calling: call, result, answer
                cid = _call_id(rng)
                q = _text(rng, vocab, 4)
                msgs = [
                    {"role": "user", "content": _text(rng, vocab, rng.randint(10, 60))},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": cid,
                                "type": "function",
                                "function": {"name": "search_docs", "arguments": json.dumps({"query": q})},
                            }
                        ],
                    },
                    {
                        "role": "tool",
                        "tool_call_id": cid,
                        "content": json.dumps({"result": _text(rng, vocab, rng.randint(20, 80))}),
                    },
                    {"role": "assistant", "content": _text(rng, vocab, rng.randint(20, 120))},
                ]
                sample = {"messages": msgs, "tools": _TOOLS}
            else:
                msgs = []
                if kind < 0.4:
                    msgs.append({"role": "system", "content": _text(rng, vocab, rng.randint(5, 30))})
                for _t in range(rng.randint(1, 4)):
                    msgs.append({"role": "user", "content": _text(rng, vocab, rng.randint(5, 80))})
                    a = {"role": "assistant", "content": _text(rng, vocab, rng.randint(10, 150))}
                    if rng.random() < 0.1:
                        a["weight"] = 0
                    msgs.append(a)
                sample = {"messages": msgs}
            f.write(json.dumps(sample) + "\n")


def _tokenizer(name: str):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v3(is_tekken=name == "tekken").instruct_tokenizer


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's after fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold(args: argparse.Namespace) -> dict:
    from finetune.data.args import DataArgs
    from finetune.data.validation import check_data

    it = _tokenizer(args.tokenizer)
    data_args = DataArgs(instruct_data=str(args.data))
    t0 = time.perf_counter()
    report = check_data(data_args, it, args.seq_len, cache_dir=args.cache)
    t_tok = time.perf_counter() - t0
    assert report.ok, report.errors[:3]
    tokens = sum(s.tokens for s in report.sources)
    loader, t_first, pack_rate = _first_batch_and_packing(data_args, it, args)
    return {
        "conversations": report.sources[0].lines,
        "samples_after_chunking": report.sources[0].samples,
        "tokens": tokens,
        "tokenize_s": round(t_tok, 2),
        "tokenize_tokens_per_s": round(tokens / t_tok),
        "first_batch_after_tokenize_s": round(t_first, 3),
        "pack_tokens_per_s": round(pack_rate),
        "filler_fraction": round(loader.filler_fraction, 5),
        "peak_rss_main_mb": round(_rss_mb()),
        "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def _first_batch_and_packing(data_args, it, args: argparse.Namespace):
    """(loader, seconds to the first batch, packed tokens/s over the next ``args.batches`` batches)."""
    from finetune.data.loader import build_train_loader

    t0 = time.perf_counter()
    loader = build_train_loader(
        data_args, it, seq_len=args.seq_len, batch_size=args.batch_size, seed=0, rank=0, world_size=1,
        cache_dir=args.cache,
    )
    next(loader)
    t1 = time.perf_counter()
    n = sum(len(next(loader).x) for _ in range(args.batches))
    return loader, t1 - t0, n / (time.perf_counter() - t1)


def cached(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    from finetune.data.args import DataArgs

    it = _tokenizer(args.tokenizer)
    t1 = time.perf_counter()
    _, t_first, pack_rate = _first_batch_and_packing(DataArgs(instruct_data=str(args.data)), it, args)
    return {
        "imports_and_tokenizer_s": round(t1 - t0, 3),
        "cached_first_batch_s": round(t_first, 3),
        "cached_pack_tokens_per_s": round(pack_rate),
        "cached_peak_rss_mb": round(_rss_mb()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=100_000)
    p.add_argument("--tokenizer", choices=["spm", "tekken"], default="spm")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--batches", type=int, default=200, help="batches timed for packing throughput")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_data"))
    p.add_argument("--phase", choices=["all", "cached"], default="all", help="cached: only the cached re-run")
    args = p.parse_args()
    args.data = args.workdir / f"conversations_{args.conversations}.jsonl"
    args.cache = args.workdir / f"cache_{args.tokenizer}"
    if args.phase == "cached":
        print(json.dumps(cached(args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.data.exists():
        generate(args.data, args.conversations)
    shutil.rmtree(args.cache, ignore_errors=True)
    result = {
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "cpus": len(os.sched_getaffinity(0)),
        "file_mb": round(args.data.stat().st_size / 2**20, 1),
    }
    result.update(cold(args))
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        "cached",
        "--tokenizer",
        args.tokenizer,
        "--seq_len",
        str(args.seq_len),
        "--batch_size",
        str(args.batch_size),
        "--batches",
        str(args.batches),
        "--workdir",
        str(args.workdir),
        "--conversations",
        str(args.conversations),
    ]
    result.update(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
