"""The training configuration tree (``train.py CONFIG.yaml``).

Field names follow mistral-finetune's, so its users' YAML files load unchanged; the additions
(precision, attention backend, resume-related options, optimizer betas, ...) default to what a
user of the reference would get, or better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import ConfigError, load_config
from finetune.data.args import DataArgs
from model.args import LoraArgs
from model.quant import QUANTIZATIONS

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "sdpa", "flex")
CHECKPOINT_MODES = ("full", "selective", "none")  # finetune/parallel.py implements them
# Accepted values of 'checkpoint' -> activation checkpointing mode.
CHECKPOINTS = {True: "full", False: "none", **{mode: mode for mode in CHECKPOINT_MODES}}


@dataclass
class OptimArgs:
    lr: float = 1e-4
    weight_decay: float = 0.1
    # Fraction of max_steps spent warming the learning rate up linearly from 0, before cosine decay.
    pct_start: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # The cosine decays to lr * min_lr_ratio at max_steps.
    min_lr_ratio: float = 0.0


@dataclass
class WandbArgs:
    # Setting a project turns wandb logging on; the API key is read from WANDB_API_KEY only.
    project: str | None = None
    offline: bool = False
    run_name: str | None = None
    # Accepted so old mistral-finetune YAML loads; a non-empty key is refused (see TrainArgs.validate).
    key: str | None = None


@dataclass
class MLFlowArgs:
    # Accepted for compatibility with mistral-finetune YAML; mlflow logging is not implemented.
    tracking_uri: str | None = None
    experiment_name: str | None = None


@dataclass
class TrainArgs:
    model_id_or_path: str
    run_dir: str
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    seed: int = 0
    num_microbatches: int = 1
    seq_len: int = 2048
    batch_size: int = 1
    max_norm: float = 1.0
    max_steps: int = 100
    log_freq: int = 1
    ckpt_freq: int = 0
    save_adapters: bool = True
    no_ckpt: bool = False
    num_ckpt_keep: int | None = 3
    eval_freq: int = 0
    no_eval: bool = True
    # Activation checkpointing of every transformer block: true (= full: keep only each block's
    # input, recompute the block in backward), selective (also keep matmul and attention outputs,
    # recompute the feed-forward's up-projections and the element-wise work: faster, more memory),
    # or false (= none). See docs/memory.md.
    checkpoint: bool | str = True
    # bf16 (default on GPUs that support it), fp16 (older GPUs, with loss scaling), fp32
    # (default on CPU). Adapters and optimizer state are always float32.
    precision: str = "auto"
    # Attention kernel: flex (FlexAttention, default on CUDA) or sdpa (default on CPU, where
    # FlexAttention has no backward).
    attention: str = "auto"
    # Compile every transformer block with torch.compile (inductor), which fuses the element-wise
    # work around the matrix products. The first steps pay the compilation (seconds on small models,
    # longer on large ones). Dense models with an unquantized base only (not Mixtral, not nf4);
    # see docs/benchmarks.md for what it measured.
    compile: bool = False
    # Frozen base of the LoRA-wrapped linears: none (training precision) or nf4 (QLoRA: 4-bit
    # NormalFloat with double quantization, needs `pip install '.[qlora]'`; see docs/qlora.md).
    quantization: str = "none"
    # The model's mistral-common tokenizer file (tekken.json or tokenizer.model.v*) when the model
    # folder has none (e.g. a Hugging Face folder); by default the folder's own file. Never guessed.
    tokenizer_path: str | None = None
    # Start the adapters from an existing lora.safetensors (continue training on new data).
    init_lora_from: str | None = None
    # Rows of the packed batch fed to the output layer at once by the chunked cross-entropy.
    loss_chunk_size: int = 2048
    wandb: WandbArgs = field(default_factory=WandbArgs)
    mlflow: MLFlowArgs = field(default_factory=MLFlowArgs)
    # Written by mistral-finetune into args.yaml; accepted and ignored.
    world_size: int | None = None

    def validate(self) -> None:
        def positive(key: str) -> None:
            value = getattr(self, key)
            if value <= 0:
                raise ConfigError(f"'{key}' must be > 0, got {value}.")

        for key in ("num_microbatches", "seq_len", "batch_size", "max_steps", "log_freq", "loss_chunk_size"):
            positive(key)
        if not self.model_id_or_path:
            raise ConfigError("'model_id_or_path' is empty: set it to the downloaded Mistral model folder.")
        if not self.run_dir:
            raise ConfigError("'run_dir' is empty: set it to the folder where checkpoints and logs go.")
        if self.max_norm <= 0:
            raise ConfigError(f"'max_norm' must be > 0, got {self.max_norm}; 1.0 is usual.")
        if self.num_ckpt_keep is not None and self.num_ckpt_keep < 1:
            raise ConfigError(f"'num_ckpt_keep' must be >= 1 or null (keep all), got {self.num_ckpt_keep}.")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(
                f"'checkpoint' is {self.checkpoint!r}; use true (full), selective or false (none)."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"'precision' is {self.precision!r}; use one of {', '.join(PRECISIONS)}.")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"'attention' is {self.attention!r}; use one of {', '.join(ATTENTIONS)}.")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"'quantization' is {self.quantization!r}; use one of {', '.join(QUANTIZATIONS)}.")
        if self.quantization != "none" and not self.lora.enable:
            raise ConfigError(
                f"'quantization: {self.quantization}' quantizes the frozen base under LoRA adapters, but "
                "'lora.enable' is false; set lora.enable: true or quantization: none."
            )
        if self.compile and self.quantization != "none":
            raise ConfigError(
                f"'compile: true' does not support 'quantization: {self.quantization}' (bitsandbytes' 4-bit "
                "matmul is not traceable); set compile: false or quantization: none."
            )
        o = self.optim
        if o.lr <= 0:
            raise ConfigError(f"'optim.lr' must be > 0, got {o.lr}.")
        if not 0 <= o.pct_start < 1:
            raise ConfigError(f"'optim.pct_start' must be in [0, 1), got {o.pct_start}.")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"'optim.betas' must be two numbers in [0, 1), got {o.betas}.")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"'optim.min_lr_ratio' must be in [0, 1], got {o.min_lr_ratio}.")
        if self.save_adapters and not self.lora.enable:
            raise ConfigError(
                "'save_adapters' is true but 'lora.enable' is false: full fine-tuning has no adapters. "
                "Set save_adapters: false to save the full fine-tuned weights."
            )
        if not self.no_eval and not self.data.eval_instruct_data.strip():
            raise ConfigError(
                "'no_eval' is false but 'data.eval_instruct_data' is empty: give evaluation data "
                "or set no_eval: true."
            )
        if self.wandb.key:
            raise ConfigError(
                "'wandb.key' is not read from the config (a key in a YAML file leaks easily): remove it "
                "and export WANDB_API_KEY instead."
            )
        if self.mlflow.tracking_uri:
            raise ConfigError("'mlflow.tracking_uri' is set but mlflow logging is not supported; use wandb.")
        try:
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def checkpoint_mode(self) -> str:
        """One of CHECKPOINT_MODES: 'full', 'selective' or 'none'."""
        return CHECKPOINTS[self.checkpoint]

    @property
    def wandb_enabled(self) -> bool:
        return bool(self.wandb.project)


def load_train_args(path: str | Path, overrides: list[str] | None = None) -> TrainArgs:
    # load_config prefixes validate()'s message with the YAML file or the command-line option it names.
    return load_config(TrainArgs, path, overrides, validate=TrainArgs.validate)
