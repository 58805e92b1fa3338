"""utils.export_hf against transformers + PEFT, on tiny models trained for a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.args import LoraArgs, ModelArgs
from model.hf import to_hf_state_dict
from model.hf_config import hf_config_from_args
from model.keys import checkpoint_layout, from_checkpoint_names
from model.lora import lora_file_state
from model.merge import merged_weights
from model.tiny import tiny_args
from model.transformer import Transformer
from tests.model_helpers import read_params, train_adapters, write_checkpoint, write_consolidated
from utils.export_hf import main as export

SEQLENS = [9, 6]
MOE = {"num_experts": 3, "num_experts_per_tok": 2}


def _tokenizer_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _make_run(tmp_path: Path, args: ModelArgs, lora: LoraArgs, *, save_adapters: bool = True,
              dtype: torch.dtype = torch.float32) -> tuple[Path, Transformer]:
    """A base folder and RUN_DIR laid out as training writes them, after 3 AdamW steps."""
    base = tmp_path / "base"
    write_checkpoint(base, args, seed=0)
    shutil.copy(_tokenizer_file(), base / "tokenizer.model.v3")
    model = Transformer.from_folder(base, dtype=torch.float32, lora=lora)
    train_adapters(model, _tokens(33, seed=1))
    run = tmp_path / "run"
    state = lora_file_state(model) if save_adapters else dict(merged_weights(model))
    name = "lora.safetensors" if save_adapters else "consolidated.safetensors"
    folder = write_consolidated(run, read_params(base), lora, lora.target_modules, name,
                                {k: v.to(dtype) for k, v in state.items()})
    shutil.copy(_tokenizer_file(), folder / "tokenizer.model.v3")
    (run / "args.yaml").write_text(yaml.safe_dump({"model_id_or_path": str(base), "seq_len": 32}))
    return folder.parent, model.eval()


def _hf_base(folder: Path, args: ModelArgs, state: dict):
    """The base model in HF format, loaded by transformers from disk."""
    from transformers import AutoModelForCausalLM

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype="float32")))
    base = {k: v for k, v in state.items() if ".lora_" not in k}
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(base, args).items()}, str(folder / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _assert_same_logits(ours: Transformer, hf) -> None:
    tokens = _tokens(sum(SEQLENS))
    with torch.no_grad():
        packed = ours(tokens, SEQLENS)
        for doc, logits in zip(tokens.split(SEQLENS), packed.split(SEQLENS), strict=True):
            torch.testing.assert_close(logits, hf(input_ids=doc[None]).logits[0], rtol=1e-4, atol=1e-4)


def _base_logits(model: Transformer) -> torch.Tensor:
    base = Transformer(model.args).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    with torch.no_grad():
        return base(_tokens(sum(SEQLENS)), SEQLENS)


@pytest.mark.parametrize(
    "moe, targets",
    [
        (None, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
        (MOE, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
        (MOE, ["wk", "w1"]),  # w2, w3 untrained: exported as exact-zero adapters (see to_peft_state_dict)
        (MOE, ["wv", "experts.w2"]),  # a scoped name selects the routed experts
    ],
    ids=["dense", "mixtral", "mixtral_w1_only", "mixtral_scoped_experts"],
)
# PEFT's own v4->v5 Mixtral conversion adds rank/alpha patterns for gate_up_proj and then warns that
# they match no *module* (they target a parameter); the logits check below shows they are applied.
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
def test_peft_adapter_matches_our_model(tmp_path, moe, targets):
    from peft import PeftModel

    args = tiny_args(moe=moe, rope_theta=1e6)
    ckpt, ours = _make_run(tmp_path, args, LoraArgs(rank=4, scaling=1.5, dropout=0.1, target_modules=targets))
    out = tmp_path / "peft"
    export(["--checkpoint", str(ckpt), "--out", str(out)])

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tmp_path / "base")  # from RUN_DIR/args.yaml
    hf = PeftModel.from_pretrained(_hf_base(tmp_path / "hf_base", args, ours.state_dict()), out).eval()
    _assert_same_logits(ours, hf)
    # The adapter must matter, or the comparison above proves nothing.
    with torch.no_grad():
        assert not torch.allclose(ours(_tokens(sum(SEQLENS)), SEQLENS), _base_logits(ours), atol=1e-3)


def test_merged_export_loads_in_transformers_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = tiny_args(sliding_window=7)
    ckpt, ours = _make_run(tmp_path, args, LoraArgs(rank=4, scaling=2.0))
    out = tmp_path / "merged"
    export(["--checkpoint", str(ckpt), "--out", str(out), "--merged", "--max_shard_size", "60KB"])

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    _assert_same_logits(ours, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())

    # Our HF import reads the export back as exactly our merged weights.
    merged = dict(merged_weights(ours))
    back = Transformer.from_folder(out, dtype=torch.float32)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0)

    # Merging onto an HF-format base gives the same file contents as onto the Mistral base.
    _hf_base(tmp_path / "hf_base", args, ours.state_dict())
    out2 = tmp_path / "merged_from_hf"
    export(["--checkpoint", str(ckpt), "--out", str(out2), "--merged", "--base_model", str(tmp_path / "hf_base")])
    assert not (out2 / "model.safetensors.index.json").exists()
    single = load_file(str(out2 / "model.safetensors"))
    for shard in shards:
        for key, value in load_file(str(out / shard)).items():
            torch.testing.assert_close(single[key], value, rtol=0, atol=0)

    # The mistral-common tokenizer travels along and transformers reads it.
    assert (out / "tokenizer.model.v3").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(_tokenizer_file())).instruct_tokenizer.tokenizer
    assert tok.encode("Hello world") == reference.encode("Hello world", bos=True, eos=False)


def test_merged_export_of_a_full_weights_checkpoint(tmp_path):
    """save_adapters: false writes merged consolidated.safetensors; no base model is needed."""
    from transformers import AutoModelForCausalLM

    args = tiny_args(moe=MOE)
    ckpt, ours = _make_run(tmp_path, args, LoraArgs(rank=2), save_adapters=False, dtype=torch.bfloat16)
    (ckpt.parent.parent / "args.yaml").unlink()
    out = tmp_path / "merged"
    export(["--checkpoint", str(ckpt / "consolidated"), "--out", str(out), "--merged"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged = Transformer(args).eval()
    layout = checkpoint_layout({k: tuple(v.shape) for k, v in merged.state_dict().items()}, args)
    state = {k: v.to(torch.bfloat16).float() for k, v in merged_weights(ours)}  # checkpoint names
    merged.load_state_dict(from_checkpoint_names(state, layout))
    _assert_same_logits(merged, hf)
    with pytest.raises(ValueError, match="holds merged weights.*--merged"):
        export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter")])


def test_lora_safetensors_key_contract(tmp_path):
    """lora.safetensors as training writes it is a public contract: mistral-inference loads these names,
    and the PEFT names below are what transformers/vLLM expect."""
    args = tiny_args(n_layers=1)
    ckpt, _ = _make_run(tmp_path, args, LoraArgs(rank=2, target_modules=["wq", "w2"]), dtype=torch.bfloat16)
    state = load_file(str(ckpt / "consolidated" / "lora.safetensors"))
    assert sorted(state) == [
        "layers.0.attention.wq.lora_A.weight", "layers.0.attention.wq.lora_B.weight",
        "layers.0.feed_forward.w2.lora_A.weight", "layers.0.feed_forward.w2.lora_B.weight",
    ]
    # mistral-inference's loader: one dtype equal to the model's, "lora" in every key, layer id at [1].
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert all("lora" in k and k.split(".")[1] == "0" for k in state)
    params = json.loads((ckpt / "consolidated" / "params.json").read_text())
    assert params["lora"]["rank"] == 2 and params["lora"]["scaling"] == 2.0

    out = tmp_path / "peft"
    export(["--checkpoint", str(ckpt), "--out", str(out)])
    peft_state = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(peft_state) == [
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    assert {v.dtype for v in peft_state.values()} == {torch.bfloat16}
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["down_proj", "q_proj"]
    # lora_A is on the input side and unchanged; q's lora_B rows are permuted like q_proj's.
    a = state["layers.0.attention.wq.lora_A.weight"]
    torch.testing.assert_close(peft_state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], a)
    b, b_hf = state["layers.0.attention.wq.lora_B.weight"], peft_state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not torch.equal(b, b_hf) and torch.equal(b.sort(0).values, b_hf.sort(0).values)


def test_export_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"params\.json not found: --checkpoint must be"):
        export(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")])
    args = tiny_args(n_layers=1)
    ckpt, _ = _make_run(tmp_path, args, LoraArgs(rank=2))
    (ckpt.parent.parent / "args.yaml").unlink()
    with pytest.raises(ValueError, match="--merged needs the base model.*pass --base_model"):
        export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--merged"])
    other = tmp_path / "other"
    write_checkpoint(other, tiny_args(n_layers=2))
    with pytest.raises(ValueError, match="has shape .* pass the --base_model the adapter was trained on"):
        export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--merged", "--base_model", str(other)])
    with pytest.raises(ValueError, match="is the checkpoint or base model folder it reads from"):
        export(["--checkpoint", str(ckpt), "--out", str(other), "--merged", "--base_model", str(other)])
    with pytest.raises(ValueError, match="--max_shard_size '5 gigs' is not a size"):
        export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--merged",
                "--base_model", str(tmp_path / "base"), "--max_shard_size", "5 gigs"])


def test_checkpoint_may_be_a_run_dir_or_a_base_model_folder(tmp_path, caplog):
    args = tiny_args(n_layers=1)
    ckpt, _ = _make_run(tmp_path, args, LoraArgs(rank=2))
    run = ckpt.parent.parent
    newer = run / "checkpoints" / "checkpoint_000006"
    shutil.copytree(ckpt, newer)
    adapter = newer / "consolidated" / "lora.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(adapter)).items()}, str(adapter))  # tell the two apart
    shutil.copytree(ckpt, run / "checkpoints" / "checkpoint_000009.tmp")  # a save in progress
    (run / "checkpoints" / "checkpoint_000008" / "consolidated").mkdir(parents=True)  # no params.json
    with caplog.at_level("INFO", logger="export_hf"):
        export(["--checkpoint", str(run), "--out", str(tmp_path / "from_run")])
    assert "skipping checkpoint checkpoint_000008:" in caplog.text
    assert f"--checkpoint {run} is a run_dir: exporting its newest checkpoint, checkpoint_000006" in caplog.text
    export(["--checkpoint", str(newer), "--out", str(tmp_path / "explicit")])
    assert (tmp_path / "from_run" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "explicit" / "adapter_model.safetensors").read_bytes()
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no checkpoint_NNNNNN folder.*--checkpoint RUN_DIR/checkpoints"):
        export(["--checkpoint", str(empty), "--out", str(tmp_path / "x")])

    # A base model folder, in any official layout, exports as the HF base a PEFT adapter loads onto.
    base_state = load_file(str(tmp_path / "base" / "consolidated.safetensors"))
    expected = to_hf_state_dict(base_state, args)
    for layout in ("safetensors", "pth", "sharded"):
        base = tmp_path / f"base_{layout}"
        write_checkpoint(base, args, seed=0, layout=layout)
        out = tmp_path / f"hf_{layout}"
        export(["--checkpoint", str(base), "--out", str(out), "--merged"])
        exported = load_file(str(out / "model.safetensors"))
        assert sorted(exported) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="a Hugging Face folder already"):
        export(["--checkpoint", str(tmp_path / "hf_pth"), "--out", str(tmp_path / "x")])
