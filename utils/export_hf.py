"""Export a training checkpoint for Hugging Face: a PEFT adapter, or with ``--merged`` a full model.

    python -m utils.export_hf --checkpoint RUN_DIR/checkpoints/checkpoint_000300 --out DIR \\
        [--merged] [--base_model PATH] [--max_shard_size 5GB]

``--checkpoint`` may also be ``RUN_DIR`` itself (its newest intact checkpoint is exported, and named)
or a Mistral model folder (with ``--merged``: that model in Hugging Face format, e.g. the HF base a
PEFT adapter loads onto).

The adapter export needs no base weights: ``adapter_config.json`` + ``adapter_model.safetensors``
(HF key names, wq/wk ``lora_B`` rows permuted for HF's RoPE layout; a multimodal model's vision adapters
under ``Mistral3ForConditionalGeneration``'s ``model.vision_tower`` / ``model.multi_modal_projector``
module names, the encoder's q/k ``lora_B`` permuted alike). ``--merged`` streams the base
model tensor by tensor, folds each adapter in (W + scaling * B A, in float32), renames/permutes it
and writes ``model.safetensors`` (or shards + ``model.safetensors.index.json``), so peak memory is
one shard plus one tensor. The base model is ``model_id_or_path`` from ``RUN_DIR/args.yaml`` unless
``--base_model`` overrides it; it may be a Mistral or a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.args import VISION_TARGETS, LoraArgs, ModelArgs
from model.checkpoint import checkpoint_files, is_hf_folder, iter_checkpoint_tensors
from model.configs import args_from_params, load_model_args, read_json_object
from model.hf import hf_tensors, peft_adapter_config, to_peft_state_dict
from model.hf_config import hf_config_from_args
from model.merge import merge_weights
from model.multimodal import vision_target

logger = logging.getLogger("export_hf")

# mistral-common tokenizer files, in the order we prefer them when a folder holds several.
_TOKENIZER = re.compile(r"^(tekken\.json|tokenizer\.model(\.v\d+m?\d*)?)$")
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers rejects safetensors files without it
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """A checkpoint or option that cannot be exported; the message names the file and the fix."""


@dataclass
class Checkpoint:
    folder: Path  # the consolidated/ folder: params.json + lora.safetensors or consolidated.safetensors
    args: ModelArgs
    lora: LoraArgs | None
    adapter: Path | None  # lora.safetensors, when the run saved adapters
    run_dir: Path | None  # RUN_DIR, when the folder sits in RUN_DIR/checkpoints/checkpoint_N/consolidated


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of ``run_dir`` that is intact; damaged newer ones are skipped with a
    warning. One without a manifest (written before manifests existed) counts as intact."""
    from finetune.checkpointing import MANIFEST, list_checkpoints, verify_checkpoint

    found = list_checkpoints(run_dir)
    for ckpt in reversed(found):
        if not (ckpt / "consolidated" / "params.json").is_file():
            problem = f"{ckpt / 'consolidated' / 'params.json'} is missing"
        else:
            problem = verify_checkpoint(ckpt) if (ckpt / MANIFEST).is_file() else None
        if problem is None:
            logger.info("--checkpoint %s is a run_dir: exporting its newest checkpoint, %s", run_dir, ckpt.name)
            return ckpt
        logger.warning("skipping checkpoint %s: %s", ckpt.name, problem)
    raise FileNotFoundError(
        f"{run_dir / 'checkpoints'} has no {'intact ' if found else ''}checkpoint_NNNNNN folder (training "
        "writes one every ckpt_freq steps and at the end); pass --checkpoint RUN_DIR/checkpoints/checkpoint_N."
    )


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Accept ``RUN_DIR``, ``checkpoint_N``, ``checkpoint_N/consolidated`` or a Mistral model folder."""
    path = Path(path)
    if not (path / "params.json").is_file() and (path / "checkpoints").is_dir():
        path = newest_checkpoint(path)
    folder = path / "consolidated" if (path / "consolidated").is_dir() else path
    params_path = folder / "params.json"
    if not params_path.is_file():
        hf = " It is a Hugging Face folder already: load it with from_pretrained." if is_hf_folder(folder) else ""
        raise FileNotFoundError(
            f"{params_path} not found: --checkpoint must be RUN_DIR, RUN_DIR/checkpoints/checkpoint_N "
            f"(or its consolidated/ folder) as written by training, or a Mistral model folder.{hf}"
        )
    params = read_json_object(params_path)  # bad JSON: an error naming the file and line
    lora_params = params.get("lora") or {}
    unknown = sorted(set(lora_params) - set(LoraArgs.__dataclass_fields__))
    if unknown:
        raise ExportError(f"{params_path}: unknown key(s) {unknown} in 'lora'; expected {sorted(LoraArgs.__dataclass_fields__)}.")
    lora = LoraArgs(**lora_params) if lora_params.get("enable", False) else None
    adapter = folder / "lora.safetensors"
    if not adapter.is_file():
        adapter = None
        if not any(folder.glob("consolidated*")):
            raise FileNotFoundError(
                f"{folder}: neither lora.safetensors nor consolidated weights; the checkpoint is incomplete."
            )
        checkpoint_files(folder)  # merged weights or a base model in any layout; says what is missing
    if adapter is not None and lora is None:
        raise ExportError(
            f"{params_path}: lora.safetensors is present but params.json has no enabled 'lora' section "
            "(rank, scaling); training writes it. Add it with the run's lora settings."
        )
    run_dir = folder.parent.parent.parent if folder.parent.parent.name == "checkpoints" else None
    return Checkpoint(folder, args_from_params(params, source=str(params_path)), lora, adapter, run_dir)


def resolve_base_model(ckpt: Checkpoint, base_model: str | None) -> str | None:
    """--base_model, else ``model_id_or_path`` from RUN_DIR/args.yaml; None when neither exists."""
    if base_model is not None:
        return base_model
    if ckpt.run_dir is None or not (ckpt.run_dir / "args.yaml").is_file():
        return None
    import yaml

    config = yaml.safe_load((ckpt.run_dir / "args.yaml").read_text()) or {}
    value = config.get("model_id_or_path") if isinstance(config, dict) else None
    return str(value) if value else None


def export_adapter(ckpt: Checkpoint, out: Path, base_model: str | None) -> None:
    if ckpt.adapter is None or ckpt.lora is None:
        raise ExportError(
            f"{ckpt.folder} holds merged weights (consolidated.safetensors, save_adapters: false), not an "
            "adapter; export it with --merged instead."
        )
    state = load_file(str(ckpt.adapter))
    config = peft_adapter_config(_trained_targets(ckpt, state), ckpt.args, base_model)  # may refuse: before writing
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_state_dict(state, ckpt.args), str(out / "adapter_model.safetensors"), _SAFETENSORS_METADATA)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if base_model is None:
        logger.warning("no base model known (no RUN_DIR/args.yaml, no --base_model): "
                       "adapter_config.json has base_model_name_or_path null")
    elif not (Path(base_model) / "config.json").is_file():
        logger.warning("base model %s is not a Hugging Face folder; load the adapter onto the HF-format "
                       "release of the same model (or a --merged export of it)", base_model)


def _trained_targets(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> LoraArgs:
    """``ckpt.lora`` without the vision targets the adapter file has no adapter for: a run that trained
    the language model alone (no images, the vision side not built) still lists the vision targets of its
    configuration, and PEFT would give those modules fresh adapters of its own."""
    assert ckpt.lora is not None
    trained = {vision_target(key) for key in state} - {None}
    targets = [t for t in ckpt.lora.target_modules if t not in VISION_TARGETS or t in trained]
    if not targets:
        raise ExportError(f"{ckpt.adapter} holds no adapter for the targets {ckpt.lora.target_modules} that "
                          f"{ckpt.folder / 'params.json'} lists; is it the adapter file written by that run?")
    if targets != ckpt.lora.target_modules:
        logger.info("not exporting vision targets without adapters in %s: %s", ckpt.adapter,
                    sorted(set(ckpt.lora.target_modules) - set(targets)))
    return replace(ckpt.lora, target_modules=targets)


def _merged_tensors(ckpt: Checkpoint, base_model: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Mistral key, merged tensor) one at a time."""
    if ckpt.adapter is None:  # save_adapters: false already wrote merged weights
        for key, tensor, _ in iter_checkpoint_tensors(ckpt.folder):
            yield key, tensor
        return
    assert ckpt.lora is not None
    if base_model is None:
        raise ExportError(
            f"--merged needs the base model the adapter was trained on: no {ckpt.run_dir or '<run dir>'}/args.yaml "
            "with model_id_or_path was found; pass --base_model /path/to/base."
        )
    base = Path(base_model)
    base_args = load_model_args(base)
    if _shape(base_args) != _shape(ckpt.args):
        raise ExportError(
            f"base model {base} has shape {_shape(base_args)} but {ckpt.folder / 'params.json'} has "
            f"{_shape(ckpt.args)}; pass the --base_model the adapter was trained on."
        )
    weights = ((key, tensor) for key, tensor, _ in iter_checkpoint_tensors(base))
    yield from merge_weights(weights, load_file(str(ckpt.adapter)), ckpt.lora.scaling,
                             source=str(ckpt.adapter), base=str(base))


