"""The new families end to end, in real processes: one tiny native checkpoint with every new
feature at once (Ministral 8B's interleaved windows, Ministral 3's YaRN, llama-4 query scaling and
tied embeddings) trains on two torchrun ranks, resumes, merges and exports to transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.args import Llama4Scaling, LoraArgs, YarnArgs
from model.transformer import Transformer
from tests.train_helpers import make_workspace, read_metrics, run_cli, run_config, torchrun
from utils.export_hf import main as export_hf

pytestmark = pytest.mark.slow

# The chat documents are 15-25 tokens long, so both the window (8) and YaRN's original context (8)
# are crossed inside every document, and the llama-4 factor changes at positions 8 and 16.
WINDOW = ORIGINAL = 8
NEW_FEATURES = dict(
    n_layers=4,
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
    with torch.no_grad():
        packed = ours(tokens, seqlens)
        for doc, logits in zip(tokens.split(seqlens), packed.split(seqlens), strict=True):
            ref = hf(input_ids=doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
