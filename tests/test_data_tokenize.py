"""Tokens equal mistral-common's encode_instruct; masks mark exactly the trained assistant turns."""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.args import DataArgs
from finetune.data.errors import DataFormatError
from finetune.data.tokenize import (
    SampleType,
    TokenSample,
    chunk_conversation,
    encode_all,
    parse_instruct,
)
from finetune.data.tokenizer import load_tokenizer, tokenizer_file
from finetune.data.validation import check_data
from tests.data_helpers import (
    TOOLS,
    call,
    chat,
    spm,
    tekken,
    tekken_v,
    tool_conversation,
    write_jsonl,
    write_tekken,
)

SPM, TEKKEN = spm(), tekken()
V7 = MistralTokenizer.v7().instruct_tokenizer
# Every instruct layout: v3 (SentencePiece and Tekken), v7 (SentencePiece and Tekken), v11, v13.
TOKENIZERS = {"spm_v3": SPM, "tekken_v3": TEKKEN, "spm_v7": V7, **{f"tekken_{v}": tekken_v(v) for v in ("v7", "v11", "v13")}}


def reference_request(sample: dict, separate_system: bool, keep_final_ids: bool = False) -> InstructRequest:
    """Build the InstructRequest straight from the JSON, independently of finetune.data.tokenize.

    ``separate_system`` (v7+): system messages stay where they are. ``keep_final_ids`` (v13, which never
    encodes call ids and refuses "null"): the final turn's call ids are kept instead of dropped.
    """
    msgs, system = [], sample.get("system_prompt")
    if separate_system and system:
        msgs.append(SystemMessage(content=system))
    last = len(sample["messages"]) - 1
    for i, m in enumerate(sample["messages"]):
        if m["role"] == "system":
            if separate_system:
                msgs.append(SystemMessage(content=m["content"]))
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
                        id="null" if i == last and not keep_final_ids else c["id"],
                        function=FunctionCall(
                            name=c["function"]["name"], arguments=c["function"]["arguments"]
                        ),
                    )
                    for c in m["tool_calls"]
                ]
            # mistral-common's own deserialisation of chunk lists ({"type": "thinking", ...})
            msgs.append(
                FinetuningAssistantMessage.model_validate(
                    {"content": m.get("content"), "tool_calls": calls, "weight": m.get("weight")}
                )
            )
    tools = [Tool(function=Function(**t["function"])) for t in sample.get("tools", [])] or None
    if separate_system:
        return InstructRequest(messages=msgs, available_tools=tools)
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
        {"messages": chat(rng, 1)["messages"] + [{"role": "user", "content": "And now?"},
         {"role": "system", "content": "Answer in French."}, {"role": "assistant", "content": "Oui."}]},
    ]


def reference(it, sample: dict) -> InstructRequest:
    if "interactions" in sample:
        sample = {"messages": [{"role": m["role"], "content": m["text"]} for m in sample["interactions"]]}
    version = it.tokenizer.version
    return reference_request(sample, version >= TokenizerVersion.v7, version >= TokenizerVersion.v13)


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("index", range(len(samples())))
def test_tokens_equal_encode_instruct(name: str, index: int) -> None:
    it = TOKENIZERS[name]
    sample = samples()[index]
    [got] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert got.tokens == it.encode_instruct(reference(it, sample)).tokens
    assert len(got.masks) == len(got.tokens)


def expected_masks(it, request: InstructRequest, trained: list[int]) -> list[bool]:
    """Targets from mistral-common alone: the tokens of assistant message k are what encode_instruct loses
    when message k is left out (its content, reasoning, calls and EOS; no other message depends on it)."""
    full = it.encode_instruct(request).tokens
    masks = [False] * len(full)
    for k in trained:
        rest = request.messages[:k] + request.messages[k + 1 :]
        without = it.encode_instruct(request.model_copy(update={"messages": rest})).tokens
        n = len(full) - len(without)
        start = next((j for j, (a, b) in enumerate(zip(full, without, strict=False)) if a != b), len(without))
        assert n > 0 and without == full[:start] + full[start + n :]
        masks[start : start + n] = [True] * n
    return masks