def _shape(args: ModelArgs) -> tuple:
    moe = (args.moe.num_experts, args.moe.num_experts_per_tok, args.moe.expert_hidden_dim) if args.moe else None
    m = args.mla
    mla = (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) if m else None
    return (args.dim, args.n_layers, args.head_dim, args.hidden_dim, args.n_heads, args.n_kv_heads,
            args.vocab_size, moe, mla)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (one tensor may exceed it),
    holding one shard in memory; names them HF-style once the count is known."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self._flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"model-shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.buffer, str(path), _SAFETENSORS_METADATA)
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        if self.buffer:
            self._flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def export_merged(ckpt: Checkpoint, out: Path, base_model: str | None, max_shard_bytes: int) -> list[str]:
    sources = [ckpt.folder] + ([Path(base_model)] if base_model else [])
    if any(out.resolve() == src.resolve() for src in sources):
        raise ExportError(f"--out {out} is the checkpoint or base model folder it reads from; choose a new folder.")
    hf_config_from_args(ckpt.args)  # refuses a model transformers has no class for, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous export with other sharding would confuse loaders
    writer = ShardWriter(out, max_shard_bytes)
    dtype = None
    # Renamed one by one; Mistral Small 4's routed experts fused per layer (model.hf_experts).
    for key, tensor in hf_tensors(_merged_tensors(ckpt, base_model), ckpt.args):
        dtype = dtype or tensor.dtype
        writer.add(key, tensor)
    files = writer.close()
    config = hf_config_from_args(ckpt.args, dtype=_DTYPE_NAMES.get(dtype, "bfloat16"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files


def copy_tokenizer(ckpt: Checkpoint, out: Path, base_model: str | None) -> Path | None:
    """Copy the mistral-common tokenizer file (checkpoint folder first, then the base model).

    transformers 5 reads it directly (``MistralCommonBackend``); ``tokenizer_config.json`` tells
    ``AutoTokenizer`` so. No ``tokenizer.json`` (fast-tokenizer) conversion is written.
    """
    folders = [ckpt.folder] + ([Path(base_model)] if base_model and Path(base_model).is_dir() else [])
    for folder in folders:
        found = sorted(p for p in folder.iterdir() if _TOKENIZER.match(p.name))
        if found:
            shutil.copy2(found[-1], out / found[-1].name)
            (out / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "MistralCommonBackend"}, indent=2) + "\n"
            )
            return out / found[-1].name
    logger.warning("no tokenizer file (tekken.json, tokenizer.model.v3, ...) in %s; none exported",
                   " or ".join(map(str, folders)))
    return None


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ExportError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB.")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m utils.export_hf", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="RUN_DIR (its newest checkpoint), RUN_DIR/checkpoints/checkpoint_N (or its consolidated/), "
        "or a Mistral model folder",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merged", action="store_true", help="write a full HF model with the adapter folded in")
    parser.add_argument("--base_model", default=None,
                        help="base model folder (Mistral or HF format); default: model_id_or_path in RUN_DIR/args.yaml")
    parser.add_argument("--max_shard_size", default="5GB", help="largest model*.safetensors shard (--merged)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    ckpt = read_checkpoint(opts.checkpoint)
    base_model = resolve_base_model(ckpt, opts.base_model)
    out = Path(opts.out)
    if opts.merged:
        files = export_merged(ckpt, out, base_model, parse_size(opts.max_shard_size))
        logger.info("wrote merged model (%s) to %s", ", ".join(files), out)
    else:
        export_adapter(ckpt, out, base_model)
        logger.info("wrote PEFT adapter to %s (base_model_name_or_path: %s)", out, base_model)
    copy_tokenizer(ckpt, out, base_model)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # a user's mistake: the message is the whole story
        raise SystemExit(f"error: {e}") from None
