#!/usr/bin/env bash
# Activation checkpointing modes side by side, alternating fresh processes of the same commit:
#   bash benchmarks/ab_checkpoint_modes.sh [repeats] -- [bench_train_step.py options]
# Prints tokens/s and peak memory of each run and the median of per-round ratios against 'full'.
set -euo pipefail
repeats=${1:-3}
shift 1; [ "${1:-}" = "--" ] && shift
exec bash "$(dirname "$0")/ab_variants.sh" "$repeats" "full=--checkpoint full" \
    "selective=--checkpoint selective" "none=--checkpoint none" -- "$@"
