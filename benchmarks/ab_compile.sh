#!/usr/bin/env bash
# Eager against compiled blocks (the config's 'compile'), alternating fresh processes of one commit:
#   bash benchmarks/ab_compile.sh [repeats] -- [bench_train_step.py options]
# Prints each run's tokens/s, peak memory and first (compiling) step, and the median of per-pair
# ratios compiled/eager.
set -euo pipefail
repeats=${1:-3}
shift 1; [ "${1:-}" = "--" ] && shift
opts=("$@")
here=$(cd "$(dirname "$0")" && pwd)
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for i in $(seq "$repeats"); do
  python "$here/bench_train_step.py" "${opts[@]}" 2>/dev/null | tail -1 >> "$results"
  python "$here/bench_train_step.py" "${opts[@]}" --compile 2>/dev/null | tail -1 >> "$results"
done
python - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
eager, compiled = [r for r in runs if not r["compile"]], [r for r in runs if r["compile"]]
for name, rs in (("eager", eager), ("compiled", compiled)):
    print(f"{name:9} " + "  ".join(
        f"{r['tokens_per_s']:7.1f} tok/s {r['peak_mem_gb']:.2f} GB (first step {r['first_step_s']:.1f} s)" for r in rs))
pairs = list(zip(compiled, eager))
speed = [c["tokens_per_s"] / e["tokens_per_s"] for c, e in pairs]
mem = [c["peak_mem_gb"] / e["peak_mem_gb"] for c, e in pairs]
print(f"compiled/eager: tokens/s {statistics.median(speed):.2f}x (pairs {', '.join(f'{x:.2f}' for x in speed)}), "
      f"peak memory {statistics.median(mem):.2f}x")
PY
