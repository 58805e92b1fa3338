"""The training loop: ``train.py CONFIG.yaml [--key value ...]``."""

from __future__ import annotations

import base64
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tqdm import tqdm

from finetune import distributed as D
from finetune.args import TrainArgs, load_train_args
from finetune.build import (
    Precision,
    build_model,
    check_model_settings,
    check_pictures,
    check_trainable_vocab,
    resolve_precision,
)
from finetune.checkpointing import checkpoint_dir, latest_resumable, load_checkpoint, save_checkpoint
from finetune.config import ConfigError, to_dict
from finetune.data.dataset import SourceData, open_manifest
from finetune.data.loader import Batch, TrainLoader, build_eval_batches, build_train_loader
from finetune.data.tokenizer import load_tokenizer, tokenizer_file_to_ship
from finetune.data.validation import check_data
from finetune.loss import TransformerWithLoss
from finetune.monitoring import MetricsLogger, format_duration, peak_memory_gb, setup_logging, start_wandb
from finetune.run_dir import RunDirLock, create_run_dir, keep_metrics_up_to
from model.args import ModelArgs
from model.configs import load_model_args

logger = logging.getLogger("finetune")


class TrainingDiverged(RuntimeError):
    pass


# fp16 skips a step whose gradients overflow and halves the loss scale; this many skips in a row
# (the scale has bottomed out at 1, or the model diverged) stop the run.
FP16_MAX_SKIPS_IN_A_ROW = 20


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0  # input tokens over all ranks, filler included
    train_seconds: float = 0.0
    loss_scale: float = 1.0  # dynamic loss scale, fp16 only
    steps_since_rescale: int = 0
    skipped_in_a_row: int = 0  # fp16 overflow skips since the last applied step


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up over pct_start of the steps, then cosine decay to lr * min_lr_ratio at max_steps.
    ``step`` is 1-based: the learning rate used by that optimizer step."""
    o = args.optim
    warmup = round(o.pct_start * args.max_steps)
    if warmup and step <= warmup:
        return o.lr * step / warmup
    peak = max(warmup, 1)  # the last warm-up step, or step 1 without warm-up, uses the peak
    progress = (step - peak) / max(1, args.max_steps - peak)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current step, save and exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True


def _to_device(
    batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return (
        torch.from_numpy(batch.x).to(device, non_blocking=True),
        torch.from_numpy(batch.y).to(device, non_blocking=True),
        torch.from_numpy(batch.y_mask).to(device, non_blocking=True),
        [torch.from_numpy(image).to(device, non_blocking=True) for image in batch.images],
    )


def train_step(
    model: TransformerWithLoss,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    args: TrainArgs,
    state: TrainState,
    precision: Precision,
    device: torch.device,
) -> tuple[float, float, bool]:
    """One optimizer step over ``num_microbatches`` batches; returns (loss, grad_norm, applied).

    Each micro-batch's summed loss is divided by the number of target tokens of the whole global
    batch (all micro-batches, all ranks), so the gradient is that of the token-mean loss whatever
    the split. FSDP averages gradients over ranks, hence the extra factor world_size.
    """
    (n_targets,) = D.all_reduce_sum([sum(b.n_targets for b in batches)], device)
    scale = D.world_size() / max(n_targets, 1) * state.loss_scale
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # Reduce-scatter gradients once per step, after the last micro-batch.
        model.set_requires_gradient_sync(i == len(batches) - 1)
        x, y, mask, images = _to_device(batch, device)
        mb_loss = model(x, batch.seqlens, y, mask, images)
        (mb_loss * scale).backward()
        loss_sum += mb_loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if state.loss_scale != 1.0:
        for p in params:
            p.grad.div_(state.loss_scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_norm, foreach=True)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    applied = math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if precision.name == "fp16":
        _update_loss_scale(state, applied)
    (total,) = D.all_reduce_sum([loss_sum.item()], device)
    return total / max(n_targets, 1), grad_norm, applied


def _update_loss_scale(state: TrainState, finite: bool) -> None:
    if not finite:
        state.loss_scale = max(state.loss_scale / 2, 1.0)
        state.steps_since_rescale = 0
        logger.warning("fp16 gradient overflow: step skipped, loss scale lowered to %g", state.loss_scale)
    else:
        state.steps_since_rescale += 1
        if state.steps_since_rescale >= 500:
            state.loss_scale *= 2
            state.steps_since_rescale = 0


@torch.no_grad()
def evaluate(model: TransformerWithLoss, batches: list[Batch], device: torch.device) -> tuple[float, float, int]:
    """Token-weighted loss over the whole eval set (all ranks) and perplexity exp(loss)."""
    model.eval()
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0  # float64: many batches summed
    for batch in batches:
        x, y, mask, images = _to_device(batch, device)
        loss_sum += model(x, batch.seqlens, y, mask, images)  # stays on the device: one sync at the end
        n += batch.n_targets
    model.train()
    total, count = D.all_reduce_sum([loss_sum.item(), n], device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 700.0)), int(count)


def _rng_state(loader) -> dict[str, Any]:
    """This rank's data position and RNG states, as JSON (checkpoints never hold pickles)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "loader": loader.state_dict(),
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def _restore_rng(rank_state: dict[str, Any]) -> None:
    torch.set_rng_state(_from_b64(rank_state["torch"]))
    n = rank_state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in rank_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_from_b64(rank_state["cuda"]))


