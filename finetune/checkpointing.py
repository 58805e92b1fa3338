"""Checkpoints: consumable weights plus everything needed to resume.

Layout of ``run_dir/checkpoints/checkpoint_{step:06d}/``:

- ``consolidated/``: ``lora.safetensors`` (adapters, mistral-inference key names) or, with
  ``save_adapters: false``, a merged ``consolidated.safetensors``; ``params.json`` (the base
  model's keys plus a ``lora`` block) and the model's own tokenizer file.
- ``state/``: trainable parameters and optimizer state (``torch.distributed.checkpoint``, sharded,
  one file per rank), ``train_state.json`` (step, counters) and ``rank_{r}.pt`` (data-loader
  position and RNG states of each rank).

A checkpoint is written under ``checkpoint_{step:06d}.tmp`` and renamed when complete; the rename
is atomic, so a directory with the final name is always complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from finetune import distributed as D
from finetune.config import ConfigError
from finetune.loss import CausalLMLoss
from model.args import LoraArgs, ModelArgs
from model.lora import LoRALinear, is_lora_key, lora_modules, merge_delta
from model.quant import NF4LoRALinear

logger = logging.getLogger("finetune")

_FINAL = re.compile(r"^checkpoint_(\d{6})$")
_STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen weights come from the base model, not the checkpoint; dcp.load already fails on any
# trainable key the checkpoint lacks.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _FINAL.match(p.name)]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name).group(1)))


def latest_resumable(run_dir: Path) -> Path | None:
    for ckpt in reversed(list_checkpoints(run_dir)):
        if (ckpt / "state" / "train_state.json").is_file():
            return ckpt
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    """Gather a sharded tensor (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_adapters(model: CausalLMLoss, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in sorted(lora_modules(model.model).items()):
        for ab in ("lora_A", "lora_B"):
            full = _full(getattr(m, ab).weight.detach())
            if D.is_main():
                out[f"{name}.{ab}.weight"] = full.to("cpu", dtype).contiguous()
    return out


def gather_merged(model: CausalLMLoss, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full weights with adapters folded in, gathered tensor by tensor onto rank 0's CPU."""
    lora = {f"{n}.weight": m for n, m in lora_modules(model.model).items()}
    if any(isinstance(m, NF4LoRALinear) for m in lora.values()):
        logger.info("Merging adapters into the de-quantized NF4 base (the weights they were trained on); "
                    "to merge into the original base instead, save adapters and use utils.merge_lora.")
    out = {}
    for key, p in model.model.named_parameters():
        if is_lora_key(key):
            continue
        full = _full(p.detach())
        if key in lora:
            m: LoRALinear = lora[key]
            if isinstance(m, NF4LoRALinear):
                full = m.dequantize(full)  # packed codes -> (out, in) in the training precision
            full = merge_delta(full, _full(m.lora_A.weight.detach()), _full(m.lora_B.weight.detach()), m.scaling)
        if D.is_main():
            out[key] = full.to("cpu", dtype).contiguous()
    return out


def adapter_params(model_args: ModelArgs, lora: LoraArgs | None) -> dict[str, Any]:
    params = model_args.to_dict()
    if lora is not None:
        params["lora"] = asdict(lora)  # enable, rank, scaling, dropout, target_modules
    return params


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: CausalLMLoss,
    optimizer: torch.optim.Optimizer,
    *,
    model_args: ModelArgs,
    lora: LoraArgs | None,
    save_adapters: bool,
    save_dtype: torch.dtype,
    tokenizer_file: tuple[Path, str] | None,
    train_state: dict[str, Any],
    rank_state: dict[str, Any],
    num_keep: int | None,
) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if D.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-save
        (tmp / "consolidated").mkdir(parents=True)
        (tmp / "state").mkdir()
    D.barrier()
    logger.info("Saving checkpoint of step %d to %s", step, final)
    weights = gather_adapters(model, save_dtype) if save_adapters else gather_merged(model, save_dtype)
    if D.is_main():
        name = "lora.safetensors" if save_adapters else "consolidated.safetensors"
        save_file(weights, str(tmp / "consolidated" / name))
        params = adapter_params(model_args, lora if save_adapters else None)
        (tmp / "consolidated" / "params.json").write_text(json.dumps(params, indent=4) + "\n")
        if tokenizer_file is not None:
            src, name = tokenizer_file
            shutil.copy2(src, tmp / "consolidated" / name)
    del weights
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rank_state, tmp / "state" / f"rank_{D.rank()}.pt")
    D.barrier()
    if D.is_main():
        (tmp / "state" / "train_state.json").write_text(json.dumps(train_state, indent=2) + "\n")
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _rotate(run_dir, num_keep)
    D.barrier()
    logger.info("Checkpoint saved: %s", final / "consolidated")
    return final


def _rotate(run_dir: Path, num_keep: int | None) -> None:
    if num_keep is None:
        return
    for old in list_checkpoints(run_dir)[:-num_keep]:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("Removed old checkpoint %s", old)


def load_checkpoint(ckpt: Path, model: CausalLMLoss, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore trainable weights and optimizer state; returns (train_state, this rank's state)."""
    rank_file = ckpt / "state" / f"rank_{D.rank()}.pt"
    train_state = json.loads((ckpt / "state" / "train_state.json").read_text())
    if train_state.get("world_size") != D.world_size() or not rank_file.is_file():
        raise ConfigError(
            f"{ckpt} was written by {train_state.get('world_size')} processes but this run has "
            f"{D.world_size()}; resume with the same number of processes (the data order depends on it), "
            "or start a new run_dir with init_lora_from pointing at its consolidated/lora.safetensors."
        )
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_LOAD_OPTIONS)
    rank_state = torch.load(rank_file, weights_only=False)
    return train_state, rank_state
