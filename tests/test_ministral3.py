"""Ministral 3 (2512): YaRN rotary scaling, the llama-4 query scaling by position and tied embeddings,
checked against transformers' own ``Ministral3ForCausalLM`` on tiny random checkpoints, in both the
Hugging Face layout and the native one (params.json + consolidated.safetensors)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.args import LoraArgs
from model.checkpoint import iter_checkpoint_tensors, save_model_folder
from model.configs import args_from_params, load_model_args, params_from_args
from model.hf_config import hf_config_from_args
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf

# Documents packed in one row; positions run past the original context (16) up to 40, so YaRN's
# blend and the llama-4 factors (1, 1 + beta ln 2, 1 + beta ln 3) all show.
SEQLENS = [41, 7, 23]
ORIGINAL = 16


def _hf_model(folder, *, tied: bool = False, mscale: tuple[float, float] = (1.0, 1.0), seed: int = 0):
    """A random transformers Ministral3ForCausalLM written by save_pretrained."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    config = Ministral3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4 * ORIGINAL,
        tie_word_embeddings=tied, sliding_window=None,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 8.0, "beta_slow": 1.0, "mscale": mscale[0], "mscale_all_dim": mscale[1],
            "llama_4_scaling_beta": 0.3,
        },
    )
    torch.manual_seed(seed)
    hf = Ministral3ForCausalLM(config)
    return save_random_hf(hf, folder)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (sum(SEQLENS),), generator=torch.Generator().manual_seed(0))


def _assert_matches_transformers(ours: Transformer, hf) -> None:
    """Packed logits == transformers run alone on each document (relative error < 1e-4)."""
    assert_packed_matches_hf(ours, hf, _tokens(), SEQLENS)


def _to_native(hf_folder, out) -> dict:
    """The HF folder converted to params.json + consolidated.safetensors (what a release ships)."""
    args = load_model_args(hf_folder)
    state = {key: t for key, t, _ in iter_checkpoint_tensors(hf_folder)}
    params = params_from_args(args)
    save_model_folder(out, params, state)
    return params


@pytest.mark.parametrize("mscale", [(1.0, 1.0), (1.0, 0.5)], ids=["release", "attention_factor"])
def test_logits_match_transformers_in_both_layouts(tmp_path, mscale):
    hf = _hf_model(tmp_path / "hf", mscale=mscale)
    ours = Transformer.from_folder(tmp_path / "hf", device="cpu", dtype=torch.float32).eval()
    assert ours.args.yarn is not None and ours.args.llama_4_scaling is not None
    expected = 1.0 if mscale == (1.0, 1.0) else (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)
    assert ours.args.yarn.attention_factor == pytest.approx(expected)
    _assert_matches_transformers(ours, hf)

    params = _to_native(tmp_path / "hf", tmp_path / "native")
    assert params["yarn"] == {"factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta": 8.0,
                              "alpha": 1.0, **({"apply_scale": False} if mscale == (1.0, 1.0)
                                               else {"attention_factor": expected})}
    assert params["llama_4_scaling"] == {"original_max_position_embeddings": ORIGINAL, "beta": 0.3}
    native = Transformer.from_folder(tmp_path / "native", device="cpu", dtype=torch.float32).eval()
    assert native.args == ours.args
    _assert_matches_transformers(native, hf)


def test_yarn_frequencies_equal_transformers_at_the_release_shape():
    """transformers' default Ministral3Config is the 8B release's rope (theta 1e6, factor 16 over 16384
    positions): the same inverse frequencies and attention factor, and the queries' scale at 100k."""
    from transformers import Ministral3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    from model.hf_config import args_from_hf_config
    from model.rope import rotations, yarn_inv_freq

    config = Ministral3Config()
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    args = args_from_hf_config(config.to_dict())
    ours = yarn_inv_freq(args.head_dim, args.rope_theta, args.yarn)
    torch.testing.assert_close(ours.float(), inv_freq, rtol=1e-6, atol=0)
    assert args.yarn.attention_factor == attention_factor == 1.0
    positions = torch.tensor([0, 16383, 16384, 100_000])
    k, q = rotations(positions, args).unbind(1)  # (tokens, 2, head_dim // 2): keys, queries
    expected = get_llama_4_attn_scale(positions[None], 0.1, 16384)[0, 0, :, 0]
    torch.testing.assert_close(q.abs() / k.abs(), expected[:, None].expand_as(q), rtol=1e-6, atol=0)


