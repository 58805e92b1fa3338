#!/usr/bin/env bash
# Activation checkpointing modes side by side, alternating fresh processes of the same commit:
#   bash benchmarks/ab_checkpoint_modes.sh [repeats] -- [bench_train_step.py options]
# Prints tokens/s and peak memory of each run and the median of per-round ratios against 'full'.
set -euo pipefail
repeats=${1:-3}
shift 1; [ "${1:-}" = "--" ] && shift
opts=("$@")
here=$(cd "$(dirname "$0")" && pwd)
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for i in $(seq "$repeats"); do
  for mode in full selective none; do
    python "$here/bench_train_step.py" "${opts[@]}" --checkpoint "$mode" 2>/dev/null | tail -1 >> "$results"
  done
done
python - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by = {m: [r for r in runs if r["checkpoint"] == m] for m in ("full", "selective", "none")}
for m, rs in by.items():
    print(f"{m:9} " + "  ".join(f"{r['tokens_per_s']:7.1f} tok/s {r['peak_mem_gb']:.2f} GB" for r in rs))
for m in ("selective", "none"):
    speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(by[m], by["full"]))
    mem = statistics.median(a["peak_mem_gb"] / b["peak_mem_gb"] for a, b in zip(by[m], by["full"]))
    print(f"{m}/full: tokens/s {speed:.2f}x, peak memory {mem:.2f}x")
PY
