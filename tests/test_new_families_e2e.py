"""The new families end to end, in real processes: one tiny native checkpoint with every new
feature at once (Ministral 8B's interleaved windows, Ministral 3's YaRN, llama-4 query scaling and
tied embeddings) trains on two torchrun ranks, resumes, merges and exports to transformers, and trains
with an NF4 (QLoRA) base; a tiny native multimodal checkpoint (Mistral Small 3.x: params.json
``vision_encoder`` and the Pixtral weights) trains on two ranks, resumes, saves merged weights with the
vision side carried bit for bit, and exports to transformers' Mistral3ForConditionalGeneration."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.args import TrainArgs
from finetune.build import build_model, resolve_precision
from finetune.config import load_config
from model.args import Llama4Scaling, LoraArgs, YarnArgs
from model.checkpoint import iter_checkpoint_tensors, load_adapters, save_model_folder
from model.configs import load_model_args, params_from_args
from model.lora import lora_state_dict
from model.multimodal import is_hf_vision_key, is_vision_key
from model.quant import NF4LoRALinear
from model.transformer import Transformer
from tests.model_helpers import assert_packed_matches_hf, bundled_tokenizer_file
from tests.train_helpers import make_workspace, read_metrics, run_cli, run_config, torchrun
from utils.export_hf import main as export_hf

pytestmark = pytest.mark.slow

# The chat documents are 15-25 tokens long, so both the window (8) and YaRN's original context (8)
# are crossed inside every document, and the llama-4 factor changes at positions 8 and 16.
WINDOW = ORIGINAL = 8
NEW_FEATURES = dict(
    n_layers=4,
    dim=64, head_dim=16,  # NF4 quantizes rows in blocks of 64 (the QLoRA test below)
    sliding_window=(None, WINDOW),  # full, window, full, window (params.json's list form)
    yarn=YarnArgs(factor=4.0, original_max_position_embeddings=ORIGINAL, beta_fast=8.0, beta_slow=1.0),
    llama_4_scaling=Llama4Scaling(beta=0.3, original_max_position_embeddings=ORIGINAL),
    tied_embeddings=True,
)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_families")
    return root, make_workspace(root, **NEW_FEATURES)


@pytest.fixture(scope="module")
def runs(workspace):
    """Three steps on two ranks with checkpoints at steps 2 and 3; then a copy of that run dir that lost
    its step-3 checkpoint (a crash before the last save) resumed with the same command."""
    root = workspace[0]
    common = dict(max_steps=3, ckpt_freq=2, seq_len=64)
    _ok(torchrun(["train.py", str(run_config(workspace, "straight", **common))]))
    shutil.copytree(root / "straight", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "checkpoint_000003")
    resumed = torchrun(["train.py", str(run_config(workspace, "resumed", **common))])
    _ok(resumed)
    return resumed.stdout + resumed.stderr, root / "resumed", root / "straight"


def test_params_json_holds_every_new_feature(workspace):
    params = json.loads((Path(workspace[1]["model_id_or_path"]) / "params.json").read_text())
    assert params["sliding_window"] == [None, WINDOW] and params["tied_embeddings"] is True
    assert params["yarn"]["original_max_position_embeddings"] == ORIGINAL and params["llama_4_scaling"]["beta"] == 0.3


def test_two_ranks_train_resume_and_equal_the_uninterrupted_run(runs):
    log, resumed, straight = runs
    assert "Resumed from" in log and "at step 2" in log
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3]  # step 3 once: its first try was dropped
    losses = [m["loss"] for m in read_metrics(resumed)]
    assert losses == [m["loss"] for m in read_metrics(straight)]  # exactly, step for step
    assert losses[-1] < losses[0]
    a = load_file(str(resumed / "checkpoints/checkpoint_000003/consolidated/lora.safetensors"))
    b = load_file(str(straight / "checkpoints/checkpoint_000003/consolidated/lora.safetensors"))
    assert sorted(a) == sorted(b) and not any(k.startswith("output") for k in a)  # the tie has no adapter
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_merge_and_export_load_in_transformers_with_our_logits(runs, workspace):
    from transformers import AutoModelForCausalLM

    root, base = workspace[0], workspace[1]["model_id_or_path"]
    ckpt = runs[1] / "checkpoints" / "checkpoint_000003"
    _ok(run_cli(["-m", "utils.merge_lora", "--base_model", base, "--lora", str(ckpt), "--out", str(root / "merged")]))
    with safe_open(str(root / "merged" / "consolidated.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys()  # still tied
    merged = Transformer.from_folder(root / "merged", dtype=torch.float32).eval()
    assert merged.args.layer_windows == (None, WINDOW) * 2 and merged.args.yarn and merged.args.llama_4_scaling
    assert merged.output.weight is merged.tok_embeddings.weight

    # The merged model is the trained one: the base plus step 3's adapters.
    trained = Transformer.from_folder(base, dtype=torch.float32, lora=LoraArgs(rank=4)).eval()
    missing, unexpected = trained.load_state_dict(load_file(str(ckpt / "consolidated" / "lora.safetensors")), strict=False)
    assert not unexpected and not any("lora" in k for k in missing)
    seqlens = [3 * ORIGINAL + 5, 11]  # crosses the window, the original context and two llama-4 steps
    tokens = torch.randint(0, 32768, (sum(seqlens),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(tokens, seqlens)
        torch.testing.assert_close(ours, trained(tokens, seqlens), rtol=1e-4, atol=1e-5)
        base_logits = Transformer.from_folder(base, dtype=torch.float32).eval()(tokens, seqlens)
    assert not torch.allclose(ours, base_logits, atol=1e-4)  # the adapters did change the model

    # No transformers class has YaRN and interleaved windows together (Ministral3ForCausalLM has one
    # attention kind): export_hf says so instead of writing a config that loses the windows ...
    with pytest.raises(ValueError, match="one attention kind .*Ministral3ForCausalLM"):
        export_hf(["--checkpoint", str(ckpt), "--out", str(root / "hf_refused"), "--merged"])
    assert not (root / "hf_refused").exists()  # refused before anything was written
    # ... so the export check drops the windows (a mask, no weight) from a copy of the merged model:
    # the trained YaRN, llama-4 and tied weights go through export_hf into transformers.
    full = root / "merged_full_attention"
    shutil.copytree(root / "merged", full)
    params = json.loads((full / "params.json").read_text())
    (full / "params.json").write_text(json.dumps({**params, "sliding_window": None}))
    _ok(run_cli(["-m", "utils.export_hf", "--checkpoint", str(full), "--out", str(root / "hf"), "--merged"]))
    assert json.loads((root / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    ours = Transformer.from_folder(full, dtype=torch.float32).eval()
    assert_packed_matches_hf(ours, hf, tokens, seqlens)


def test_qlora_trains_on_the_new_families_and_keeps_the_tie(workspace):
    """``quantization: nf4`` on the same checkpoint: the training model's output is still the (frozen,
    unquantized) embedding, the loss is finite, and the adapters are the usual file, with no output."""
    root, base = workspace
    config = run_config(workspace, "nf4", max_steps=2, ckpt_freq=2, seq_len=64, quantization="nf4")
    _ok(run_cli(["train.py", str(config)]))
    assert [m["step"] for m in read_metrics(root / "nf4")] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in read_metrics(root / "nf4"))
    adapters = root / "nf4" / "checkpoints" / "checkpoint_000002" / "consolidated" / "lora.safetensors"
    folder = base["model_id_or_path"]
    plain = Transformer.from_folder(folder, dtype=torch.float32, lora=LoraArgs(rank=4))
    assert sorted(load_file(str(adapters))) == sorted(lora_state_dict(plain))  # none for output
    load_adapters(plain, adapters)  # strict keys and shapes

    # The model that run trained, built the same way in a group of one.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        args = load_config(TrainArgs, config)
        cpu = torch.device("cpu")
        model = build_model(args, load_model_args(folder), cpu, resolve_precision(args.precision, cpu)).transformer
    finally:
        dist.destroy_process_group()
    assert isinstance(model.layers[0].attention.wq, NF4LoRALinear)
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.output.weight, plain.tok_embeddings.weight)


# Multimodal: a tiny Mistral Small 3.x, built by transformers and converted to the native layout. Text
# vocab 32768 for the bundled v3 tokenizer; the Pixtral side as small as transformers allows.
def _mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=32768, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14, head_dim=16, hidden_act="silu"),
        image_token_index=10, tie_word_embeddings=False,
    )).eval()


def _native_vision(folder: Path) -> dict[str, torch.Tensor]:
    return {k: t for k, t, _ in iter_checkpoint_tensors(folder) if is_vision_key(k)}


@pytest.fixture(scope="module")
def multimodal(workspace):
    """Two steps on two ranks saving merged weights (save_adapters: false), then a third step resumed
    from that checkpoint saving adapters. Returns (transformers model, native base folder, run dir, log)."""
    root = workspace[0]
    hf = _mistral3()
    hf.save_pretrained(root / "mm_hf")
    native = root / "mm_native"
    state = {key: t for key, t, _ in iter_checkpoint_tensors(root / "mm_hf")}
    save_model_folder(native, params_from_args(load_model_args(root / "mm_hf")), state)
    shutil.copy(bundled_tokenizer_file(), native / "tokenizer.model.v3")
    mm = (root, {**workspace[1], "model_id_or_path": str(native)})
    _ok(torchrun(["train.py", str(run_config(mm, "mm", max_steps=2, ckpt_freq=2, seq_len=64, save_adapters=False))]))
    resumed = torchrun(["train.py", str(run_config(mm, "mm", max_steps=3, ckpt_freq=3, seq_len=64))])
    _ok(resumed)
    return hf, native, root / "mm", resumed.stdout + resumed.stderr


def test_multimodal_trains_on_two_ranks_resumes_and_merges_with_the_vision_side(multimodal):
    _, native, run_dir, log = multimodal
    assert "Resumed from" in log and "at step 2" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run_dir))
    adapters = load_file(str(run_dir / "checkpoints/checkpoint_000003/consolidated/lora.safetensors"))
    text = Transformer.from_folder(native, dtype=torch.float32, lora=LoraArgs(rank=4))
    assert sorted(adapters) == sorted(lora_state_dict(text))  # the language model's only

    merged = run_dir / "checkpoints" / "checkpoint_000002" / "consolidated"
    expected, got = _native_vision(native), _native_vision(merged)
    assert expected and got.keys() == expected.keys()
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    vision_block = json.loads((native / "params.json").read_text())["vision_encoder"]
    assert json.loads((merged / "params.json").read_text())["vision_encoder"] == vision_block
    with safe_open(str(merged / "consolidated.safetensors"), "pt") as f:  # the text side did train
        wq = f.get_tensor("layers.0.attention.wq.weight")
    assert not torch.equal(wq, text.layers[0].attention.wq.weight.to(wq.dtype))


def test_multimodal_merged_export_loads_as_mistral3_with_identical_vision(multimodal, workspace):
    from transformers import Mistral3ForConditionalGeneration

    hf, _, run_dir, _ = multimodal
    out = workspace[0] / "mm_export"
    _ok(run_cli(["-m", "utils.export_hf", "--checkpoint", str(run_dir / "checkpoints" / "checkpoint_000002"),
                 "--out", str(out), "--merged"]))
    exported = Mistral3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    expected = {k: v for k, v in hf.state_dict().items() if is_hf_vision_key(k)}
    got = {k: v for k, v in exported.state_dict().items() if is_hf_vision_key(k)}
    assert expected and got.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    # Its text model is the merged one.
    ours = Transformer.from_folder(run_dir / "checkpoints" / "checkpoint_000002" / "consolidated", dtype=torch.float32)
    tokens = torch.randint(0, 32768, (23,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = exported(input_ids=tokens[None], use_cache=False).logits[0]
        torch.testing.assert_close(ours.eval()(tokens, [23]), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
