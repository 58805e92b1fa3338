"""reformat_data, reformat_data_glaive and split_data end to end: their output is valid training data."""

from __future__ import annotations

import json

from finetune.data.args import DataArgs
from finetune.data.validation import check_data
from tests.data_helpers import spm, tool_conversation, write_jsonl
from utils import reformat_data, reformat_data_glaive, split_data

WEATHER = {"name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _check(path, tmp_path):
    return check_data(DataArgs(instruct_data=str(path)), spm(), 512, cache_dir=tmp_path / "cache")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


OPENAI_FUNCTIONS = {  # the legacy OpenAI shape the reference dropped every sample of
    "functions": [WEATHER],
    "messages": [
        _user("Weather in Paris?"),
        {"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp": 20}'},
        _assistant("It is 20C."),
    ],
}
TOOL_CALLS_NO_IDS = {  # OpenAI tool_calls with ids training refuses, arguments as an object
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        _user("Weather in Rome and Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            {"id": "call_def456", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_def456", "content": '{"temp": 5}'},
        {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp": 25}'},
        _assistant("Rome 25C, Oslo 5C."),
    ],
}
ULTRACHAT = {"prompt": "Hi", "prompt_id": "p1", "messages": [_user("Hi"), _assistant("Hello!"), _user("Bye")]}
VALID = {"messages": [_user("2+2?"), _assistant("4")]}


def test_reformat_makes_chat_exports_valid_and_keeps_function_calls(tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path / "export.jsonl", [VALID, ULTRACHAT, OPENAI_FUNCTIONS, TOOL_CALLS_NO_IDS,
                                                  {"messages": [_user("no answer")]}, "not json",
                                                  tool_conversation()])
    before = _check(src, tmp_path)
    assert {e.line for e in before.errors} == {2, 3, 4, 5, 6}
    assert reformat_data.main([str(src)]) == 0
    out_text = capsys.readouterr().out
    out = tmp_path / "export.reformatted.jsonl"
    assert f"{src}:2: dropped 1 trailing message(s)" in out_text
    assert f"{src}:3: functions -> tools (1); message 1: function_call -> tool_calls" in out_text
    assert f"{src}:5: skipped: no assistant message" in out_text and f"{src}:6: skipped: invalid JSON" in out_text
    assert "5 line(s), 3 changed, 2 skipped" in out_text
    report = _check(out, tmp_path)
    assert report.ok, [str(e) for e in report.errors]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lines = out.read_text().splitlines()
    assert lines[0] == json.dumps(VALID) and lines[4] == json.dumps(tool_conversation())  # untouched: same bytes
    assert rows[1]["prompt_id"] == "p1" and rows[1]["messages"][-1] == _assistant("Hello!")
    # Both function-calling samples are kept, with calls and results linked by fresh valid ids.
    call = rows[2]["messages"][1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "content" not in rows[2]["messages"][1] and rows[2]["messages"][2]["tool_call_id"] == call["id"]
    rome, oslo = rows[3]["messages"][1]["tool_calls"]
    assert rome["function"]["arguments"] == '{"city": "Rome"}'
    assert [m["tool_call_id"] for m in rows[3]["messages"][2:4]] == [oslo["id"], rome["id"]]
    # Round trip: reformatting the output changes nothing.
    assert reformat_data.main([str(out), "--output", str(tmp_path / "again.jsonl")]) == 0
    assert "0 changed, 0 skipped" in capsys.readouterr().out
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


def test_reformat_in_place_is_reproducible(tmp_path, capsys) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [OPENAI_FUNCTIONS, ULTRACHAT])
    b = write_jsonl(tmp_path / "b.jsonl", [OPENAI_FUNCTIONS, ULTRACHAT])
    assert reformat_data.main([str(a), "--in-place"]) == 0
    assert reformat_data.main([str(b), "--output", str(tmp_path / "b2.jsonl")]) == 0
    assert a.read_bytes() == (tmp_path / "b2.jsonl").read_bytes()  # same seed, same ids
    assert not list(tmp_path.glob("*.tmp"))
    assert reformat_data.main([str(tmp_path / "missing.jsonl")]) == 1


GLAIVE = {
    "function_description": json.dumps(WEATHER) + "\n" + json.dumps({"name": "noop", "description": "x", "parameters": None}),
    "conversations": [
        {"from": "system", "value": "You are a helpful assistant - " + json.dumps(WEATHER)},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function-call", "value": '{"name": "get_weather", "arguments": \'{"city": "Paris"}\'}'},
        {"from": "function-response", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "It is 20C."},
        {"from": "human", "value": "Thanks!"},
    ],
}
GLAIVE_PLAIN = {"function_description": "{}", "conversations": [{"from": "human", "value": "Hi"},
                                                                  {"from": "gpt", "value": "Hello"}]}
GLAIVE_PYTHON = {"function_description": "", "conversations": [
    {"from": "human", "value": "Call it"},
    {"from": "function-call", "value": "{'name': 'get_weather', 'arguments': {'city': 'Oslo'}}"}]}


def test_glaive_conversion(tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE, GLAIVE_PLAIN, GLAIVE_PYTHON,
                                                  {"function_description": "{}", "conversations": [{"from": "human", "value": "x"}]},
                                                  {"conversations": [{"from": "alien", "value": "x"}]}])
    assert reformat_data_glaive.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert f"{src}:4: skipped: no assistant turn" in text and f"{src}:5: skipped: turn 0 has unknown 'from'" in text
    assert "3 of 5 sample(s); skipped 2 (40.0%)" in text
    out = tmp_path / "glaive.reformatted.jsonl"
    assert _check(out, tmp_path).ok
    first, plain, python = (json.loads(line) for line in out.read_text().splitlines())
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather", "noop"]
    assert first["tools"][1]["function"]["parameters"] == {}
    assert first["messages"][0] == {"role": "system", "content": "You are a helpful assistant"}
    call = first["messages"][2]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}  # real JSON, not a repr
    assert first["messages"][3] == {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 20}'}
    assert first["messages"][-1] == {"role": "assistant", "content": "It is 20C."}  # trailing user dropped
    assert "tools" not in plain
    assert json.loads(python["messages"][-1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}


def test_split_is_reproducible_and_line_preserving(tmp_path, capsys) -> None:
    rows = [json.dumps({"messages": [_user(f"q{i}"), _assistant(f"a{i}")]}, indent=None) for i in range(50)]
    src = write_jsonl(tmp_path / "all.jsonl", rows)
    assert split_data.main([str(src), "--eval", "0.1", "--test", "0.2", "--seed", "1"]) == 0
    assert "all.eval.jsonl: 5 line(s)" in capsys.readouterr().out
    parts = {n: (tmp_path / f"all.{n}.jsonl").read_text().splitlines() for n in ("train", "eval", "test")}
    assert [len(parts[n]) for n in ("train", "eval", "test")] == [35, 5, 10]
    assert sorted(sum(parts.values(), [])) == sorted(rows)  # every line once, byte for byte
    for lines in parts.values():
        assert lines == sorted(lines, key=rows.index)  # original order kept
    first = {n: (tmp_path / f"all.{n}.jsonl").read_bytes() for n in parts}
    assert split_data.main([str(src), "--eval", "0.1", "--test", "0.2", "--seed", "1"]) == 0
    assert {n: (tmp_path / f"all.{n}.jsonl").read_bytes() for n in parts} == first
    assert split_data.main([str(src), "--eval", "0.1", "--test", "0.2", "--seed", "2",
                            "--output_dir", str(tmp_path / "s2")]) == 0
    assert (tmp_path / "s2" / "all.eval.jsonl").read_bytes() != first["eval"]
    # The eval split plugs into data.eval_instruct_data.
    report = check_data(DataArgs(instruct_data=str(tmp_path / "all.train.jsonl"),
                                 eval_instruct_data=str(tmp_path / "all.eval.jsonl")), spm(), 64,
                        cache_dir=tmp_path / "cache")
    assert report.ok and [s.lines for s in report.sources] == [35, 5]
    assert split_data.main([str(src), "--eval", "0.6", "--test", "0.5"]) == 1