def test_native_apply_scale_is_yarn_magnitude():
    """params.json ``apply_scale`` (absent = true, vLLM's reading) is 0.1 ln(factor) + 1; false is 1;
    written back as read."""
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                vocab_size=128, llama_4_scaling={"original_max_position_embeddings": 16, "beta": 0.1})
    for yarn, factor in (({"apply_scale": True}, 0.1 * math.log(8) + 1), ({}, 0.1 * math.log(8) + 1),
                         ({"apply_scale": False}, 1.0)):
        y = {"factor": 8, "original_max_position_embeddings": 16, "beta": 32, "alpha": 1, **yarn}
        args = args_from_params({**base, "yarn": y})
        assert args.yarn.attention_factor == pytest.approx(factor)
        assert args_from_params(params_from_args(args)) == args
    config = hf_config_from_args(args_from_params({**base, "yarn": y, "tied_embeddings": True}))
    assert config["model_type"] == "ministral3" and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["mscale"] == config["rope_parameters"]["mscale_all_dim"] == 1.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"yarn": {"factor": 4, "original_max_position_embeddings": 16, "gamma": 1}}, r"'yarn' has unknown key\(s\) \['gamma'\]"),
        ({"llama_4_scaling": {"beta": 0.1}}, r"'llama_4_scaling' is missing \['original_max_position_embeddings'\]"),
        ({"tied_embeddings": "yes"}, "'tied_embeddings' must be true or false"),
        ({"vision_encoder": {"hidden_size": 8}}, "'vision_encoder.num_attention_heads' must be a positive integer"),
        ({"q_lora_rank": 64}, "'kv_lora_rank' is missing; latent attention needs all of"),
    ],
)
def test_native_keys_that_change_the_arithmetic_are_named(change, match):
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                vocab_size=128)
    with pytest.raises(ValueError, match="p/params.json: " + match):
        args_from_params({**base, **change}, source="p/params.json")


