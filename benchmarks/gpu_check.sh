#!/usr/bin/env bash
# The GPU checks, run as one script on a lent CUDA machine (see docs/benchmarks.md):
#   correctness of FlexAttention backward and the fused loss on CUDA, a real train.py run with
#   resume on one GPU, and training-step throughput of the 7B and Nemo shapes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # packages the GPU image lacks (mistral-common and its dependencies)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

[ "${SKIP_CORRECTNESS:-0}" = 1 ] || { echo "== correctness"; python3 benchmarks/cuda_checks.py 2>&1 | tee "$OUT/cuda_checks.txt"; }

if [ "${SKIP_TRAIN:-0}" != 1 ]; then
echo "== train.py on one GPU"
python3 - <<'PY'
from pathlib import Path
import yaml
from utils.quickstart import Task, create_model, write_data  # a small model and chat data, no tests/ import
root = Path("/tmp/gpu_train"); root.mkdir(exist_ok=True)
create_model(root / "model", dim=128, n_layers=2, seed=0)
train, eval_ = write_data(root, Task(), n_train=300, n_eval=40, seed=0)
cfg = {"model_id_or_path": str(root / "model"), "run_dir": str(root / "run"), "seq_len": 128, "batch_size": 2,
       "data": {"instruct_data": str(train), "eval_instruct_data": str(eval_), "cache_dir": str(root / "cache")},
       "max_steps": 8, "ckpt_freq": 4, "no_eval": False, "eval_freq": 4, "log_freq": 1, "seed": 0,
       "optim": {"lr": 5e-2, "pct_start": 0.2}, "lora": {"rank": 4}}
(root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
PY
torchrun --standalone --nproc-per-node 1 train.py /tmp/gpu_train/cfg.yaml --max_steps 4 2>&1 | tail -8 | tee "$OUT/train.txt"
torchrun --standalone --nproc-per-node 1 train.py /tmp/gpu_train/cfg.yaml 2>&1 | tail -8 | tee -a "$OUT/train.txt"
cat /tmp/gpu_train/run/metrics.train.jsonl >> "$OUT/train.txt"
fi

echo "== throughput"
# BENCH_SPECS (one spec per line) replaces the default list, e.g. to spend a short GPU budget on a
# single comparison.
# The default fits one 10-minute device command with the checks above (about 90 s per eager 7B
# run; a compiled one adds its compilation, not measured on a GPU yet). The target config first:
# 7B at 32768 tokens, compiled and eager, against full checkpointing's 30.4% MFU of 2026-11-26.
default_specs="--preset 7b --seq_len 32768 --checkpoint selective --compile
--preset 7b --seq_len 32768 --checkpoint selective
--preset 7b --seq_len 32768 --checkpoint full
--preset 7b --seq_len 8192 --checkpoint none --compile --profile 25"
while IFS= read -r spec; do
  [ -n "$spec" ] || continue
  timeout 200 python3 benchmarks/bench_train_step.py $spec --precision bf16 --steps 4 --warmup 2 \
      --matmul_n 8192 --doc_min 512 --doc_max 4096 2>"$OUT/bench_stderr_$(echo $spec | tr -c 'a-z0-9\n' _).txt" \
      | tail -1 | tee -a "$OUT/bench.jsonl"
done <<< "${BENCH_SPECS:-$default_specs}"
