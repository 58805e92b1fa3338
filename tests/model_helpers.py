"""Test helpers around ``model.tiny`` (tiny models and checkpoints): the real tokenizer files."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from model.args import ModelArgs
from model.tiny import random_base_model, tiny_args, write_random_model

__all__ = ["bundled_tokenizer_file", "random_base_model", "read_params", "tiny_args", "write_checkpoint"]


def write_checkpoint(folder: Path, args: ModelArgs, seed: int = 0, layout: str = "safetensors",
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """``model.tiny.write_random_model``; with ``tokenizer``, models of the v3 (32768) or Tekken
    (131072) vocabulary also get the matching real tokenizer file that mistral-common ships, as an
    official release folder has."""
    state = write_random_model(folder, args, seed, layout, dtype)
    if tokenizer and args.vocab_size in (32768, 131072):
        src = bundled_tokenizer_file(tekken=args.vocab_size == 131072)
        shutil.copy(src, folder / ("tekken.json" if src.suffix == ".json" else "tokenizer.model.v3"))
    return state


@functools.cache
def bundled_tokenizer_file(tekken: bool = False) -> Path:
    """mistral-common's bundled v3 tokenizer file (SentencePiece, or Tekken)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return Path(MistralTokenizer.v3(is_tekken=tekken).instruct_tokenizer.tokenizer.file_path)


def read_params(folder: Path) -> dict:
    return json.loads((folder / "params.json").read_text())


def save_random_hf(hf, folder: Path, **save_kwargs):
    """Save a transformers model after giving every weight a visible size (transformers' own init is
    small and leaves norms at 1, which would let a wrong norm or a missing weight pass)."""
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 1.0)
    hf.save_pretrained(folder, **save_kwargs)
    return hf.eval()


def tiny_mistral_text_config(vocab_size: int, intermediate_size: int = 128) -> dict:
    """transformers' ``text_config`` of the tiny multimodal test models: a 2-layer grouped-query Mistral."""
    return dict(model_type="mistral", vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                sliding_window=None, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def hf_and_native_mistral3(config, root: Path, cls=None) -> tuple:
    """A seeded random ``Mistral3ForConditionalGeneration`` (or ``cls``, e.g. Llava for Pixtral 12B) of
    ``config`` written by save_pretrained to ``root/hf``, and the same weights in the native layout in
    ``root/native``: (model, hf, native)."""
    from transformers import Mistral3ForConditionalGeneration

    from model.checkpoint import iter_checkpoint_tensors, save_model_folder
    from model.configs import load_model_args, params_from_args

    torch.manual_seed(0)
    hf = save_random_hf((cls or Mistral3ForConditionalGeneration)(config), root / "hf")
    state = {key: t for key, t, _ in iter_checkpoint_tensors(root / "hf")}
    save_model_folder(root / "native", params_from_args(load_model_args(root / "hf")), state)
    return hf, root / "hf", root / "native"


def assert_packed_matches_hf(ours, hf, tokens: torch.Tensor, seqlens: list[int]) -> float:
    """Our logits for the packed documents == transformers run alone on each one (relative error
    < 1e-4); returns the worst relative error."""
    worst = 0.0
    with torch.no_grad():
        packed = ours(tokens, seqlens)
        for doc, logits in zip(tokens.split(seqlens), packed.split(seqlens), strict=True):
            ref = hf(input_ids=doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            worst = max(worst, ((logits - ref).abs().max() / ref.abs().max()).item())
    return worst


def train_adapters(model, tokens: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps of next-token loss on ``tokens`` (one document), adapters only: adapters no
    longer zero, as training leaves them."""
    from model.lora import freeze_all_but_lora

    freeze_all_but_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(tokens[:-1], [len(tokens) - 1]), tokens[1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def write_consolidated(run: Path, params: dict, lora, targets: list[str], name: str,
                       state: dict[str, torch.Tensor]) -> Path:
    """RUN_DIR/checkpoints/checkpoint_000003/consolidated as training writes it: params.json with its
    lora section and ``state`` saved as ``name``; returns the folder."""
    from safetensors.torch import save_file

    folder = run / "checkpoints" / "checkpoint_000003" / "consolidated"
    folder.mkdir(parents=True)
    lora_params = {"enable": True, "rank": lora.rank, "scaling": lora.scaling, "dropout": lora.dropout,
                   "target_modules": targets}
    (folder / "params.json").write_text(json.dumps({**params, "lora": lora_params}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    return folder
