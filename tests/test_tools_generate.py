"""KV-cached decoding equals a full forward pass; the generate CLI with and without the cache agrees."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.args import LoraArgs
from model.checkpoint import save_model_folder
from model.configs import params_from_args
from model.generate import KVCache, forward_cached, generate
from model.tiny import tiny_args
from model.transformer import Transformer
from tests.train_helpers import tiny_vocab_args

CASES = {
    "dense": {},
    "sliding_window": {"sliding_window": 4},  # shorter than the prompts: the window is exercised
    "moe": {"moe": {"num_experts": 4, "num_experts_per_tok": 2}},
}


def _model(lora: bool = False, **overrides) -> Transformer:
    model = Transformer(tiny_args(**overrides), lora=LoraArgs(rank=4) if lora else None)
    model.init_weights(seed=1, std=0.2)  # large weights: sharp, input-dependent logits
    if lora:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.double().eval()


PROMPTS = [[1, 5, 9, 3, 4, 7, 11], [1, 2], [1, 100, 101, 102, 3, 4, 5, 6, 7, 8]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_logits_equal_full_forward(case) -> None:
    model = _model(**CASES[case])
    seq = PROMPTS[2] + [40, 41, 42, 43]
    full = model(torch.tensor(seq), [len(seq)])  # (tokens, vocab)
    cache = KVCache.empty(model, batch=1, max_len=len(seq))
    n = len(PROMPTS[2])
    prefill = forward_cached(model, torch.tensor([seq[:n]]), torch.arange(n)[None], cache)[0]
    steps = [forward_cached(model, torch.tensor([[t]]), torch.tensor([[n + i]]), cache)[0, 0]
             for i, t in enumerate(seq[n:])]
    torch.testing.assert_close(torch.cat([prefill, torch.stack(steps)]), full)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("lora", [False, True])
def test_batched_generation_with_and_without_cache_is_identical(case, lora) -> None:
    model = _model(lora=lora, **CASES[case])
    cached = generate(model, PROMPTS, max_new_tokens=12, eos_id=None)
    full = generate(model, PROMPTS, max_new_tokens=12, eos_id=None, use_cache=False)
    assert cached == full
    assert all(len(o) == 12 for o in cached)
    # Each prompt alone gives the same tokens as in the right-padded batch.
    assert [generate(model, [p], max_new_tokens=12, eos_id=None)[0] for p in PROMPTS] == cached
    assert len({tuple(o) for o in cached}) == len(PROMPTS)  # outputs depend on the prompt


def test_eos_stops_and_sampling_is_seeded() -> None:
    model = _model()
    (greedy,) = generate(model, [PROMPTS[0]], max_new_tokens=8, eos_id=None)
    (stopped,) = generate(model, [PROMPTS[0]], max_new_tokens=8, eos_id=greedy[3])
    assert stopped == greedy[: greedy.index(greedy[3])]
    a = generate(model, PROMPTS, max_new_tokens=8, eos_id=None, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=8, eos_id=None, temperature=1.0, top_p=0.9, seed=3,
                 use_cache=False)
    assert a == b
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2, eos_id=None)


def test_cli_with_and_without_cache_and_chat(tmp_path, capsys, monkeypatch) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from utils.generate import main

    args = tiny_vocab_args()
    model = Transformer(args)
    model.init_weights(seed=0, std=0.2)
    save_model_folder(tmp_path / "m", params_from_args(args), model.state_dict())
    tok = MistralTokenizer.v3()  # a model folder ships its tokenizer file
    shutil.copy(tok.instruct_tokenizer.tokenizer.file_path, tmp_path / "m" / "tokenizer.model.v3")
    outputs = []
    for extra in ([], ["--no_cache"]):
        assert main(["--model", str(tmp_path / "m"), "--prompt", "Hello there", "--max_new_tokens", "6",
                     "--json", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["reply"] == outputs[1]["reply"] and outputs[0]["new_tokens"] > 0
    # The CLI encodes the instruct format: same tokens as generating from encode_chat_completion.
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    prompt = tok.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content="Hello there")])).tokens
    (expected,) = generate(model.eval(), [prompt], max_new_tokens=6, eos_id=tok.instruct_tokenizer.tokenizer.eos_id)
    assert outputs[0]["reply"] == tok.decode(expected)
    # Chat mode: the history is kept, /reset clears it, /exit quits.
    replies = iter(["Hello there", "again", "/reset", "Hello there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["--model", str(tmp_path / "m"), "--max_new_tokens", "6"]) == 0
    chat_lines = capsys.readouterr().out.splitlines()[1:]
    assert chat_lines[0] == outputs[0]["reply"] == chat_lines[2]  # same first turn before and after /reset
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "error: --model" in capsys.readouterr().err
    # A folder without a tokenizer file (e.g. Hugging Face): one line naming --tokenizer, never a guess.
    (tmp_path / "tok").mkdir()
    (tmp_path / "m" / "tokenizer.model.v3").rename(tmp_path / "tok" / "tokenizer.model.v3")
    assert main(["--model", str(tmp_path / "m"), "--prompt", "Hello there"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no mistral-common tokenizer file" in err and "--tokenizer" in err, err
    assert main(["--model", str(tmp_path / "m"), "--prompt", "Hello there", "--max_new_tokens", "6", "--json",
                 "--tokenizer", str(tmp_path / "tok" / "tokenizer.model.v3")]) == 0
    assert json.loads(capsys.readouterr().out)["reply"] == outputs[0]["reply"]


@pytest.mark.parametrize(
    "option, value, fix",
    [
        ("--temperature", "-1", "use 0 for greedy decoding"),
        ("--temperature", "nan", "use 0 for greedy decoding"),
        ("--temperature", "inf", "use 0 for greedy decoding"),
        ("--top_p", "0", r"must be in \(0, 1\]"),
        ("--top_p", "1.5", r"must be in \(0, 1\]"),
        ("--top_p", "nan", r"must be in \(0, 1\]"),
        ("--max_new_tokens", "0", "must be at least 1"),
        ("--max_new_tokens", "-5", "must be at least 1"),
    ],
)
def test_cli_rejects_nonsensical_sampling_options(tmp_path, capsys, option, value, fix) -> None:
    import re

    from utils.generate import main

    # Refused before the model is read: no model folder is needed to get the message.
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x", option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {option} ") and re.search(fix, err), err
    # The boundaries themselves are valid: the error is then about the missing model.
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--temperature", "0", "--top_p", "1",
                 "--max_new_tokens", "1"]) == 1
    assert "error: --model" in capsys.readouterr().err
