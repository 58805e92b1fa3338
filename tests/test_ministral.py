"""Ministral 8B-style interleaved attention: full-attention and sliding-window layers in one model.

A tiny random ``MinistralForCausalLM`` written by transformers (HF layout), and the same weights in
Mistral's native layout (``params.json`` with a list ``sliding_window``), must give transformers'
logits for packed documents longer than the window; cached decoding must equal full recomputation
past the window; the per-layer pattern round-trips through both config formats.
"""

from __future__ import annotations

import json

import pytest
import torch

from model.args import ModelArgs
from model.checkpoint import iter_checkpoint_tensors, save_model_folder
from model.configs import args_from_params, load_model_args, params_from_args
from model.generate import KVCache, forward_cached, generate
from model.hf import to_hf_state_dict
from model.hf_config import args_from_hf_config, hf_config_from_args
from model.tiny import tiny_args
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, save_random_hf

WINDOW = 8
LAYER_TYPES = ["full_attention", "sliding_attention"] * 2
SEQLENS = [21, 6, 13]  # two documents longer than the window, one shorter


def _save_hf(folder, seed: int = 0):
    from transformers import MinistralConfig, MinistralForCausalLM

    config = MinistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(seed)
    hf = MinistralForCausalLM(config)
    return save_random_hf(hf, folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(transformers model, HF folder, native folder) holding the same weights."""
    hf_dir, native_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("native")
    hf = _save_hf(hf_dir)
    args = load_model_args(hf_dir)
    state = {key: t for key, t, _ in iter_checkpoint_tensors(hf_dir)}
    save_model_folder(native_dir, params_from_args(args), state, layout="safetensors")
    return hf, hf_dir, native_dir


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _assert_matches_transformers(model: Transformer, hf) -> None:
    assert_packed_matches_hf(model, hf, _tokens(sum(SEQLENS)), SEQLENS)


def test_config_reads_the_interleaved_pattern(checkpoints):
    _, hf_dir, native_dir = checkpoints
    args = load_model_args(hf_dir)
    assert args.sliding_window == (None, WINDOW)  # the shortest repeating pattern
    assert args.layer_windows == (None, WINDOW, None, WINDOW)
    assert json.loads((native_dir / "params.json").read_text())["sliding_window"] == [None, WINDOW]
    assert load_model_args(native_dir) == args


@pytest.mark.parametrize("folder", ["hf", "native"])
def test_logits_match_transformers(checkpoints, folder):
    hf, hf_dir, native_dir = checkpoints
    model = Transformer.from_folder(hf_dir if folder == "hf" else native_dir, device="cpu", dtype=torch.float32)
    _assert_matches_transformers(model.eval(), hf)


def test_window_matters_per_layer(checkpoints):
    """The test above can fail: the same weights with every layer windowed, or none, differ."""
    hf, _, native_dir = checkpoints
    model = Transformer.from_folder(native_dir, device="cpu", dtype=torch.float32).eval()
    for uniform in (None, WINDOW):
        model.args.sliding_window = uniform
        with pytest.raises(AssertionError):
            _assert_matches_transformers(model, hf)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_blocks_match_transformers(checkpoints, backend):
    """Blocks traced by dynamo run the custom op (sdpa) or FlexAttention's block mask with each
    layer's own window; the eager backend skips code generation, which test_compile.py covers."""
    hf, _, native_dir = checkpoints
    model = Transformer.from_folder(native_dir, device="cpu", dtype=torch.float32, attention_backend=backend).eval()
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, backend="eager")
    _assert_matches_transformers(model, hf)


def test_cached_decoding_equals_full_recompute_past_the_window(checkpoints):
    _, _, native_dir = checkpoints
    model = Transformer.from_folder(native_dir, device="cpu", dtype=torch.float32).eval()
    seq = _tokens(3 * WINDOW, seed=1)
    full = model(seq, [len(seq)])  # (tokens, vocab)
    cache = KVCache.empty(model, batch=1, max_len=len(seq))
    prefill = forward_cached(model, seq[None, :5], torch.arange(5)[None], cache)[0]
    steps = [forward_cached(model, seq[None, p : p + 1], torch.tensor([[p]]), cache)[0, 0] for p in range(5, len(seq))]
    torch.testing.assert_close(torch.cat([prefill, torch.stack(steps)]), full, rtol=1e-4, atol=1e-5)

    prompts = [seq[:3].tolist(), seq[:11].tolist()]
    kwargs = dict(max_new_tokens=2 * WINDOW, eos_id=None)
    cached = generate(model, prompts, use_cache=True, **kwargs)
    assert cached == generate(model, prompts, use_cache=False, **kwargs)
    assert all(len(p) + len(c) > WINDOW + 1 for p, c in zip(prompts, cached, strict=True))


