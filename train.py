"""Entry point: ``torchrun --nproc-per-node N train.py CONFIG.yaml [--key value ...]``."""

import sys

from finetune.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
