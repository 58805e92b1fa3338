"""Training-step throughput, peak memory and MFU of our stack: ``python -m utils.bench_train_step``.

    python benchmarks/bench_train_step.py --preset small --seq_len 1024 --precision bf16 --no_checkpoint

The routine lives in the package (``utils/bench_train_step.py``) so that tests and tools can run it too;
this script keeps the benchmark's command (docs/benchmarks.md, the ab_*.sh scripts) as it was.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.bench_train_step import main  # noqa: E402

if __name__ == "__main__":
    main()
