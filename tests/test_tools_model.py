"""merge_lora and extend_model_vocab end to end on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.args import LoraArgs, ModelArgs
from model.configs import params_from_args
from model.lora import lora_file_state
from model.merge import MergeError, merge_weights, merged_weights
from model.tiny import tiny_args
from model.transformer import Transformer
from tests.model_helpers import write_checkpoint
from tests.train_helpers import make_workspace, run_cli, write_config
from utils import extend_model_vocab, merge_lora


def _adapter_folder(folder, args: ModelArgs, lora: LoraArgs, seed: int = 0) -> Transformer:
    """A LoRA model on the seed-0 base with random non-zero adapters, saved as training saves them."""
    model = Transformer(args, lora=lora)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora_file_state(model).items()}, str(folder / "lora.safetensors"))
    params = {**params_from_args(args), "lora": {"enable": True, "rank": lora.rank, "scaling": lora.scaling}}
    (folder / "params.json").write_text(json.dumps(params))
    return model


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pth"])
def test_merge_equals_merged_weights_for_every_layout(tmp_path, layout) -> None:
    args = tiny_args(moe={"num_experts": 2, "num_experts_per_tok": 1}) if layout == "sharded" else tiny_args()
    write_checkpoint(tmp_path / "base", args, seed=0, layout=layout)
    lora = LoraArgs(rank=4, scaling=1.5, target_modules=["wq", "wv", "w2"])
    model = _adapter_folder(tmp_path / "adapter", args, lora)
    assert merge_lora.main(["--base_model", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"),
                            "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "consolidated.safetensors"))
    expected = dict(merged_weights(model))
    assert sorted(merged) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0)
    base = load_file(str(tmp_path / "base" / "consolidated.safetensors")) if layout == "safetensors" else None
    if base is not None:  # the adapters really changed the targeted weights, and only those
        changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
        assert changed == sorted(f"layers.{i}.{m}.weight" for i in range(2)
                                 for m in ("attention.wq", "attention.wv", "feed_forward.w2"))
    # The merged folder loads as a plain model and computes what base + adapters computes.
    plain = Transformer.from_folder(tmp_path / "merged", dtype=torch.float32)
    tokens = torch.tensor([1, 5, 9, 3, 4, 7])
    torch.testing.assert_close(plain(tokens, [6]), model(tokens, [6]), rtol=1e-5, atol=1e-5)
    assert "lora" not in json.loads((tmp_path / "merged" / "params.json").read_text())


def test_merge_errors(tmp_path, capsys) -> None:
    args = tiny_args()
    write_checkpoint(tmp_path / "base", args)
    _adapter_folder(tmp_path / "adapter", args, LoraArgs(rank=4))
    write_checkpoint(tmp_path / "other", tiny_args(dim=32, head_dim=8))
    cases = [
        (["--lora", str(tmp_path / "missing")], "no adapter at"),
        (["--base_model", str(tmp_path / "other")], "do not fit"),
        (["--out", str(tmp_path / "base")], "a folder the merge reads from"),
    ]
    for extra, message in cases:
        argv = {"--base_model": str(tmp_path / "base"), "--lora": str(tmp_path / "adapter"),
                "--out": str(tmp_path / "out")}
        argv.update(dict(zip(extra[::2], extra[1::2], strict=True)))
        assert merge_lora.main([x for kv in argv.items() for x in kv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out" / "consolidated.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.tmp")) if (tmp_path / "out").exists() else True


def test_merge_weights_folds_pairs_and_refuses_what_does_not_fit() -> None:
    """The one merge (merge_lora, export_hf --merged, the in-training merge): its checks by message."""
    weights = {"layers.0.attention.wq.weight": torch.zeros(8, 4), "norm.weight": torch.ones(4)}
    a, b = torch.ones(2, 4), torch.ones(8, 2)  # B A = 2 everywhere
    wq = "layers.0.attention.wq"
    merged = dict(merge_weights(weights.items(), {f"{wq}.lora_A.weight": a, f"{wq}.lora_B.weight": b}, 0.5))
    assert torch.equal(merged[f"{wq}.weight"], torch.ones(8, 4)) and merged["norm.weight"] is weights["norm.weight"]
    wk = "layers.0.attention.wk"
    cases = [
        ({f"{wq}.lora_A.weight": a}, "'layers.0.attention.wq' has only one of lora_A/lora_B"),
        ({f"{wq}.lora_A.weight": a, f"{wq}.lora_B.weight": b, f"{wk}.lora_A.weight": a, f"{wk}.lora_B.weight": b},
         r"1 adapter\(s\) match no weight of base, e\.g\. \['layers\.0\.attention\.wk'\]"),
        ({f"{wq}.lora_A.weight": a[:, :3], f"{wq}.lora_B.weight": b},
         r"'layers.0.attention.wq' adapter shapes \(8, 2\) x \(2, 3\) do not fit base's weight \(8, 4\)"),
        ({f"{wq}.bias": a}, "'layers.0.attention.wq.bias' is not an adapter weight"),
    ]
    for adapters, message in cases:
        with pytest.raises(MergeError, match=f"^lora.safetensors: {message}"):
            dict(merge_weights(weights.items(), adapters, 1.0, source="lora.safetensors", base="base"))


def test_merge_lora_equals_the_in_training_merge(tmp_path) -> None:
    """train.py with save_adapters: false and merge_lora of the same run's adapters write the same weights."""
    base = make_workspace(tmp_path)
    paths = {}
    for name, save_adapters in (("adapters", True), ("merged", False)):
        config = {**base, "run_dir": str(tmp_path / name), "max_steps": 3, "save_adapters": save_adapters}
        result = run_cli(["train.py", str(write_config(tmp_path / f"{name}.yaml", config))])
        assert result.returncode == 0, result.stderr[-3000:]
        paths[name] = tmp_path / name / "checkpoints" / "checkpoint_000003" / "consolidated"
    assert merge_lora.main(["--base_model", base["model_id_or_path"], "--lora", str(paths["adapters"].parent),
                            "--out", str(tmp_path / "out")]) == 0
    ours = load_file(str(tmp_path / "out" / "consolidated.safetensors"))
    theirs = load_file(str(paths["merged"] / "consolidated.safetensors"))
    original = load_file(str(tmp_path / "model" / "consolidated.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])
    assert not torch.equal(ours["layers.0.attention.wq.weight"], original["layers.0.attention.wq.weight"])
    assert (tmp_path / "out" / "tokenizer.model.v3").is_file()


def test_extend_vocab_keeps_old_rows_and_logits(tmp_path, capsys) -> None:
    old_args = tiny_args(vocab_size=32000, dim=32, head_dim=8)
    old_state = write_checkpoint(tmp_path / "v1", old_args, layout="pth")
    assert extend_model_vocab.main(["--original_model_ckpt", str(tmp_path / "v1"),
                                    "--extended_model_ckpt", str(tmp_path / "v3")]) == 0
    new_state = load_file(str(tmp_path / "v3" / "consolidated.safetensors"))
    assert json.loads((tmp_path / "v3" / "params.json").read_text())["vocab_size"] == 32768
    assert (tmp_path / "v3" / "tokenizer.model.v3").is_file()
    assert sorted(new_state) == sorted(old_state)
    for key, old in old_state.items():
        new = new_state[key]
        if key in ("tok_embeddings.weight", "output.weight"):
            assert new.shape == (32768, 32)
            assert torch.equal(new[:3], old[:3]) and torch.equal(new[771:], old[3:])
            control = new[3:771]
            assert torch.unique(control, dim=0).shape[0] == 768  # distinct: embeddings stay frozen
            assert control.std().item() == pytest.approx(old.std().item(), rel=0.1)
        else:
            assert torch.equal(new, old)
    # Text token i of the v1 vocabulary is token i + 768 in v3: the same text gives the same logits.
    old_model = Transformer.from_folder(tmp_path / "v1", dtype=torch.float32)
    new_model = Transformer.from_folder(tmp_path / "v3", dtype=torch.float32)
    v1_ids = torch.tensor([1, 100, 2000, 31999, 5])
    v3_ids = torch.where(v1_ids >= 3, v1_ids + 768, v1_ids)
    old_logits = old_model(v1_ids, [5])
    new_logits = new_model(v3_ids, [5])
    torch.testing.assert_close(new_logits[:, 771:], old_logits[:, 3:])
    torch.testing.assert_close(new_logits[:, :3], old_logits[:, :3])
    # A second run refuses to overwrite; an already-extended model is refused with the reason.
    assert extend_model_vocab.main(["--original_model_ckpt", str(tmp_path / "v1"),
                                    "--extended_model_ckpt", str(tmp_path / "v3")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert extend_model_vocab.main(["--original_model_ckpt", str(tmp_path / "v3"),
                                    "--extended_model_ckpt", str(tmp_path / "v4")]) == 1
    assert "only 32000-token (v1) checkpoints" in capsys.readouterr().err