def trained_turns(sample: dict, request: InstructRequest) -> list[int]:
    """Indices in ``request.messages`` of the trained assistant turns: weight not 0, and only the last one
    when the sample has tools or only_last."""
    only_last = bool(sample.get("tools")) or sample.get("only_last", False)
    turns = [k for k, m in enumerate(request.messages) if isinstance(m, FinetuningAssistantMessage)]
    if only_last:
        turns = turns[-1:]
    return [k for k in turns if request.messages[k].weight != 0]


def assert_encodes_as_mistral_common(it, sample: dict, request: InstructRequest) -> None:
    """Our tokens equal encode_instruct's, and our masks cover exactly the trained assistant turns."""
    [got] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert got.tokens == it.encode_instruct(request).tokens
    assert got.masks == expected_masks(it, request, trained_turns(sample, request))


def trained_text(it, ts) -> str:
    """The loss targets of an encoded sample, decoded with the special tokens shown."""
    return it.decode([t for t, m in zip(ts.tokens, ts.masks, strict=True) if m], special_token_policy=SpecialTokenPolicy.KEEP)


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("index", range(len(samples())))
def test_masks_equal_the_trained_assistant_spans(name: str, index: int) -> None:
    it = TOKENIZERS[name]
    sample = samples()[index]
    request = reference(it, sample)
    [got] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert got.masks == expected_masks(it, request, trained_turns(sample, request))
    assert any(got.masks)


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


# Reasoning traces (Magistral): an assistant `content` may be mistral-common's chunk list.


def _think(text: str, closed: bool = True) -> dict:
    return {"type": "thinking", "thinking": text, "closed": closed}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def thinking_samples() -> list[dict]:
    tools = tool_conversation()
    tools["messages"][2]["content"] = [_think("I need the weather tool.")]  # reasoning, then a call
    tools["messages"][6]["content"] = [_think("Same tool, for Rome.")]
    return [
        {
            "messages": [
                {"role": "system", "content": "Think step by step."},
                {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": [_think("2 plus 3 is 5."), _text("5")], "weight": 0},
                {"role": "user", "content": "And 4+4?"},
                {"role": "assistant", "content": [_think("Four and four.\nThat is 8."), _text("It is 8.")]},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [_text("Hello")]}]},
        {"messages": [{"role": "user", "content": "Hm?"}, {"role": "assistant", "content": [_think("Still thinking", closed=False), _text("ok")]}]},
        {"messages": [{"role": "user", "content": "Think only"}, {"role": "assistant", "content": [_think("a"), _think("b")]}]},
        tools,
    ]


@pytest.mark.parametrize("index", range(len(thinking_samples())))
def test_thinking_chunks_encode_as_mistral_common_and_are_trained(index: int) -> None:
    it = TOKENIZERS["tekken_v13"]
    sample = thinking_samples()[index]
    assert_encodes_as_mistral_common(it, sample, reference(it, sample))


def test_thinking_layout_v13() -> None:
    it = TOKENIZERS["tekken_v13"]
    [ts] = encode_all(thinking_samples()[0], it, SampleType.INSTRUCT, chunk=False)
    assert trained_text(it, ts) == (
        "[THINK]Four and four.\nThat is 8.[/THINK]It is 8.</s>"
    )
    assert ts.tokens.count(it.BEGIN_THINK) == 2  # the weight-0 turn's reasoning stays as context
    # a call after reasoning: [THINK]...[/THINK][TOOL_CALLS]name[ARGS]{...}</s>, all of it trained
    [ts] = encode_all(thinking_samples()[-1], it, SampleType.INSTRUCT, chunk=False)
    assert trained_text(it, ts) == (
        '[THINK]Same tool, for Rome.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}</s>'
    )


