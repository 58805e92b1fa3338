"""Fold a LoRA adapter into its base model: a plain model folder any Mistral tool can load.

    python -m utils.merge_lora --base_model BASE_DIR --lora RUN_DIR/checkpoints/checkpoint_000300 \\
        --out MERGED_DIR [--scaling S] [--dtype bf16|fp16|fp32]

``--lora`` is a checkpoint folder, its ``consolidated/`` folder or the ``lora.safetensors`` file; the
scaling is read from the ``params.json`` next to it (``--scaling`` only for adapters without one).
The output folder gets ``consolidated.safetensors`` (W + scaling * B A, computed in float32 and cast to
the base dtype or ``--dtype``), ``params.json`` and the tokenizer file. A multimodal base's vision weights
keep their stored dtype; those with an adapter (vision targets such as ``vision_encoder.wq``) are merged
too, so ``Transformer.from_folder(OUT, vision=True)`` gives the adapted model's outputs on images.

Runs on CPU and streams (``model.merge.merge_checkpoint``): the output file's header is computed from
the base's tensor shapes first, then each base tensor is read, merged and written at its offset, so
memory holds one tensor (plus the adapter, which is small) instead of two copies of the model. The
reference's flag names (``--initial_model_ckpt``, ``--lora_ckpt``, ``--dump_ckpt``) are accepted too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from finetune.data.tokenizer import tokenizer_file
from model.checkpoint import find_adapter
from model.configs import load_model_args, params_from_args
from model.merge import MergeError, merge_checkpoint

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.merge_lora", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base_model",
        "--initial_model_ckpt",
        dest="base",
        required=True,
        help="base model folder (or its consolidated.safetensors)",
    )
    parser.add_argument(
        "--lora",
        "--lora_ckpt",
        dest="lora",
        required=True,
        help="checkpoint folder, its consolidated/ folder, or lora.safetensors",
    )
    parser.add_argument(
        "--out", "--dump_ckpt", dest="out", required=True, help="new folder for the merged model"
    )
    parser.add_argument("--scaling", type=float, default=None, help="only for an adapter without params.json")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: the base's dtype")
    opts = parser.parse_args(argv)
    try:
        base = Path(opts.base)
        base = base.parent if base.is_file() else base
        if not base.is_dir():
            raise FileNotFoundError(f"--base_model {opts.base} is not a model folder.")
        adapter, params = find_adapter(opts.lora)
        out = Path(opts.out)
        if out.resolve() in (base.resolve(), adapter.parent.resolve()):
            raise MergeError(f"--out {out} is a folder the merge reads from; choose a new folder.")
        lora_params = (params or {}).get("lora") or {}
        scaling = lora_params.get("scaling")
        if opts.scaling is not None:
            if scaling is not None and scaling != opts.scaling:
                print(
                    f"warning: --scaling {opts.scaling} overrides {scaling} from the adapter's params.json",
                    file=sys.stderr,
                )
            scaling = opts.scaling
        if scaling is None:
            raise MergeError(
                f"{adapter.parent}/params.json with a 'lora.scaling' was not found; pass --scaling."
            )
        base_args = load_model_args(base)
        n = merge_checkpoint(base, adapter, float(scaling), out, _DTYPES.get(opts.dtype))
        (out / "params.json").write_text(json.dumps(params_from_args(base_args), indent=4) + "\n")
        tok = tokenizer_file(adapter.parent) or tokenizer_file(base)
        if tok is not None:
            shutil.copy2(tok, out / tok.name)
        else:
            print(f"warning: no tokenizer file in {adapter.parent} or {base}; none copied", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Merged {n} adapter(s) (scaling {scaling}) into {out / 'consolidated.safetensors'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
