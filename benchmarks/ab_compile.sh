#!/usr/bin/env bash
# Eager against compiled blocks (the config's 'compile'), alternating fresh processes of one commit:
#   bash benchmarks/ab_compile.sh [repeats] -- [bench_train_step.py options]
# Prints each run's tokens/s, peak memory and first (compiling) step, and the median of per-pair
# ratios compiled/eager.
set -euo pipefail
repeats=${1:-3}
shift 1; [ "${1:-}" = "--" ] && shift
exec bash "$(dirname "$0")/ab_variants.sh" "$repeats" "eager=" "compiled=--compile" -- "$@"