def test_tool_call_layouts_v11_v13() -> None:
    """v11: [TOOL_CALLS]name[CALL_ID]id[ARGS]json, the final (trained) call without its id; v13: no ids
    at all, and the tool definitions before the first user turn."""
    sample = tool_conversation(system=False)
    text = {}
    for v in ("v11", "v13"):
        it = TOKENIZERS[f"tekken_{v}"]
        [ts] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
        text[v] = it.decode(ts.tokens, special_token_policy=SpecialTokenPolicy.KEEP)
        assert trained_text(it, ts) == '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}</s>'
    assert '[TOOL_CALLS]get_weather[CALL_ID]aB3dE5gH7[ARGS]{"city": "Paris"}</s>' in text["v11"]
    assert text["v11"].index("[AVAILABLE_TOOLS]") > text["v11"].index("Weather in Paris?")  # last user turn
    assert "[CALL_ID]" not in text["v13"] and "aB3dE5gH7" not in text["v13"]
    assert text["v13"].startswith("<s>[AVAILABLE_TOOLS]")  # first user turn
    # v13 refuses "null" ids, which it never encodes anyway: a final call without an id still encodes
    no_id = copy.deepcopy(sample)
    del no_id["messages"][-1]["tool_calls"][0]["id"]
    it = TOKENIZERS["tekken_v13"]
    assert encode_all(no_id, it, SampleType.INSTRUCT, chunk=False) == encode_all(sample, it, SampleType.INSTRUCT, chunk=False)


def _one_answer(content) -> dict:
    return {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]}


@pytest.mark.parametrize(
    ("name", "sample", "kind", "match"),
    [
        ("v11", _one_answer([_think("x"), _text("y")]), "no_think_token", r"tokenizer \(v11\) has no \[THINK\]"),
        ("v13_plain", _one_answer([_think("x"), _text("y")]), "no_think_token", r"drop the thinking chunks"),
        ("spm_v3", _one_answer([_text("y")]), "bad_chunk", r"v3 tokenizer cannot encode \(v7 or later can\)"),
        ("v13", _one_answer([_text("y"), _think("x")]), "bad_chunk", "put the reasoning first"),
        ("v13", _one_answer([]), "empty_content", "empty list"),
        ("v13", _one_answer([{"type": "image", "url": "x"}]), "bad_chunk", r"chunk 0 is .*\"type\": \"thinking\""),
        ("v13", _one_answer([_think(3)]), "bad_type", r"chunk 0 'thinking' must be a string"),
        ("v13", _one_answer([{**_think("x"), "closed": "yes"}]), "bad_type", "'closed' must be true or false"),
        ("v13", {"messages": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A", "reasoning_content": "because"}]},
         "bad_chunk", r"'reasoning_content', which training does not read; .*reformat_data"),
        ("spm_v3", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "t",
                                 "tool_calls": tool_conversation()["messages"][-1]["tool_calls"]}]},
         "content_and_tool_calls", r"message 1 \(assistant\) has both .* v3 tokenizer .* split it into two"),
    ],
)
def test_bad_chunks_are_clear_errors(name: str, sample: dict, kind: str, match: str) -> None:
    it = {"v11": TOKENIZERS["tekken_v11"], "v13": TOKENIZERS["tekken_v13"], "spm_v3": SPM,
          "v13_plain": tekken_v("v13", think=False)}[name]
    with pytest.raises(DataFormatError, match=match) as info:
        encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert info.value.kind == kind and info.value.__cause__ is None and info.value.__context__ is None


