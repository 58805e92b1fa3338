"""Every class of bad input is reported with file, 1-based line, what is wrong and how to fix it."""

from __future__ import annotations

import json
import random

import pytest

from finetune.data.args import DataArgs
from finetune.data.errors import DataFormatError
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data, write_corrected
from tests.data_helpers import TOOLS, call, chat, spm, tool_conversation, tool_conversation_with, write_jsonl

SPM = spm()
GOOD = json.dumps(chat(random.Random(0), 1))


def _msgs(*roles_contents) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in roles_contents]}


BAD_INSTRUCT = {
    "invalid_json": ('{"messages": [', "invalid_json", "one complete JSON object"),
    "not_object": ("[1, 2]", "not_object", "expected a JSON object"),
    "missing_messages": ({"conversation": []}, "missing_key", "no 'messages' key"),
    "both_keys": ({"messages": [], "interactions": []}, "conflicting_keys", "keep only 'messages'"),
    "empty": ({"messages": []}, "empty_conversation", "needs at least a user and an assistant"),
    "no_role": ({"messages": [{"content": "x"}]}, "missing_key", "has no 'role'"),
    "unknown_role": (
        _msgs(("user", "a"), ("bot", "b")),
        "unknown_role",
        "role 'bot'; use one of system, user",
    ),
    "last_role": (
        _msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
        "last_role",
        "must end with an assistant",
    ),
    "first_role": (_msgs(("assistant", "b")), "bad_role_order", "start with a user"),
    "order": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "bad_role_order",
        "cannot follow a user message",
    ),
    "weight": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 0.5},
            ]
        },
        "bad_weight",
        "use 0 .not trained. or 1",
    ),
    "weight_bool": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": True},
            ]
        },
        "bad_weight",
        "weight true",
    ),
    "call_id": (
        tool_conversation_with(**{"2__tool_calls": [call("abc", "Paris")]}),
        "bad_tool_call_id",
        "exactly 9 characters",
    ),
    "tool_message_id": (tool_conversation_with(**{"3__tool_call_id": "nope"}), "bad_tool_call_id", "9-character id"),
    "unmatched_result": (
        tool_conversation_with(**{"3__tool_call_id": "QQQQQQQQQ"}),
        "bad_tool_call_id",
        r"message 3 \(tool\) answers tool_call_id 'QQQQQQQQQ'.*match it to the call's 'id'",
    ),
    "arguments_object": (
        tool_conversation_with(
            **{
                "2__tool_calls": [
                    {"id": "aB3dE5gH7", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ]
            }
        ),
        "bad_arguments",
        r"json.dumps\(arguments\)",
    ),
    "arguments_not_json": (
        tool_conversation_with(
            **{
                "2__tool_calls": [
                    {"id": "aB3dE5gH7", "function": {"name": "get_weather", "arguments": "{city"}}
                ]
            }
        ),
        "bad_arguments",
        "is not valid JSON",
    ),
    "content_and_calls": (  # v3 only: v7+ encode text then calls in one turn
        tool_conversation_with(**{"2__content": "hi"}),
        "content_and_tool_calls",
        r"message 2 \(assistant\) has both .*v3 tokenizer .*split it into two",
    ),
    "missing_result": (  # the call is answered nowhere before the next assistant turn
        {"messages": tool_conversation()["messages"][:3] + tool_conversation()["messages"][4:], "tools": TOOLS},
        "missing_tool_result",
        r"message 2 \(assistant\) makes tool call\(s\) 'aB3dE5gH7' that get no tool message before message 3",
    ),
    "no_content": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
        "missing_key",
        "neither 'content' nor 'tool_calls'",
    ),
    "empty_answer": (_msgs(("user", "a"), ("assistant", "  ")), "empty_content", "empty content"),
    "content_type": (_msgs(("user", 5), ("assistant", "b")), "bad_type", "must be a string, got int"),
    "two_systems": (
        _msgs(("system", "a"), ("system", "b"), ("user", "c"), ("assistant", "d")),
        "multiple_system",
        "keep one system",
    ),
    "bad_tool": (
        {**chat(random.Random(0), 1), "tools": [{"type": "function"}]},
        "bad_tool",
        "no 'function' object",
    ),
    "tool_params": (
        {**chat(random.Random(0), 1), "tools": [{"function": {"name": "f", "parameters": "none"}}]},
        "bad_tool",
        "use {} for a function without parameters",
    ),
    "tools_twice": (
        {**chat(random.Random(0), 1), "tools": TOOLS, "available_tools": TOOLS},
        "conflicting_keys",
        "keep only 'tools'",
    ),
    "only_last_type": ({**chat(random.Random(0), 1), "only_last": "yes"}, "bad_type", "true or false"),
    # Formats utils.reformat_data converts: the message says so (tests/test_tools_reformat.py checks it does).
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "missing_key",
        r"ShareGPT.*python -m utils\.reformat_data FILE",
    ),
    "sharegpt_turns": (
        {"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "missing_key",
        r"ShareGPT turn.*python -m utils\.reformat_data FILE",
    ),
    "sharegpt_role": (_msgs(("human", "a"), ("gpt", "b")), "unknown_role", r"python -m utils\.reformat_data FILE"),
    "legacy_function_call": (
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}}]},
        "bad_tool_call",
        r"legacy 'function_call'.*python -m utils\.reformat_data FILE",
    ),
    "function_call_with_text": (  # was valid: trained on the text, the call silently dropped
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "Let me look.", "function_call": {"name": "f", "arguments": "{}"}}]},
        "bad_tool_call",
        r"legacy 'function_call'.*python -m utils\.reformat_data FILE",
    ),
    "function_role": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "function", "name": "f", "content": "1"},
                      {"role": "assistant", "content": "b"}]},
        "unknown_role",
        r"role 'function'.*python -m utils\.reformat_data FILE",
    ),
    "legacy_functions": (  # was valid: the function definitions were silently left out of the prompt
        {**chat(random.Random(0), 1), "functions": [TOOLS[0]["function"]]},
        "bad_tool",
        r"'functions'.*python -m utils\.reformat_data FILE",
    ),
    "system_key": (  # was valid: the system prompt was silently ignored
        {**chat(random.Random(0), 1), "system": "Be brief."},
        "missing_key",
        r"'system'.*'system_prompt'.*python -m utils\.reformat_data FILE",
    ),
    "last_role_hint": (
        _msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
        "last_role",
        r"python -m utils\.reformat_data FILE",
    ),
}


