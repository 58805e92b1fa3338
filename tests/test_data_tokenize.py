"""Tokens equal mistral-common's encode_instruct; masks mark exactly the trained assistant turns."""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
from mistral_common.protocol.instruct.messages import (
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.tokenize import (
    SampleType,
    TokenSample,
    chunk_conversation,
    encode_all,
    parse_instruct,
)
from finetune.data.tokenizer import load_tokenizer, tokenizer_file
from tests.data_helpers import TOOLS, chat, spm, tekken, tool_conversation

SPM, TEKKEN = spm(), tekken()
V7 = MistralTokenizer.v7().instruct_tokenizer


def reference_request(sample: dict, separate_system: bool) -> InstructRequest:
    """Build the InstructRequest straight from the JSON, independently of finetune.data.tokenize."""
    msgs, system = [], sample.get("system_prompt")
    last = len(sample["messages"]) - 1
    for i, m in enumerate(sample["messages"]):
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            msgs.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            msgs.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            calls = None
            if m.get("tool_calls"):
                calls = [
                    ToolCall(
                        id="null" if i == last else c["id"],
                        function=FunctionCall(
                            name=c["function"]["name"], arguments=c["function"]["arguments"]
                        ),
                    )
                    for c in m["tool_calls"]
                ]
            msgs.append(
                FinetuningAssistantMessage(content=m.get("content"), tool_calls=calls, weight=m.get("weight"))
            )
    tools = [Tool(function=Function(**t["function"])) for t in sample.get("tools", [])] or None
    if separate_system:
        return InstructRequest(
            messages=([SystemMessage(content=system)] if system else []) + msgs, available_tools=tools
        )
    return InstructRequest(messages=msgs, system_prompt=system, available_tools=tools)


def samples() -> list[dict]:
    rng = random.Random(0)
    weighted = chat(rng, 3)
    weighted["messages"][3]["weight"] = 0
    return [
        chat(rng, 1),
        chat(rng, 4),
        {"messages": [{"role": "system", "content": "You are terse."}] + chat(rng, 2)["messages"]},
        {"system_prompt": "Top-level prompt.", **chat(rng, 2)},
        weighted,
        tool_conversation(system=True),
        tool_conversation(system=False),
        {"messages": tool_conversation()["messages"][:5], "tools": TOOLS},  # ends on a plain answer
        {"messages": chat(rng, 2)["messages"], "only_last": True},
        {"interactions": [{"role": "user", "text": "Hi"}, {"role": "assistant", "text": "Hello"}]},
    ]


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v3", "spm_v7"])
@pytest.mark.parametrize("index", range(len(samples())))
def test_tokens_equal_encode_instruct(name: str, index: int) -> None:
    it = {"spm_v3": SPM, "tekken_v3": TEKKEN, "spm_v7": V7}[name]
    sample = samples()[index]
    if "interactions" in sample:
        ref_sample = {"messages": [{"role": m["role"], "content": m["text"]} for m in sample["interactions"]]}
    else:
        ref_sample = sample
    [got] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    want = it.encode_instruct(reference_request(ref_sample, separate_system=name == "spm_v7")).tokens
    assert got.tokens == want
    assert len(got.masks) == len(got.tokens)


def _assistant_tokens(it, sample: dict, index: int) -> list[int]:
    """Tokens of assistant message ``index`` as mistral-common encodes it alone (content/calls + EOS)."""
    req = reference_request(
        {"messages": sample["messages"][: index + 1], "tools": sample.get("tools", [])}, False
    )
    return it.encode_assistant_message(req.messages[-1], False)


@pytest.mark.parametrize("it", [SPM, TEKKEN], ids=["spm", "tekken"])
def test_masks_are_trained_assistant_turns(it) -> None:
    rng = random.Random(1)
    sample = chat(rng, 3)
    sample["messages"][3]["weight"] = 0
    [ts] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    targets = [t for t, m in zip(ts.tokens, ts.masks, strict=False) if m]
    want = _assistant_tokens(it, sample, 1) + _assistant_tokens(it, sample, 5)
    assert targets == want
    assert not ts.masks[0]  # BOS
    assert it.tokenizer.eos_id in targets


def test_reference_layout_spm() -> None:
    s = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    [ts] = encode_all(s, SPM, SampleType.INSTRUCT, chunk=False)
    assert len(ts.tokens) == 14 and sum(ts.masks) == 6
    assert ts.tokens[:2] == [1, 3] and ts.tokens[-1] == 2
    s["messages"].insert(0, {"role": "system", "content": "SYS"})
    s["messages"][-1]["weight"] = 0
    [ts] = encode_all(s, SPM, SampleType.INSTRUCT, chunk=False)
    assert sum(ts.masks) == 3  # "Yo </s>" only
    second_inst = SPM.decode(ts.tokens[ts.tokens.index(3, 2) :], special_token_policy=SpecialTokenPolicy.KEEP)
    assert second_inst.startswith("[INST]▁SYS<0x0A><0x0A>Q2[/INST]")  # system prompt in the last user turn
    assert "SYS" not in SPM.decode(
        ts.tokens[: ts.tokens.index(3, 2)], special_token_policy=SpecialTokenPolicy.KEEP
    )


@pytest.mark.parametrize("it", [SPM, TEKKEN], ids=["spm", "tekken"])
def test_tool_sample_trains_only_final_call_without_its_id(it) -> None:
    sample = tool_conversation()
    [ts] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    targets = [t for t, m in zip(ts.tokens, ts.masks, strict=False) if m]
    tool_calls_id = it.TOOL_CALLS
    assert targets[0] == tool_calls_id and targets[-1] == it.tokenizer.eos_id
    assert targets.count(tool_calls_id) == 1  # the earlier call and the plain answer are not trained
    text = it.decode(targets, special_token_policy=SpecialTokenPolicy.KEEP)
    assert "Rome" in text and '"id"' not in text and "zZ9yY8xX7" not in text
    # the earlier call keeps its id in the (untrained) context
    assert "aB3dE5gH7" in it.decode(ts.tokens, special_token_policy=SpecialTokenPolicy.KEEP)
    # nothing of the tool definitions, system prompt or tool result is a target
    assert 'get_weather", "description' not in text and "Be brief" not in text and "temp" not in text


def test_chunking_counts_and_prefixes() -> None:
    sample = tool_conversation()
    conv = parse_instruct(sample)
    parts = chunk_conversation(conv)
    n_assistant = sum(m["role"] == "assistant" for m in sample["messages"])
    assert len(parts) == n_assistant  # the sample plus one per earlier assistant turn
    assert [len(p.messages) for p in parts] == [6, 4, 2]  # longest first, each ends on an assistant turn
    encoded = encode_all(sample, SPM, SampleType.INSTRUCT, chunk=True)
    # Unchunked, the line is one sample: the whole conversation, the first of the chunks.
    assert encode_all(sample, SPM, SampleType.INSTRUCT, chunk=False) == encoded[:1]
    for p, ts in zip(parts, encoded, strict=False):
        last = p.messages[-1]
        if last.tool_calls:  # every sample's final call is encoded without its id
            last = last.model_copy(
                update={"tool_calls": [c.model_copy(update={"id": "null"}) for c in last.tool_calls]}
            )
        assert [t for t, m in zip(ts.tokens, ts.masks, strict=False) if m] == SPM.encode_assistant_message(
            last, False
        )
    # chat samples without tools or only_last are never chunked
    assert len(encode_all(chat(random.Random(0), 3), SPM, SampleType.INSTRUCT, chunk=True)) == 1


def test_pretrain() -> None:
    # A document is one sample, chunked or not.
    assert encode_all({"text": "Hello world"}, SPM, SampleType.PRETRAIN, chunk=True) == [
        TokenSample([1, 23325, 2294, 2], [True] * 4)
    ]
    [ts] = encode_all({"content": "Hello world"}, TEKKEN, SampleType.PRETRAIN, chunk=False)
    assert ts.tokens == [1, 22177, 4304, 2]


def test_encode_does_not_modify_the_sample() -> None:
    sample = tool_conversation()
    before = copy.deepcopy(sample)
    encode_all(sample, SPM, SampleType.INSTRUCT, chunk=True)
    assert sample == before


def test_load_tokenizer_takes_the_model_folders_file_and_never_guesses(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="finetune.data")
    (tmp_path / "tokenizer.json").write_text("{}")  # a Hugging Face tokenizer is not a mistral-common one
    assert tokenizer_file(tmp_path) is None
    # No file: an error saying how to supply one, never mistral-common's bundled v3 in its place.
    with pytest.raises(FileNotFoundError, match="No mistral-common tokenizer file in .*Hugging Face tokenizer.json.*tokenizer_path"):
        load_tokenizer(tmp_path, 32768)
    src = TEKKEN.tokenizer.file_path
    elsewhere = tmp_path / "tok" / "tekken.json"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(open(src, "rb").read())
    assert load_tokenizer(tmp_path, 131072, tokenizer_path=elsewhere).instruct_tokenizer.tokenizer.n_words == 131072
    with pytest.raises(FileNotFoundError, match="tokenizer_path .*missing.json does not exist"):
        load_tokenizer(tmp_path, 131072, tokenizer_path=tmp_path / "missing.json")
    (tmp_path / "tekken.json").write_bytes(open(src, "rb").read())
    assert tokenizer_file(tmp_path) == tmp_path / "tekken.json"
    caplog.clear()
    own = load_tokenizer(tmp_path, 131072)
    assert str(tmp_path / "tekken.json") in caplog.text
    assert own.instruct_tokenizer.tokenizer.encode("Hello world", bos=True, eos=True) == [1, 22177, 4304, 2]
    with pytest.raises(ValueError, match="does not belong to this model"):
        load_tokenizer(tmp_path, 32768)


def test_tool_arguments_re_emitted_as_object() -> None:
    [ts] = encode_all(tool_conversation(), TEKKEN, SampleType.INSTRUCT, chunk=False)
    text = TEKKEN.decode([t for t, m in zip(ts.tokens, ts.masks, strict=False) if m])
    assert json.loads(text) == [{"name": "get_weather", "arguments": {"city": "Rome"}}]