def test_hf_refusals_name_the_key(tmp_path):
    _hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, match in [
        ({"rope_parameters": {**config["rope_parameters"], "rope_type": "longrope"}}, "RoPE scaling 'longrope'"),
        ({"rope_parameters": {**config["rope_parameters"], "short_factor": [1.0]}}, r"\['short_factor'\]"),
        ({"rope_parameters": {k: v for k, v in config["rope_parameters"].items() if k != "llama_4_scaling_beta"}},
         "needs rope_parameters 'llama_4_scaling_beta'"),
        ({"model_type": "mistral3"}, "model_type 'mistral3' needs a 'text_config' object"),
        ({"attention_bias": True}, "'attention_bias' is True; Mistral models have False"),
        ({"attention_dropout": 0.1}, "'attention_dropout' is 0.1; Mistral models have 0.0"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match="config.json: .*" + match):
            load_model_args(tmp_path)


def test_tied_embeddings_load_train_and_stay_tied(tmp_path):
    hf = _hf_model(tmp_path / "hf", tied=True)
    ours = Transformer.from_folder(tmp_path / "hf", device="cpu", dtype=torch.float32).eval()
    assert ours.args.tied_embeddings and ours.output.weight is ours.tok_embeddings.weight
    _assert_matches_transformers(ours, hf)

    params = _to_native(tmp_path / "hf", tmp_path / "native")
    assert params["tied_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "native" / "consolidated.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys()
    native = Transformer.from_folder(tmp_path / "native", device="cpu", dtype=torch.float32,
                                     lora=LoraArgs(rank=2))
    assert native.output.weight is native.tok_embeddings.weight

    # A LoRA step (adapters only) and a full fine-tuning step: the output layer stays the embedding.
    from finetune.loss import TransformerWithLoss
    from model.lora import freeze_all_but_lora

    for lora in (True, False):
        model = TransformerWithLoss(native)
        if lora:
            freeze_all_but_lora(model)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = native.tok_embeddings.weight.detach().clone()
        tokens = _tokens()
        loss = model(tokens, SEQLENS, tokens.roll(-1), torch.ones_like(tokens, dtype=torch.bool))
        loss.backward()
        torch.optim.SGD(trainable, lr=0.1).step()
        assert native.output.weight is native.tok_embeddings.weight
        assert torch.equal(before, native.tok_embeddings.weight) == lora


def test_merge_and_export_keep_the_tie(tmp_path):
    """merge_lora and export_hf --merged of a tied model write one embedding (no output/lm_head weight)
    and say tied; the merged model equals the trained one, and transformers reads the export alike."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from model.lora import freeze_all_but_lora, lora_file_state
    from utils.export_hf import main as export
    from utils.merge_lora import main as merge

    _hf_model(tmp_path / "hf", tied=True)
    params = _to_native(tmp_path / "hf", tmp_path / "base")
    lora = LoraArgs(rank=2)
    model = Transformer.from_folder(tmp_path / "base", dtype=torch.float32, lora=lora)
    freeze_all_but_lora(model)
    for p in model.parameters():
        if p.requires_grad:  # trained-looking adapters (lora_B is zero at initialisation)
            torch.nn.init.normal_(p, std=0.1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in lora_file_state(model).items()}, str(ckpt / "lora.safetensors"))
    lora_params = {"enable": True, "rank": 2, "scaling": lora.scaling, "target_modules": lora.target_modules}
    (ckpt / "params.json").write_text(json.dumps({**params, "lora": lora_params}))

    assert merge(["--base_model", str(tmp_path / "base"), "--lora", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    export(["--checkpoint", str(ckpt), "--base_model", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
            "--merged"])
    with safe_open(str(tmp_path / "merged" / "consolidated.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["model_type"] == "ministral3"

    merged = Transformer.from_folder(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.args.tied_embeddings and merged.output.weight is merged.tok_embeddings.weight
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        expected = model.eval()(tokens, SEQLENS)
        torch.testing.assert_close(merged(tokens, SEQLENS), expected, rtol=1e-4, atol=1e-4)
    _assert_matches_transformers(merged, hf)


def test_cached_decoding_uses_the_yarn_and_llama4_rotations(tmp_path):
    # generate's KV-cache path must rotate as the training forward does, past the original context.
    from model.generate import KVCache, forward_cached, generate

    _hf_model(tmp_path / "hf")
    model = Transformer.from_folder(tmp_path / "hf", device="cpu", dtype=torch.float32).eval()
    seq = _tokens()[: 2 * ORIGINAL + 3]
    with torch.no_grad():
        full = model(seq, [len(seq)])  # (tokens, vocab)
        cache = KVCache.empty(model, batch=1, max_len=len(seq))
        prefill = forward_cached(model, seq[None, :5], torch.arange(5)[None], cache)[0]
        steps = [forward_cached(model, seq[None, p : p + 1], torch.tensor([[p]]), cache)[0, 0]
                 for p in range(5, len(seq))]
    torch.testing.assert_close(torch.cat([prefill, torch.stack(steps)]), full, rtol=1e-4, atol=1e-5)
    kwargs = dict(max_new_tokens=2 * ORIGINAL, eos_id=None)
    prompts = [seq[:3].tolist()]
    assert generate(model, prompts, use_cache=True, **kwargs) == generate(model, prompts, use_cache=False, **kwargs)
