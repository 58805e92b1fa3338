#!/usr/bin/env bash
# A/B of our training step between two commits, alternating runs in fresh processes:
#   bash benchmarks/ab_train_step.sh BEFORE_REV AFTER_REV [repeats] -- [utils.bench_train_step options]
# Prints tokens/s and peak RSS of each run and the median of the per-pair ratios after/before.
set -euo pipefail
before=$1 after=$2 repeats=${3:-3}
shift 3; [ "${1:-}" = "--" ] && shift
opts=("$@")
root=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/before" >/dev/null 2>&1; git -C "$root" worktree remove --force "$tmp/after" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -f --detach "$tmp/before" "$before" >/dev/null 2>&1
git -C "$root" worktree add -f --detach "$tmp/after" "$after" >/dev/null 2>&1
# The benchmark itself (utils/bench_train_step.py and the workload it imports) comes from the current
# tree, so both sides are measured the same way, also revisions from before it moved into utils/.
cp "$root/utils/bench_train_step.py" "$tmp/bench.py"
for side in before after; do cp "$root/utils/workload.py" "$tmp/$side/utils/workload.py"; done
for i in $(seq "$repeats"); do
  for side in before after; do
    (cd "$tmp/$side" && PYTHONPATH="$tmp/$side" python "$tmp/bench.py" "${opts[@]}" 2>/dev/null | tail -1 \
      | sed "s/^/$side /") >> "$tmp/results"
  done
done
python - "$tmp/results" <<'PY'
import json, statistics, sys
rows = [line.split(" ", 1) for line in open(sys.argv[1])]
before = [json.loads(r) for s, r in rows if s == "before"]
after = [json.loads(r) for s, r in rows if s == "after"]
for b, a in zip(before, after):
    print(f"before {b['tokens_per_s']:8.1f} tok/s {b['peak_mem_gb']:.2f} GB | after {a['tokens_per_s']:8.1f} tok/s {a['peak_mem_gb']:.2f} GB")
speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for b, a in zip(before, after))
mem = statistics.median(a["peak_mem_gb"] / b["peak_mem_gb"] for b, a in zip(before, after))
print(f"median ratio after/before: tokens/s {speed:.2f}x, peak memory {mem:.2f}x")
PY