def test_params_json_list_round_trips():
    params = params_from_args(tiny_args(n_layers=8))
    params["sliding_window"] = [None, 4096, 4096, 4096]  # Ministral 8B's pattern
    args = args_from_params(params)
    assert args.layer_windows == (None, 4096, 4096, 4096) * 2
    assert params_from_args(args) == params
    assert args_from_params(json.loads(json.dumps(params_from_args(args)))) == args
    hf_config = hf_config_from_args(args)
    assert (hf_config["model_type"], hf_config["architectures"]) == ("ministral", ["MinistralForCausalLM"])
    assert hf_config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"] * 2
    assert args_from_hf_config(hf_config) == args
    uniform = hf_config_from_args(tiny_args(sliding_window=4096))
    assert uniform["model_type"] == "mistral" and "layer_types" not in uniform


def test_export_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf, _, native_dir = checkpoints
    model = Transformer.from_folder(native_dir, device="cpu", dtype=torch.float32).eval()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(model.args, dtype="float32")))
    state = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), model.args).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(exported).__name__ == "MinistralForCausalLM"
    _assert_matches_transformers(model, exported)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(layer_types=["full_attention", "chunked_attention"] * 2),
         r"'layer_types' has \['chunked_attention'\]"),
        (lambda c: c.update(layer_types=["full_attention"] * 3), "one entry per layer"),
        (lambda c: c.update(sliding_window=None), "'sliding_window' is null"),
        (lambda c: c.update(model_type="mistral"), "use model_type 'ministral'"),
    ],
    ids=["unknown_layer_type", "wrong_length", "no_window", "mistral_with_layer_types"],
)
def test_unknown_or_inconsistent_layer_types_are_refused(edit, match):
    config = hf_config_from_args(ModelArgs(**{**vars(tiny_args(n_layers=4)), "sliding_window": [None, WINDOW]}))
    edit(config)
    with pytest.raises(ValueError, match=match):
        args_from_hf_config(config, source="x/config.json")


@pytest.mark.parametrize(
    ("window", "match"),
    [([None, 8, 8], "does not divide n_layers"), ([None, 0], "positive integers or nulls"), ([], "positive integers")],
)
def test_bad_params_json_window_lists_are_refused(window, match):
    params = params_from_args(tiny_args(n_layers=4))
    params["sliding_window"] = window
    with pytest.raises(ValueError, match=match):
        args_from_params(params, source="x/params.json")


def test_several_window_sizes_have_no_transformers_config():
    with pytest.raises(ValueError, match="several window sizes"):
        hf_config_from_args(tiny_args(n_layers=2, sliding_window=(4, 8)))


def _saved_window_masks(model: Transformer, seqlens: list[int]) -> dict[int, tuple[tuple[int, ...], int]]:
    """The distinct (len, len) tensors a forward saves for backward: storage -> (shape, bytes)."""
    saved: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] in seqlens:
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_tokens(sum(seqlens)), seqlens).sum().backward()
    return saved


def test_window_masks_are_built_once_per_forward():
    """Both windowed layers save the same (len, len) mask for backward, not a copy each."""
    model = Transformer(tiny_args(n_layers=4, sliding_window=(None, WINDOW)))
    model.init_weights(0)
    saved = _saved_window_masks(model, [3 * WINDOW, 2 * WINDOW])
    assert sorted(shape for shape, _ in saved.values()) == [(2 * WINDOW,) * 2, (3 * WINDOW,) * 2]


def test_memory_plan_counts_the_saved_window_masks():
    from finetune.args import TrainArgs
    from utils.estimate_memory import describe, estimate

    args = tiny_args(n_layers=6, sliding_window=(None, WINDOW, 2 * WINDOW))
    model = Transformer(args)
    model.init_weights(0)
    seq_len = 3 * WINDOW
    saved = _saved_window_masks(model, [seq_len])  # one document filling the row: the planner's bound
    train = TrainArgs(model_id_or_path="-", run_dir="-", seq_len=seq_len, batch_size=1, precision="fp32")
    plan = estimate(args, train, device="cpu")
    assert plan.parts["activations: sliding-window masks"] == sum(n for _, n in saved.values())
    assert "2 full + 2 window 8 + 2 window 16 layers" in describe(args, train, plan)
    long_windows = tiny_args(n_layers=6, sliding_window=(None, seq_len))
    assert "activations: sliding-window masks" not in estimate(long_windows, train, device="cpu").parts
