"""A Hugging Face-format Mistral/Mixtral folder loads as a base model, converted while streaming."""

from __future__ import annotations

import json

import pytest
import torch

from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors
from model.configs import load_model_args
from model.hf import key_from_hf, key_to_hf, to_hf_state_dict
from model.hf_config import hf_config_from_args
from model.keys import to_checkpoint_names
from model.tiny import random_base_model, tiny_args
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf

SEQLENS = [9, 5]


def _save_hf(folder, overrides: dict, seed: int = 0, **save_kwargs):
    """A random transformers model written by save_pretrained (the hub layout)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  sliding_window=None, tie_word_embeddings=False)
    common.update(overrides)
    moe = "num_local_experts" in common
    config = (MixtralConfig if moe else MistralConfig)(**common)
    torch.manual_seed(seed)
    hf = (MixtralForCausalLM if moe else MistralForCausalLM)(config)
    return save_random_hf(hf, folder, **save_kwargs)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": 4, "rope_theta": 1e6}, {"num_local_experts": 3, "num_experts_per_tok": 2}],
    ids=["dense", "sliding_window", "mixtral"],
)
def test_hf_folder_logits_match_transformers(tmp_path, overrides):
    hf = _save_hf(tmp_path, overrides)
    ours = Transformer.from_folder(tmp_path, dtype=torch.float32).eval()
    assert ours.args.sliding_window == overrides.get("sliding_window")
    assert (ours.args.moe is not None) == ("num_local_experts" in overrides)
    tokens = torch.randint(0, 128, (sum(SEQLENS),), generator=torch.Generator().manual_seed(0))
    assert_packed_matches_hf(ours, hf, tokens, SEQLENS)


def test_sharded_hf_folder_with_lora_and_bf16(tmp_path):
    _save_hf(tmp_path, {}, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    model = Transformer.from_folder(tmp_path, dtype=torch.bfloat16, lora=LoraArgs(rank=2))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_import_is_exact_inverse_of_export(tmp_path):
    """Mistral -> HF (to_hf_state_dict) -> streamed back: every tensor bit-for-bit."""
    from safetensors.torch import save_file


    args = tiny_args(moe={"num_experts": 2, "num_experts_per_tok": 1}, sliding_window=8)
    state = to_checkpoint_names(random_base_model(args, seed=3).state_dict(), args)  # experts one by one
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype="float32")))
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(state, args).items()}, str(tmp_path / "model.safetensors"))
    assert load_model_args(tmp_path) == args
    loaded = {key: t for key, t, _ in iter_checkpoint_tensors(tmp_path)}
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
        assert key_from_hf(key_to_hf(key, moe=True), moe=True) == key


def test_fused_transformers5_expert_layout_is_split(tmp_path):
    """An in-memory transformers 5 state dict (fused experts) written as is also loads."""
    from safetensors.torch import save_file

    hf = _save_hf(tmp_path / "ref", {"num_local_experts": 2, "num_experts_per_tok": 1})
    folder = tmp_path / "fused"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"))
    assert any("gate_up_proj" in k for k in hf.state_dict())
    a = dict((k, t) for k, t, _ in iter_checkpoint_tensors(tmp_path / "ref"))
    b = dict((k, t) for k, t, _ in iter_checkpoint_tensors(folder))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_tied_embeddings_fill_the_output_layer(tmp_path):
    _save_hf(tmp_path, {"tie_word_embeddings": True})
    model = Transformer.from_folder(tmp_path, dtype=torch.float32)
    # One parameter, as in transformers: training and export keep the tie (tests/test_ministral3.py).
    assert model.args.tied_embeddings and model.output.weight is model.tok_embeddings.weight


def test_unsupported_hf_folders_are_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama'"):
        load_model_args(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['hidden_size'"):
        load_model_args(tmp_path)
    _save_hf(tmp_path, {})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_folder(tmp_path)


def test_unknown_hf_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_hf(tmp_path, {})
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: weight 'layers\.0\.attention\.wq\.bias' is not part"):
        Transformer.from_folder(tmp_path)