def _b64(byte_tensor: torch.Tensor) -> str:
    return base64.b64encode(byte_tensor.numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


@dataclass
class Inputs:
    """What a run reads before it builds anything: each file read and checked once, on every rank."""

    model_args: ModelArgs
    tokenizer: MistralTokenizer
    train_data: list[SourceData]
    eval_data: list[SourceData]  # empty with no_eval or no eval source

    @property
    def has_images(self) -> bool:
        """The data has pictures: the model is built with its vision encoder (``vision=True``)."""
        return any(d.has_images for d in self.train_data + self.eval_data)


def load_inputs(args: TrainArgs, config_path: str, device: torch.device) -> Inputs:
    """The model's params, its tokenizer and the data, checked before anything is written: a mistake
    leaves no run_dir behind."""
    model_args, tokenizer = read_model_folder(args)
    check_model_settings(args, model_args, device)
    train_data, eval_data = scan_data_on_rank0(args, tokenizer, config_path, device)
    inputs = Inputs(model_args, tokenizer, train_data, eval_data)
    check_pictures(args, model_args, tokenizer, inputs.has_images)
    return inputs


def read_model_folder(args: TrainArgs) -> tuple[ModelArgs, MistralTokenizer]:
    """``params.json`` (or ``config.json``) and the tokenizer of ``model_id_or_path`` (also what
    ``utils.validate_data`` reads)."""
    folder = Path(args.model_id_or_path)
    if not folder.is_dir():
        raise ConfigError(
            f"model_id_or_path '{folder}' is not a folder: download the model (params.json + "
            "consolidated.safetensors + tokenizer) and point model_id_or_path at it; the data is "
            "checked with the model's own tokenizer."
        )
    model_args = load_model_args(folder)
    check_trainable_vocab(model_args, args.model_id_or_path)  # before the tokenizer: its error is clearer
    return model_args, load_tokenizer(folder, model_args.vocab_size, args.tokenizer_path)


def scan_data_on_rank0(
    args: TrainArgs, tokenizer: MistralTokenizer, config_path: str, device: torch.device
) -> tuple[list[SourceData], list[SourceData]]:
    """Rank 0 reads every line into the token cache and reports every invalid one; it then sends the
    other ranks the names of the cache entries, which they open without reading the data files. On
    an error (an invalid line, an unreadable file) every rank stops, and only rank 0 has the message."""
    sent: dict[str, Any] | None = None
    error: Exception | None = None
    if D.is_main():
        try:
            report = check_data(args.data, tokenizer.instruct_tokenizer, args.seq_len, include_eval=not args.no_eval)
            report.raise_if_invalid(config_path)
            sent = report.manifest()
        except Exception as e:  # invalid data, an unreadable file, or a bug: the other ranks must not wait
            error, sent = e, {"error": True}
    received = D.broadcast_json(sent, device)
    if "error" in received:
        raise error if error is not None else ConfigError("invalid training data (see rank 0's message)")
    if D.is_main():
        return report.train, report.eval
    it = tokenizer.instruct_tokenizer
    cache = args.data.cache_path
    return open_manifest(received["train"], it, cache), open_manifest(received["eval"], it, cache)


def _agree_or_raise(error: Exception | None, device: torch.device, what: str) -> None:
    """A collective: every rank raises if rank 0 (or any rank) hit ``error``, so none waits forever."""
    if D.all_reduce_max(1.0 if error else 0.0, device):
        if error is not None:
            raise error
        raise ConfigError(f"{what} (see rank 0's message)")


def build_optimizer(model: TransformerWithLoss, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable (float32) parameters; the learning rate is set every step."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.optim.lr, betas=tuple(args.optim.betas), eps=args.optim.eps,
        weight_decay=args.optim.weight_decay, foreach=True,
    )


def _resume(ckpt: Path, model: TransformerWithLoss, optimizer: torch.optim.Optimizer, loader, args: TrainArgs) -> TrainState:
    """Restore adapters, optimizer, step, data position and RNGs from a checkpoint."""
    train_state, rank_state = load_checkpoint(ckpt, model, optimizer)
    loader.load_state_dict(rank_state["loader"])
    _restore_rng(rank_state)
    state = TrainState(**train_state["train"])
    logger.info("Resumed from %s at step %d", ckpt, state.step)
    if "config" in train_state:
        _warn_changed_settings(train_state["config"], args, state.step)
    return state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _warn_changed_settings(saved: dict[str, Any], args: TrainArgs, step: int) -> None:
    """Say which settings differ from those the checkpoint was trained with, and what follows."""
    before, now = _flatten(saved), _flatten(to_dict(args))
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    if not changed:
        return
    lines = [f"Resuming from step {step} with settings changed since that checkpoint: {'; '.join(changed)}."]
    old_optim = {k: before[f"optim.{k}"] for k in ("lr", "pct_start", "min_lr_ratio") if f"optim.{k}" in before}
    old_args = replace(args, max_steps=before.get("max_steps", args.max_steps), optim=replace(args.optim, **old_optim))
    new_lr, old_lr = lr_at(step + 1, args), lr_at(step + 1, old_args)
    if new_lr != old_lr:
        lines.append(
            f"The learning-rate schedule follows the new settings: step {step + 1} uses lr {new_lr:.3g} "
            f"(it would have been {old_lr:.3g}), decaying to {args.optim.lr * args.optim.min_lr_ratio:.3g} "
            f"at step {args.max_steps}."
        )
    logger.warning(" ".join(lines))


def _find_resumable(run_dir: Path, device: torch.device) -> Path | None:
    """Rank 0 picks the newest intact checkpoint; every rank gets the same answer."""
    error, found = None, None
    if D.is_main():
        try:
            found = latest_resumable(run_dir)
        except ConfigError as e:
            error = e
    _agree_or_raise(error, device, "no checkpoint can be resumed")
    # Only rank 0 looked: the others contribute -1 to the max.
    step = int(D.all_reduce_max(int(found.name.split("_")[-1]) if found is not None else -1, device))
    return None if step < 0 else checkpoint_dir(run_dir, step)


def _lock_run_dir(run_dir: Path, device: torch.device) -> RunDirLock | None:
    """Rank 0 creates run_dir and holds its lock; every rank stops if it cannot."""
    error, lock = None, None
    if D.is_main():
        try:
            create_run_dir(run_dir)
            lock = RunDirLock(run_dir)
            lock.acquire()
        except ConfigError as e:
            error = e
    _agree_or_raise(error, device, "cannot use run_dir")
    return lock


class LauncherWatch:
    """Under torchrun, a worker whose launcher died (kill -9) is re-parented; it must not train on
    unseen, and a re-run would start a second copy beside it. The loop polls this every step."""

    def __init__(self) -> None:
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def launcher_died(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


def divergence(loss: float, grad_norm: float, applied: bool, state: TrainState, precision: str) -> str | None:
    """What shows that training diverged at this step, or None. Counts fp16's skipped steps in
    ``state``. In bf16/fp32 a non-finite gradient is divergence even when the loss is finite; fp16
    overflows are expected now and then (dynamic loss scaling skips the step), but not many in a row."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not applied and precision != "fp16":
        return f"the gradient norm is {grad_norm} (loss {loss:.4g})"
    state.skipped_in_a_row = 0 if applied else state.skipped_in_a_row + 1
    if state.skipped_in_a_row >= FP16_MAX_SKIPS_IN_A_ROW:
        return f"fp16 gradients overflowed {state.skipped_in_a_row} steps in a row (loss scale {state.loss_scale:g})"
    return None


def _diverged(step: int, what: str, run_dir: Path, args: TrainArgs, precision: Precision) -> TrainingDiverged:
    last = latest_resumable(run_dir) if D.is_main() else None
    fp16_hint = ", or train in bf16/fp32 rather than fp16" if precision.name == "fp16" else ""
    where = (f"The last good checkpoint is {last}; re-running the same command resumes from it."
             if last else "No checkpoint was saved before it.")
    return TrainingDiverged(
        f"training diverged at step {step}: {what}. Stopping without saving a checkpoint of this state. {where} "
        f"Lower optim.lr (now {args.optim.lr:g}; this step used {lr_at(step, args):.3g}), lengthen the warm-up "
        f"(optim.pct_start) or check the data{fp16_hint}."
    )


@dataclass
class Training:
    """Everything a run trains with: built by ``setup``, used by ``train`` and by ``utils.measure``."""

    args: TrainArgs
    device: torch.device
    precision: Precision
    inputs: Inputs
    model: TransformerWithLoss
    optimizer: torch.optim.Optimizer
    loader: TrainLoader
    eval_batches: list[Batch]
    state: TrainState


def setup(args: TrainArgs, inputs: Inputs, device: torch.device, precision: Precision,
          resume_from: Path | None = None) -> Training:
    """Loaders over the checked data, the sharded model, its optimizer, and the state (restored from
    ``resume_from`` when given)."""
    policy = args.data.long_sample_policy
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, rank=D.rank(), world_size=D.world_size(),
              long_sample_policy=policy)
    loader = build_train_loader(inputs.train_data, seed=args.seed, **kw)
    eval_batches = [] if args.no_eval else build_eval_batches(inputs.eval_data, **kw)
    model = build_model(args, inputs.model_args, device, precision, vision=inputs.has_images)
    optimizer = build_optimizer(model, args)
    state = TrainState() if resume_from is None else _resume(resume_from, model, optimizer, loader, args)
    return Training(args, device, precision, inputs, model, optimizer, loader, eval_batches, state)


def save(t: Training, run_dir: Path) -> None:
    """A resumable checkpoint of step ``t.state.step`` (collective: every rank calls it)."""
    args = t.args
    save_checkpoint(
        run_dir, t.state.step, t.model, t.optimizer,
        model_args=t.inputs.model_args, lora=args.lora if args.lora.enable else None,
        save_adapters=args.save_adapters, save_dtype=t.precision.dtype,
        tokenizer_file=tokenizer_file_to_ship(t.inputs.tokenizer),
        train_state={"train": asdict(t.state), "world_size": D.world_size(), "config": to_dict(args)},
        rank_state=_rng_state(t.loader), num_keep=args.num_ckpt_keep, base_folder=Path(args.model_id_or_path),
    )


def tokens_per_step(args: TrainArgs) -> int:
    """Input positions per optimizer step over all ranks, filler included."""
    return args.batch_size * args.seq_len * args.num_microbatches * D.world_size()


def run(args: TrainArgs, config_path: str, device: torch.device) -> None:
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed + D.rank())  # dropout masks; data order has its own seeded RNGs
    logger.info("Training on %d process(es), device %s, precision %s, activation checkpointing %s",
                D.world_size(), device.type, precision.name, args.checkpoint_mode)
    inputs = load_inputs(args, config_path, device)
    run_dir = Path(args.run_dir)
    lock = _lock_run_dir(run_dir, device)  # held until this process exits
    try:
        resume_from = _find_resumable(run_dir, device)
        if D.is_main():
            (run_dir / "args.yaml").write_text(yaml.safe_dump(to_dict(args), sort_keys=False))
        D.barrier()
        t = setup(args, inputs, device, precision, resume_from)
        if D.is_main():  # rows past the restart point belong to an attempt that is being redone
            keep_metrics_up_to(run_dir, t.state.step)
        if t.state.step >= args.max_steps:
            logger.info("Nothing to do: run_dir already reached max_steps=%d.", args.max_steps)
            return
        train(t, run_dir, resumed=resume_from is not None)
    finally:
        if lock is not None:
            lock.release()


def train(t: Training, run_dir: Path, resumed: bool) -> None:
    """The loop: steps until max_steps, a stop request or divergence; evaluates, logs and saves."""
    args, state = t.args, t.state
    progress = Progress(t, run_dir)
    stop, launcher = StopRequest(), LauncherWatch()
    last_saved = state.step if resumed else None
    t.model.train()
    while state.step < args.max_steps:
        step = state.step + 1
        lr = lr_at(step, args)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batches = [next(t.loader) for _ in range(args.num_microbatches)]
        loss, grad_norm, applied = train_step(t.model, t.optimizer, batches, args, state, t.precision, t.device)
        # loss and grad_norm are reduced over ranks: every rank takes the same branch.
        problem = divergence(loss, grad_norm, applied, state, t.precision.name)
        if problem is not None:
            raise _diverged(step, problem, run_dir, args, t.precision)
        dt = time.perf_counter() - t0
        state.step, state.tokens_seen, state.train_seconds = step, state.tokens_seen + tokens_per_step(args), state.train_seconds + dt
        is_last = step == args.max_steps
        stopping = _stop_agreed(stop, launcher, t.device)
        if not args.no_eval and (_every(step, args.eval_freq) or is_last):
            progress.log_eval(step, evaluate(t.model, t.eval_batches, t.device), loss)
        progress.step_done(step, loss, lr, grad_norm, applied, dt, log=step % args.log_freq == 0 or is_last or stopping)
        if not args.no_ckpt and (_every(step, args.ckpt_freq) or is_last or stopping):
            save(t, run_dir)
            last_saved = step
        if stopping:
            logger.info("Stop requested: saved step %s, exiting. Re-run the same command to resume.", last_saved)
            break
    progress.finish()


def _every(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def _stop_agreed(stop: StopRequest, launcher: LauncherWatch, device: torch.device) -> bool:
    """Whether any rank was asked to stop (a signal, or its launcher died): all ranks stop together."""
    orphaned = launcher.launcher_died()
    if orphaned:
        logger.warning("The torchrun launcher (pid %d) is gone: saving a checkpoint and exiting.", launcher.parent)
    return D.all_reduce_max(1.0 if stop.requested or orphaned else 0.0, device) > 0


class Progress:
    """Metrics files, wandb, the progress bar and the log lines of one session of a run."""

    def __init__(self, t: Training, run_dir: Path) -> None:
        args = t.args
        self.args, self.device = args, t.device
        self.state, self.first_step = t.state, t.state.step
        self.wandb_run = (
            start_wandb(args.wandb.project, args.wandb.run_name, args.wandb.offline, run_dir, to_dict(args))
            if args.wandb_enabled else None
        )
        self.train_log = MetricsLogger(run_dir, "train", self.wandb_run)
        self.eval_log = MetricsLogger(run_dir, "eval", self.wandb_run)
        self.bar = tqdm(total=args.max_steps, initial=t.state.step, disable=not (D.is_main() and sys.stderr.isatty()),
                        dynamic_ncols=True, leave=False)
        self.started, self.steps, self.seconds = time.perf_counter(), 0, 0.0

    def log_eval(self, step: int, result: tuple[float, float, int], train_loss: float) -> None:
        eval_loss, ppl, n_eval = result
        self.eval_log.log({"step": step, "eval_loss": eval_loss, "perplexity": ppl, "eval_tokens": n_eval,
                           "train_loss": train_loss})
        logger.info("step %d | eval_loss %.4f | perplexity %.3f | %d target tokens", step, eval_loss, ppl, n_eval)

    def step_done(self, step: int, loss: float, lr: float, grad_norm: float, applied: bool, dt: float, log: bool) -> None:
        self.steps, self.seconds = self.steps + 1, self.seconds + dt
        self.bar.update(1)
        if not log:
            return
        elapsed = time.perf_counter() - self.started
        per_step = tokens_per_step(self.args)
        rate = self.steps * per_step / elapsed
        mem = peak_memory_gb(self.device)
        self.train_log.log({
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": per_step / dt,
            "avg_tokens_per_s": rate, "peak_mem_gb": mem, "tokens_seen": self.state.tokens_seen,
            "step_skipped": not applied,
        })
        eta = format_duration((self.args.max_steps - step) * elapsed / self.steps)
        line = (f"step {step:>6}/{self.args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                f"{rate:,.0f} tok/s | peak mem {mem:.2f} GB | ETA {eta}")
        (self.bar.write(line) if not self.bar.disable else logger.info(line))

    def finish(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        resumed = (f" (resumed at step {self.first_step}; {format_duration(self.state.train_seconds)} of training "
                   "in all)" if self.first_step else "")
        logger.info("Done: step %d of %d; this run trained %d steps in %s%s.", self.state.step, self.args.max_steps,
                    self.steps, format_duration(self.seconds), resumed)


_USAGE = """usage: train.py CONFIG.yaml [--key value ...]

Trains LoRA adapters (or the full model) as described by CONFIG.yaml. Dotted options override
the file, e.g. --max_steps 50 --optim.lr 1e-4 (command line > YAML > defaults).
Run with torchrun for several GPUs: torchrun --nproc-per-node 8 train.py CONFIG.yaml
Re-running the same command with an existing run_dir resumes from its newest checkpoint."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    config_path, overrides = argv[0], argv[1:]
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        args = load_train_args(config_path, overrides)
        device = D.init_distributed()
        setup_logging()
        try:
            run(args, config_path, device)
        finally:
            D.destroy()
    except (ConfigError, ValueError, OSError, TrainingDiverged) as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
            D.report_to_torchrun(f"error: {e}")
        return 1
    return 0