def _write_raw(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize("case", sorted(BAD_INSTRUCT))
def test_bad_instruct_line_reported_with_file_and_line(tmp_path, case) -> None:
    bad, kind, fix = BAD_INSTRUCT[case]
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad_line, GOOD])
    report = check_data(DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache")), SPM, 512)
    assert [(e.path, e.line, e.kind) for e in report.errors] == [(str(path), 2, kind)]
    assert report.sources[0].valid == 2 and report.sources[0].invalid == 1
    import re

    assert re.search(fix, str(report.errors[0])), str(report.errors[0])
    assert str(report.errors[0]).startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    "raw, kind, fix",
    [
        (b"", "blank_line", "delete it"),
        (b"   \t", "blank_line", "delete it"),
        (b'{"text": "caf\xe9"}', "encoding", "not valid UTF-8; re-save the file as UTF-8"),
        (b'{"content": 3}', "bad_type", "must be a string"),
        (b'{"body": "x"}', "missing_key", "no 'text' key"),
        (b'{"text": "a", "content": "b"}', "conflicting_keys", "keep only 'text'"),
        (b'{"text": ""}', "empty_text", "delete the line"),
    ],
)
def test_bad_pretrain_line(tmp_path, raw, kind, fix) -> None:
    path = tmp_path / "text.jsonl"
    _write_raw(path, [b'{"text": "ok"}', raw, b'{"text": "fine"}'])
    report = check_data(DataArgs(data=str(path), cache_dir=str(tmp_path / "cache")), SPM, 512)
    assert [(e.line, e.kind) for e in report.errors] == [(2, kind)]
    assert fix in report.errors[0].message


def test_bom_and_crlf_are_accepted(tmp_path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    report = check_data(DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache")), SPM, 512)
    assert report.ok and report.sources[0].valid == 2


def test_training_refuses_invalid_data(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "{oops", GOOD, json.dumps({"messages": []})])
    args = DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / "cache"))
    report = check_data(args, SPM, 512)
    with pytest.raises(DataFormatError, match="--train_yaml conf.yaml --create_corrected") as info:
        report.raise_if_invalid("conf.yaml")
    message = str(info.value)
    assert f"{path}:2: invalid JSON" in message and f"{path}:4: " in message
    assert message.count(f"{path}:2:") == 1 and info.value.__cause__ is None  # one line per bad line


def test_errors_never_carry_a_mistral_common_traceback() -> None:
    with pytest.raises(DataFormatError) as info:
        encode_all(
            {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
            SPM,
            SampleType.INSTRUCT,
            chunk=False,
        )
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert "message 1 has role 'robot'" in str(info.value)  # __str__ works (the reference's crashed)


def test_write_corrected(tmp_path) -> None:
    fixable = tool_conversation()
    fixable["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, fixable, "", '{"messages": 1}', GOOD])
    out = tmp_path / "fixed.jsonl"
    result = write_corrected(path, out, SampleType.INSTRUCT, SPM)
    assert result.kept == 3 and result.fixed == [2]
    assert [(e.line, e.kind) for e in result.dropped] == [(3, "blank_line"), (4, "bad_type")]
    report = check_data(DataArgs(instruct_data=str(out), cache_dir=str(tmp_path / "cache")), SPM, 512)
    assert report.ok and report.sources[0].lines == 3
    assert out.read_text().splitlines()[0] == GOOD


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"], 3])
def test_a_role_that_is_not_a_string_is_an_unknown_role(role) -> None:
    sample = {"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataFormatError, match="message 0 has role .*; use one of") as info:
        encode_all(sample, SPM, SampleType.INSTRUCT, chunk=False)
    assert info.value.kind == "unknown_role"
