"""Model hyper-parameters, read from a checkpoint folder's ``params.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REQUIRED_INT = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


@dataclass
class MoeArgs:
    num_experts: int = 8
    num_experts_per_tok: int = 2


@dataclass
class LoraArgs:
    """LoRA settings. ``scaling`` multiplies ``B A x`` directly (mistral-finetune's convention);
    PEFT's ``lora_alpha`` equals ``scaling * rank``."""

    enable: bool = True
    rank: int = 16
    scaling: float = 2.0
    dropout: float = 0.0
    # Names of the linear layers that get adapters (attention and feed-forward, MoE experts included).
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])

    def __post_init__(self) -> None:
        if not self.enable:
            return
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}; 8 to 128 is usual.")
        if self.scaling <= 0:
            raise ValueError(f"lora.scaling must be > 0, got {self.scaling!r}; the default is 2.0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        allowed = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        bad = [t for t in self.target_modules if t not in allowed]
        if bad or not self.target_modules:
            raise ValueError(
                f"lora.target_modules has {bad or 'no entries'}; choose from {sorted(allowed)}."
            )


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    moe: MoeArgs | None = None
    # Keys of params.json this code does not use, kept so a saved params.json round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Build from a params.json mapping; ``source`` names the file in error messages."""
        params = dict(params)
        values: dict[str, Any] = {}
        for key in _REQUIRED_INT:
            if key not in params:
                raise ValueError(f"{source}: missing required key '{key}' (an integer).")
            value = params.pop(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: '{key}' must be a positive integer, got {value!r}.")
            values[key] = value
        if "norm_eps" not in params:
            raise ValueError(f"{source}: missing required key 'norm_eps' (a float such as 1e-5).")
        values["norm_eps"] = _positive_float(params.pop("norm_eps"), "norm_eps", source)
        if params.get("rope_theta") is not None:
            values["rope_theta"] = _positive_float(params.pop("rope_theta"), "rope_theta", source)
        else:
            params.pop("rope_theta", None)
        window = params.pop("sliding_window", None)
        if window is not None:
            if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
                raise ValueError(f"{source}: 'sliding_window' must be a positive integer or null, got {window!r}.")
            values["sliding_window"] = window
        moe = params.pop("moe", None)
        if moe is not None:
            if not isinstance(moe, dict):
                raise ValueError(f"{source}: 'moe' must be an object, got {moe!r}.")
            moe = dict(moe)
            moe_values = {}
            for key in ("num_experts", "num_experts_per_tok"):
                if key not in moe:
                    raise ValueError(f"{source}: 'moe' is missing '{key}'.")
                moe_values[key] = moe.pop(key)
            values["moe"] = MoeArgs(**moe_values)
            if moe:  # keep unknown moe keys too
                params["_moe_extra"] = moe
        params.pop("lora", None)  # a checkpoint's own LoRA settings are not model shape
        return cls(**values, extra=params)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        """From ``params.json``, or from a Hugging Face folder's ``config.json`` when there is none."""
        path = Path(folder) / "params.json"
        hf_config = Path(folder) / "config.json"
        if not path.is_file() and hf_config.is_file():
            from model.hf import args_from_hf_config  # model.hf imports this module

            return args_from_hf_config(_read_json_object(hf_config), source=str(hf_config))
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: model_id_or_path must be a Mistral checkpoint folder with params.json "
                "or a Hugging Face Mistral/Mixtral folder with config.json."
            )
        return cls.from_dict(_read_json_object(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """params.json contents: the original unknown keys plus every field we use."""
        extra = dict(self.extra)
        moe_extra = extra.pop("_moe_extra", {})
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out["moe"] = {
                "num_experts": self.moe.num_experts,
                "num_experts_per_tok": self.moe.num_experts_per_tok,
                **moe_extra,
            }
        out.update(extra)
        return out


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object.")
    return params


def _positive_float(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{source}: '{key}' must be a positive number, got {value!r}.")
    return float(value)
