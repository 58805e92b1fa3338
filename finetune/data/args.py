"""Data configuration: plain dataclasses, built from the ``data:`` section of the YAML config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

LONG_SAMPLE_POLICIES = ("split", "truncate", "drop")


@dataclass
class InstructArgs:
    # Reshuffle instruct sources every epoch (seeded).
    shuffle: bool = True
    # Expand a function-calling conversation with k assistant turns into k samples, one ending at each
    # turn, so that every tool call is trained (only the final turn of a tools sample is a target).
    dynamic_chunk_fn_call: bool = True


@dataclass
class DataArgs:
    # Pretraining sources: "path[:weight],path[:weight]"; a path is a .jsonl file or a directory.
    data: str = ""
    # Reshuffle pretraining sources every epoch (seeded).
    shuffle: bool = False
    # Instruct (chat / function-calling) training sources, same syntax as `data`.
    instruct_data: str = ""
    # Instruct evaluation sources, same syntax; weights are ignored.
    eval_instruct_data: str = ""
    instruct: InstructArgs = field(default_factory=InstructArgs)
    # What to do with a sample that has more than seq_len positions (len(tokens) - 1 > seq_len):
    #   split    - cut it into seq_len pieces, each its own row; a piece attends only to itself (default)
    #   truncate - keep the first seq_len positions, drop the rest
    #   drop     - leave the sample out
    # The count of such samples is reported either way (`python -m utils.validate_data`).
    long_sample_policy: str = "split"
    # Where tokenized arrays are cached; "" means $XDG_CACHE_HOME/mistral-lora-finetune/tokens
    # (~/.cache/... when XDG_CACHE_HOME is unset).
    cache_dir: str = ""

    @property
    def cache_path(self) -> Path:
        """``cache_dir`` as a folder, ``~`` expanded; read when used, so the config itself reads no
        environment variable."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "mistral-lora-finetune" / "tokens"

    def validate(self) -> None:
        """Check the settings that need no file system access; paths are checked when data is loaded."""
        from finetune.data.sources import split_source_string  # local: keep this module import-light

        if not self.data.strip() and not self.instruct_data.strip():
            raise ValueError(
                "data.data and data.instruct_data are both empty: nothing to train on. Set "
                "data.instruct_data: /path/to/train.jsonl (chat data) or data.data: /path/to/text.jsonl "
                "(pretraining text)."
            )
        for key, value in (
            ("data.data", self.data),
            ("data.instruct_data", self.instruct_data),
            ("data.eval_instruct_data", self.eval_instruct_data),
        ):
            split_source_string(value, key)
        if self.long_sample_policy not in LONG_SAMPLE_POLICIES:
            raise ValueError(
                f"data.long_sample_policy is {self.long_sample_policy!r}; use one of "
                f"{', '.join(LONG_SAMPLE_POLICIES)} (default: split)."
            )
