"""Checkpoints: consumable weights plus everything needed to resume.

Layout of ``run_dir/checkpoints/checkpoint_{step:06d}/``:

- ``consolidated/``: ``lora.safetensors`` (adapters, mistral-inference key names) or, with
  ``save_adapters: false``, a merged ``consolidated.safetensors`` (with a multimodal base's vision
  weights, read from the base folder as stored); ``params.json`` (the base
  model's keys plus a ``lora`` block) and the model's own tokenizer file.
- ``state/``: trainable parameters and optimizer state (``torch.distributed.checkpoint``, sharded,
  one file per rank), ``train_state.json`` (step, counters, the run's config) and ``rank_{r}.json``
  (data-loader position and RNG states of each rank).
- ``manifest.json``, written last: every file's size, and a CRC-32 of each file up to 16 MiB.

A checkpoint is written under ``checkpoint_{step:06d}.tmp`` and renamed when complete; the rename
is atomic, so a directory with the final name was complete when written. Files damaged later
(a truncated copy, a full disk, a bad sector) are caught by the manifest: resuming skips such a
checkpoint with a warning and takes the newest intact one. Nothing is unpickled on load (see
``finetune/safe_dcp.py``).
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from finetune import distributed as D
from finetune.config import ConfigError
from finetune.loss import TransformerWithLoss
from finetune.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError, read_metadata_file
from model.args import LoraArgs, ModelArgs
from model.configs import params_from_args
from model.keys import to_checkpoint_names
from model.lora import lora_modules, lora_state_dict
from model.merge import merged_weights
from model.multimodal import vision_block, vision_tensors
from model.quant import NF4LoRALinear

logger = logging.getLogger("finetune")

_FINAL = re.compile(r"^checkpoint_(\d{6})$")
_STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen weights come from the base model, not the checkpoint; dcp.load already fails on any
# trainable key the checkpoint lacks.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
# The resume state's layout: its keys are the training module's parameter names. 2: the transformer
# is the ``transformer`` of TransformerWithLoss (it was ``model``); 3: MoE experts are stacked tensors
# (``model.experts``; they were one module per expert).
STATE_FORMAT = 3


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _FINAL.match(p.name)]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name).group(1)))


MANIFEST = "manifest.json"
# Files up to this size also get a CRC-32 in the manifest (metadata, JSON, small adapters); larger
# ones (optimizer shards of full fine-tuning) only their size, so saving never reads gigabytes back.
_CRC_MAX_BYTES = 16 * 2**20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message says why and what to do."""


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(ckpt: Path) -> None:
    files = {}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[str(path.relative_to(ckpt))] = {"size": size, **({"crc32": _crc32(path)} if size <= _CRC_MAX_BYTES else {})}
    (ckpt / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def verify_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None if everything the manifest lists is intact."""
    manifest = ckpt / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest} is missing (the checkpoint is incomplete, or from a version that wrote pickled state)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e})"
    for rel, entry in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes, {entry['size']} were written"
        if "crc32" in entry and _crc32(path) != entry["crc32"]:
            return f"{path} is corrupt (its checksum differs from when it was written)"
    train_state = ckpt / "state" / "train_state.json"
    try:
        world = json.loads(train_state.read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{train_state} is unreadable ({e})"
    try:
        read_metadata_file(str(ckpt / "state" / ".metadata"))
    except UnsafeCheckpointError as e:
        return str(e)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        return f"{ckpt / 'state' / '.metadata'} is unreadable ({e})"
    missing = [r for r in range(world) if f"state/rank_{r}.json" not in files]
    if missing:
        return f"rank files {missing} of its {world} processes are missing"
    return None


def latest_resumable(run_dir: Path) -> Path | None:
    """The newest intact checkpoint. Damaged newer ones are skipped with a warning naming the fault;
    if checkpoints exist but none is intact, resuming is refused rather than silently starting over."""
    problems = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            for skipped in problems:
                logger.warning("Skipping damaged checkpoint: %s. Resuming from %s instead.", skipped, ckpt)
            return ckpt
        problems.append(f"{ckpt.name}: {problem}")
    if problems:
        raise ConfigError(
            f"{run_dir} has checkpoints but none can be resumed:\n  " + "\n  ".join(problems) + "\n"
            "Restore them from a copy, move run_dir/checkpoints away to start over, or choose a new run_dir."
        )
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    """Gather a sharded tensor (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_adapters(model: TransformerWithLoss, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter file's tensors, gathered one at a time onto rank 0's CPU, under checkpoint names
    (one adapter per expert: ``model.checkpoint.file_keys``)."""
    out = {}
    for key, t in lora_state_dict(model.transformer).items():
        full = _full(t)
        if D.is_main():
            out[key] = full.to("cpu", dtype)
    return {k: t.contiguous() for k, t in to_checkpoint_names(out, model.transformer.args).items()}


def gather_merged(model: TransformerWithLoss, dtype: torch.dtype,
                  base_folder: Path | None = None) -> dict[str, torch.Tensor]:
    """Full weights with adapters folded in (``model.merge``), gathered tensor by tensor onto rank 0's CPU.
    A multimodal model trained without its vision side (text data) carries the vision weights from
    ``base_folder`` as stored (``model.multimodal``); one built with it merges them like the rest."""
    vision = vision_block(model.transformer.args.extra) is not None and model.transformer.vision is None
    if vision and base_folder is None:  # on every rank, before any collective
        raise ValueError("a merged checkpoint of a multimodal model needs the base folder to carry its vision weights.")
    if any(isinstance(m, NF4LoRALinear) for m in lora_modules(model.transformer).values()):
        logger.info("Merging adapters into the de-quantized NF4 base (the weights they were trained on); "
                    "to merge into the original base instead, save adapters and use utils.merge_lora.")
    out = {}
    for key, weight in merged_weights(model.transformer, full=_full):
        if D.is_main():
            out[key] = weight.to("cpu", dtype).contiguous()
    if vision and D.is_main():
        out.update(vision_tensors(base_folder))  # as stored: the vision side was not trained
    return out


def adapter_params(model_args: ModelArgs, lora: LoraArgs | None, vision: bool = False) -> dict[str, Any]:
    params = params_from_args(model_args)
    if lora is not None:
        # enable, rank, scaling, dropout, and the target_modules this model has (the default list also
        # names the other attention kind's projections; vision targets only if the vision side was built)
        targets = model_args.present_targets(lora.target_modules, vision=vision)
        params["lora"] = {**asdict(lora), "target_modules": targets}
    return params


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: TransformerWithLoss,
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
    base_folder: Path | None = None,
) -> Path:
    """Write a checkpoint (a collective: every rank calls it). If any rank fails to write, every
    rank raises CheckpointWriteError, the partial checkpoint is removed and older ones are kept."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    device = next(model.parameters()).device
    logger.info("Saving checkpoint of step %d to %s", step, final)

    def phase(fn) -> None:
        error: BaseException | None = None
        try:
            fn()
        except (OSError, CheckpointException) as e:  # CheckpointException is a BaseException
            error = e
        code = _error_code(error)
        worst = int(D.all_reduce_max(float(code), device))
        if worst:
            if D.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(_write_error_message(final, worst, error, model, save_adapters)) from None

    def prepare() -> None:
        if D.is_main():
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash mid-save
            (tmp / "consolidated").mkdir(parents=True)
            (tmp / "state").mkdir()

    phase(prepare)
    if save_adapters:
        weights = gather_adapters(model, save_dtype)
    else:
        weights = gather_merged(model, save_dtype, base_folder)

    def write_consolidated() -> None:
        if D.is_main():
            name = "lora.safetensors" if save_adapters else "consolidated.safetensors"
            save_file(weights, str(tmp / "consolidated" / name))
            params = adapter_params(model_args, lora if save_adapters else None, model.transformer.vision is not None)
            (tmp / "consolidated" / "params.json").write_text(json.dumps(params, indent=4) + "\n")
            if tokenizer_file is not None:
                src, name = tokenizer_file
                shutil.copy2(src, tmp / "consolidated" / name)

    phase(write_consolidated)
    weights.clear()  # free rank 0's gathered copy before the optimizer state is written
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_STATE_OPTIONS)

    def write_state() -> None:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        (tmp / "state" / f"rank_{D.rank()}.json").write_text(json.dumps(rank_state) + "\n")

    phase(write_state)

    def finish() -> None:
        if D.is_main():
            (tmp / "state" / "train_state.json").write_text(
                json.dumps({**train_state, "format": STATE_FORMAT}, indent=2) + "\n")
            _write_manifest(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            tmp.rename(final)

    phase(finish)
    if D.is_main():
        _rotate(run_dir, num_keep)
    D.barrier()
    logger.info("Checkpoint saved: %s", final / "consolidated")
    return final


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _error_code(error: BaseException | None) -> int:
    """0: no error, 1: an error, 2: out of space (the most useful message wins the max-reduction)."""
    if error is None:
        return 0
    causes = [error]
    if isinstance(error, CheckpointException):
        causes += [exc for exc, _ in error.failures.values()]
    return 2 if any(isinstance(c, OSError) and c.errno in _NO_SPACE for c in causes) else 1


def _write_error_message(final: Path, code: int, error: BaseException | None, model: TransformerWithLoss,
                         save_adapters: bool) -> str:
    kept = list_checkpoints(final.parent.parent)
    kept_text = f"The previous checkpoint {kept[-1]} is kept" if kept else "No earlier checkpoint exists"
    if code == 2:
        free = shutil.disk_usage(final.parent if final.parent.exists() else final.parent.parent).free
        return (
            f"no space left while writing checkpoint {final}: it needs about {_gb(_checkpoint_bytes(model, save_adapters))} "
            f"and {_gb(free)} is free on that disk (or a quota or file-size limit was hit). {kept_text}. "
            "Free some space (or lower num_ckpt_keep) and re-run the same command to resume."
        )
    if error is None:
        return f"another process failed to write checkpoint {final} (see its message). {kept_text}."
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]  # the first failing rank's own exception
    detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    return (f"cannot write checkpoint {final}: {detail}{where}. {kept_text}. Make run_dir writable, "
            "then re-run the same command to resume.")


def _checkpoint_bytes(model: TransformerWithLoss, save_adapters: bool) -> int:
    """Roughly what one checkpoint takes: fp32 trainable weights and two Adam moments, plus the
    consumable weights (the adapters, or the whole merged model)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    consumable = trainable * 4 if save_adapters else sum(p.numel() * 2 for p in model.parameters())
    return trainable * 4 * 3 + consumable


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _rotate(run_dir: Path, num_keep: int | None) -> None:
    if num_keep is None:
        return
    for old in list_checkpoints(run_dir)[:-num_keep]:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("Removed old checkpoint %s", old)


def load_checkpoint(ckpt: Path, model: TransformerWithLoss, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore trainable weights and optimizer state; returns (train_state, this rank's state).
    Nothing is unpickled: JSON for the small state, restricted readers for DCP's files."""
    train_state = json.loads((ckpt / "state" / "train_state.json").read_text())
    if train_state.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"{ckpt} was written by an earlier version of this library whose resume state this one cannot "
            "read. Its adapters are usable: start a new run_dir with "
            f"init_lora_from: {ckpt / 'consolidated' / 'lora.safetensors'} (the step count and optimizer "
            "state start over), or finish the run with the version that wrote it."
        )
    if train_state.get("world_size") != D.world_size():
        raise ConfigError(
            f"{ckpt} was written by {train_state.get('world_size')} processes but this run has "
            f"{D.world_size()}; resume with the same number of processes (the data order depends on it), "
            "or start a new run_dir with init_lora_from pointing at its consolidated/lora.safetensors."
        )
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt / "state")), planner=SafeLoadPlanner())
    except CheckpointException as e:
        causes = [exc for exc, _ in e.failures.values()]
        unsafe = [c for c in causes if isinstance(c, UnsafeCheckpointError)]
        raise (unsafe[0] if unsafe else ConfigError(
            f"cannot load {ckpt / 'state'}: {causes[0] if causes else e}. Delete this checkpoint to resume "
            "from the previous one."
        )) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_LOAD_OPTIONS)
    rank_state = json.loads((ckpt / "state" / f"rank_{D.rank()}.json").read_text())
    return train_state, rank_state