def test_thinking_on_a_tokenizer_without_think_names_file_and_line(tmp_path) -> None:
    good = chat(random.Random(0), 1)
    path = write_jsonl(tmp_path / "train.jsonl", [good, thinking_samples()[0], good])
    report = check_data(DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache")), TOKENIZERS["tekken_v11"], 512)
    [error] = report.errors
    assert error.kind == "no_think_token"
    # the index in the line's own message list, as every other error names it (message 0 is the system)
    assert str(error).startswith(f"{path}:2: message 2 (assistant) has a 'thinking' chunk, but this model's "
                                 "tokenizer (v11) has no [THINK]/[/THINK] tokens")


def test_load_tokenizer_reads_the_version_from_the_model_file(tmp_path) -> None:
    write_tekken(tmp_path, "v13")
    it = load_tokenizer(tmp_path, 131072).instruct_tokenizer
    assert type(it).__name__ == "InstructTokenizerV13" and it.tokenizer.version.value == "v13"
    assert [type(TOKENIZERS[f"tekken_{v}"]).__name__ for v in ("v7", "v11")] == [
        "InstructTokenizerV7", "InstructTokenizerV11"]


# Text and tool calls in one assistant turn (v7+), and the tool-call rules of mistral-common's validator.


def _with_text(sample: dict, **texts) -> dict:
    """``sample`` with assistant text set beside the calls: ``_2="Let me check."`` sets messages[2]'s content."""
    sample = copy.deepcopy(sample)
    for i, text in texts.items():
        sample["messages"][int(i.lstrip("_"))]["content"] = text
    return sample


def text_and_calls_samples() -> list[dict]:
    calls = tool_conversation()["messages"][2]["tool_calls"]
    return [
        _with_text(tool_conversation(), _2="Let me check.", _6="And Rome:"),  # trains the final turn only
        _with_text(tool_conversation(system=False), _5=[_text("Checking Rome.")]),  # a text chunk
        {  # no tools key: every turn trained, the call's text and calls included
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "One moment.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "aB3dE5gH7", "content": '{"temp": 20}'},
                {"role": "assistant", "content": "It is 20C."},
            ]
        },
    ]


V7_PLUS = [n for n in TOKENIZERS if not n.endswith("v3")]


@pytest.mark.parametrize("name", V7_PLUS)
@pytest.mark.parametrize("index", range(len(text_and_calls_samples())))
def test_text_and_calls_in_one_turn_encode_as_mistral_common(name: str, index: int) -> None:
    it = TOKENIZERS[name]
    sample = text_and_calls_samples()[index]
    assert_encodes_as_mistral_common(it, sample, reference(it, sample))


def test_text_and_calls_layout() -> None:
    """The text, then the calls, then EOS, all trained (v7: v3's JSON list; v11: name[ARGS]; v13 after
    reasoning too)."""
    want = {
        "tekken_v7": 'And Rome:[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]</s>',
        "tekken_v11": 'And Rome:[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}</s>',
    }
    for name, text in want.items():
        it = TOKENIZERS[name]
        [ts] = encode_all(text_and_calls_samples()[0], it, SampleType.INSTRUCT, chunk=False)
        assert trained_text(it, ts) == text
    it = TOKENIZERS["tekken_v13"]
    sample = _with_text(tool_conversation(), _6=[_think("Rome next."), _text("And Rome:")])
    [ts] = encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert ts.tokens == it.encode_instruct(reference(it, sample)).tokens
    assert trained_text(it, ts) == (
        '[THINK]Rome next.[/THINK]And Rome:[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}</s>'
    )


def _two_calls(second_id: str, results: list[str]) -> dict:
    """tool_conversation() whose first turn calls Paris and Rome (the second with ``second_id``), answered
    by one tool message per id in ``results``."""
    s = tool_conversation()
    s["messages"][2]["tool_calls"].append(call(second_id, "Rome"))
    answers = [{"role": "tool", "tool_call_id": r, "content": '{"temp": 20}'} for r in results]
    s["messages"][3:4] = answers
    return s


