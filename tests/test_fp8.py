"""Mistral's native FP8 releases: FP8 weights with per-tensor scales load as the dequantized model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import iter_checkpoint_tensors, save_model_folder
from model.configs import args_from_params, load_model_args, params_from_args
from model.hf_config import args_from_hf_config
from model.lora import LoraArgs
from model.merge import merge_checkpoint
from model.transformer import Transformer
from tests.model_helpers import read_params, tiny_args, write_checkpoint
from tests.train_helpers import make_workspace, read_metrics, run_cli, run_config

FP8 = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # quantized in the releases; embeddings, norms, output stay bf16


def to_fp8_release(folder: Path, per_row: bool = False) -> dict[str, torch.Tensor]:
    """Rewrite a written model folder as a native FP8 release: each attention/feed-forward weight as
    float8_e4m3fn with its ``qscale_weight`` (per tensor, or per output row) and a ``qscale_act`` (plus a
    KV-cache ``kv_fake_quantizer.qscale_act``), and the ``quantization`` block in params.json. Returns the
    dequantized state (``fp8.float() * scale``), the weights the folder really holds."""
    state = {k: t for k, t, _ in iter_checkpoint_tensors(folder)}
    stored, reference = {}, {}
    for key, w in state.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in _LINEARS:
            amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
            scale = (amax / torch.finfo(torch.float8_e4m3fn).max).float()  # (out, 1) or ()
            q = (w / scale).to(torch.float8_e4m3fn)
            stored[key] = q
            stored[f"{module}.qscale_weight"] = scale.reshape(-1) if per_row else scale
            stored[f"{module}.qscale_act"] = torch.tensor(0.25)
            reference[key] = q.float() * scale
        else:
            stored[key] = reference[key] = w
        if key.endswith("attention.wk.weight"):
            stored[key.replace("wk.weight", "kv_fake_quantizer.qscale_act")] = torch.tensor(0.5)
    for path in folder.glob("consolidated*.safetensors"):
        path.unlink()
    save_model_folder(folder, {**read_params(folder), "quantization": FP8}, stored, layout="sharded", num_shards=2)
    return reference


def _write_fp8(tmp_path: Path, per_row: bool = False) -> tuple[Path, Path]:
    """(FP8 release folder, folder of its dequantized weights in float32 without the quantization block)."""
    fp8, ref = tmp_path / "fp8", tmp_path / "ref"
    args = tiny_args()
    write_checkpoint(fp8, args, seed=3)
    reference = to_fp8_release(fp8, per_row)
    save_model_folder(ref, params_from_args(args), reference)
    return fp8, ref


@pytest.mark.parametrize("per_row", [False, True], ids=["per_tensor", "per_row"])
def test_fp8_release_loads_as_its_dequantized_weights(tmp_path, per_row):
    fp8, ref = _write_fp8(tmp_path, per_row)
    files = sorted(p.name for p in fp8.iterdir())
    assert "consolidated-00002-of-00002.safetensors" in files and "params.json" in files
    stored = {**load_file(str(fp8 / files[0])), **load_file(str(fp8 / files[1]))}
    assert stored["layers.0.attention.wq.weight"].dtype == torch.float8_e4m3fn
    # The sharded writer puts a weight and its scale in different files: scales are found across shards.
    assert ("layers.0.attention.wq.weight" in load_file(str(fp8 / files[0]))) != (
        "layers.0.attention.wq.qscale_weight" in load_file(str(fp8 / files[0])))

    lora = LoraArgs(rank=4)
    model = Transformer.from_folder(fp8, dtype=torch.float32, lora=lora)
    expected = Transformer.from_folder(ref, dtype=torch.float32, lora=lora)
    got, want = model.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        if "lora_" not in key:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, [10, 14]), expected(ids, [10, 14]), rtol=0, atol=0)
    # The dequantized weights are the FP8 values times the scale, not the raw FP8 values cast.
    raw = stored["layers.0.feed_forward.w2.weight"].float()
    assert not torch.equal(got["layers.0.feed_forward.w2.weight"], raw)

    bf16 = Transformer.from_folder(fp8, dtype=torch.bfloat16)
    assert bf16.layers[0].attention.wq.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.layers[0].attention.wq.weight, want["layers.0.attention.wq.weight"].bfloat16(),
                               rtol=0, atol=0)


def test_quantization_block_is_not_written_back(tmp_path):
    fp8, _ = _write_fp8(tmp_path)
    args = load_model_args(fp8)
    assert "quantization" not in args.extra
    assert "quantization" not in params_from_args(args)  # what merge_lora and training checkpoints write


_BASE = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=128)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"qformat_weight": "int4"}, r"'quantization.qformat_weight' is 'int4'; only \['fp8_e4m3'\]"),
        ({"qformat_weight": "fp8_e5m2"}, r"'quantization.qformat_weight' is 'fp8_e5m2'"),
        ({**FP8, "group_size": 32}, r"'quantization' has unknown key\(s\) \['group_size'\]"),
        ({**FP8, "qscheme_act": "CHANNEL"}, r"'quantization.qscheme_act' is 'CHANNEL'"),
        ("fp8", r"'quantization' must be an object"),
    ],
)
def test_other_quantizations_are_refused_by_name(block, match):
    with pytest.raises(ValueError, match="p/params.json: " + match):
        args_from_params({**_BASE, "quantization": block}, source="p/params.json")
    args_from_params({**_BASE, "quantization": FP8}, source="p/params.json")  # the real block loads


def test_quantized_hf_folder_is_refused_by_name():
    config = {"model_type": "mistral", "quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}
    with pytest.raises(ValueError, match=r"h/config.json: 'quantization_config' \(quant_method 'fp8'\)"):
        args_from_hf_config(config, source="h/config.json")


def test_fp8_weight_without_its_scale_is_refused(tmp_path):
    fp8, _ = _write_fp8(tmp_path)
    for path in fp8.glob("consolidated-*.safetensors"):
        tensors = load_file(str(path))
        tensors.pop("layers.1.attention.wo.qscale_weight", None)
        save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"'layers.1.attention.wo.weight' is FP8 but the checkpoint has no "
                                         r"'layers.1.attention.wo.qscale_weight'"):
        Transformer.from_folder(fp8, dtype=torch.float32)



def test_lora_trains_on_an_fp8_release(tmp_path):
    """train.py's path (finetune.build streams the base through the same reader) on an FP8 folder."""
    workspace = (tmp_path, make_workspace(tmp_path))
    reference = to_fp8_release(tmp_path / "model")
    cfg = run_config(workspace, "run", max_steps=2, seq_len=64, ckpt_freq=2)
    result = run_cli(["train.py", str(cfg)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = tmp_path / "run" / "checkpoints" / "checkpoint_000002" / "consolidated"
    assert "quantization" not in json.loads((saved / "params.json").read_text())

    # merge_lora's streaming merge onto the FP8 base equals the merge onto its dequantized weights.
    params = {k: v for k, v in read_params(tmp_path / "model").items() if k != "quantization"}
    save_model_folder(tmp_path / "ref", params, reference)
    for base in ("model", "ref"):
        merge_checkpoint(tmp_path / base, saved / "lora.safetensors", 2.0, tmp_path / f"merged_{base}", None)
    merged = load_file(str(tmp_path / "merged_model" / "consolidated.safetensors"))
    want = load_file(str(tmp_path / "merged_ref" / "consolidated.safetensors"))
    assert sorted(merged) == sorted(want) == sorted(reference)
    for key in want:
        torch.testing.assert_close(merged[key], want[key], rtol=0, atol=0, msg=key)
