#!/usr/bin/env bash
# Variants of one training-step benchmark side by side, alternating fresh processes of one commit:
#   bash benchmarks/ab_variants.sh REPEATS 'LABEL=extra options' ... -- [bench_train_step.py options]
# Prints each run's tokens/s, peak memory and first step (compilation included), and for every
# variant the median of per-round ratios against the first one.
set -euo pipefail
repeats=$1; shift
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
opts=("$@")
here=$(cd "$(dirname "$0")" && pwd)
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for i in $(seq "$repeats"); do
  for variant in "${variants[@]}"; do
    label=${variant%%=*}; extra=${variant#*=}
    # shellcheck disable=SC2086  # the variant's extra options are split on purpose
    run=$(python "$here/bench_train_step.py" "${opts[@]}" $extra 2>/dev/null | tail -1)
    echo "{\"label\": \"$label\", \"run\": $run}" >> "$results"
  done
done
python - "$results" "${variants[@]%%=*}" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
labels = sys.argv[2:]
by = {label: [r["run"] for r in runs if r["label"] == label] for label in labels}
for label, rs in by.items():
    print(f"{label:10} " + "  ".join(
        f"{r['tokens_per_s']:7.1f} tok/s {r['peak_mem_gb']:.2f} GB (first step {r['first_step_s']:.1f} s)" for r in rs))
base = labels[0]
for label in labels[1:]:
    speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(by[label], by[base], strict=True)]
    mem = statistics.median(a["peak_mem_gb"] / b["peak_mem_gb"] for a, b in zip(by[label], by[base], strict=True))
    print(f"{label}/{base}: tokens/s {statistics.median(speed):.2f}x (pairs {', '.join(f'{x:.2f}' for x in speed)}), "
          f"peak memory {mem:.2f}x")
PY