# case: (sample, kind and message when refused). Each is refused exactly where mistral-common's finetuning
# validator refuses it, except where STRICTER says otherwise.
TOOL_RULES = {
    "text_and_calls": (_with_text(tool_conversation(), _2="Let me check."), "content_and_tool_calls",
                       r"message 2 \(assistant\) has both content and tool_calls, which this model's v3 tokenizer"),
    "duplicate_ids": (_two_calls("aB3dE5gH7", ["aB3dE5gH7", "aB3dE5gH7"]), "bad_tool_call_id",
                      r"message 2 \(assistant\) has 2 tool calls with id 'aB3dE5gH7'.*give each call of a turn its own id"),
    "two_calls": (_two_calls("kL4mN5pQ6", ["kL4mN5pQ6", "aB3dE5gH7"]), "", ""),  # answered in any order
    "unmatched_result": (_two_calls("kL4mN5pQ6", ["aB3dE5gH7", "QQQQQQQQQ"]), "bad_tool_call_id",
                         r"message 4 \(tool\) answers tool_call_id 'QQQQQQQQQ'"),
    "missing_result": (_two_calls("kL4mN5pQ6", ["aB3dE5gH7"]), "missing_tool_result",
                       r"message 2 \(assistant\) makes tool call\(s\) 'kL4mN5pQ6' that get no tool message "
                       r"before message 4 \(assistant\)"),
    "missing_result_before_user": (
        {"messages": tool_conversation()["messages"][:3] + tool_conversation()["messages"][5:], "tools": TOOLS},
        "missing_tool_result", r"message 2 \(assistant\) makes tool call\(s\) 'aB3dE5gH7'.*before message 3 \(user\)"),
}
# v3/v7 only count tool results, but encode the id: a result linked to no call is refused there too.
STRICTER = {("unmatched_result", "v3"), ("unmatched_result", "v7")}


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("case", list(TOOL_RULES))
def test_tool_turn_rules_follow_mistral_common(name: str, case: str) -> None:
    it = TOKENIZERS[name]
    version = it.tokenizer.version
    sample, kind, match = TOOL_RULES[case]
    request = reference(it, sample)
    try:
        get_validator(version, ValidationMode.finetuning).validate_messages(request.messages)
        refused = False
    except MistralCommonException:
        refused = True
    if (case, version.value) in STRICTER:
        assert not refused
        refused = True
    if not refused:
        assert_encodes_as_mistral_common(it, sample, request)
        return
    with pytest.raises(DataFormatError, match=match) as info:
        encode_all(sample, it, SampleType.INSTRUCT, chunk=False)
    assert info.value.kind == kind and info.value.__context__ is None


def test_v15_instruct_data_is_refused_by_name(tmp_path) -> None:
    """v15 prompts carry model settings ([MODEL_SETTINGS]) that samples cannot express: refused, not guessed."""
    it = load_tokenizer(write_tekken(tmp_path, "v15").parent, 131072).instruct_tokenizer
    assert it.tokenizer.version == TokenizerVersion.v15 and type(it).__name__ == "InstructTokenizerV15"
    with pytest.raises(DataFormatError, match=r"instruct version v15, whose prompts carry model settings") as info:
        encode_all(chat(random.Random(0), 1), it, SampleType.INSTRUCT, chunk=False)
    assert info.value.kind == "unsupported_tokenizer"
    # pretraining text has no instruct layout
    assert encode_all({"text": "Hello world"}, it, SampleType.PRETRAIN, chunk=False)[0].tokens == [1, 22177, 4304, 2]
    # The data check says it once, before reading any line, and pretraining data passes.
    lines = write_jsonl(tmp_path / "chat.jsonl", [chat(random.Random(i), 1) for i in range(3)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello world"}])
    with pytest.raises(DataFormatError, match="instruct version v15"):
        check_data(DataArgs(instruct_data=str(lines), cache_dir=str(tmp_path / "c")), it, 64)
    assert check_data(DataArgs(data=str(text), cache_dir=str(tmp_path / "c")), it, 64).ok
