"""reformat_data, reformat_data_glaive and split_data end to end: their output is valid training data.
And inspect_data on reasoning traces."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from finetune.data.args import DataArgs
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data
from tests.data_helpers import (
    spm,
    tekken_v,
    tool_conversation,
    tool_conversation_with,
    write_jsonl,
    write_tekken,
)
from tests.model_helpers import write_checkpoint
from tests.train_helpers import tiny_vocab_args
from utils import inspect_data, reformat_data, reformat_data_glaive, split_data

WEATHER = {"name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _check(path, tmp_path, tokenizer=None, cache: str = "cache"):
    """check_data on one instruct file, with the SentencePiece tokenizer unless another is given."""
    args = DataArgs(instruct_data=str(path), cache_dir=str(tmp_path / cache))
    return check_data(args, tokenizer or spm(), 512)


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
                                 eval_instruct_data=str(tmp_path / "all.eval.jsonl"),
                                 cache_dir=str(tmp_path / "cache")), spm(), 64)
    assert report.ok and [s.lines for s in report.sources] == [35, 5]
    assert split_data.main([str(src), "--eval", "0.6", "--test", "0.5"]) == 1


SHAREGPT = {"id": "sg1", "conversations": [{"from": "system", "value": "Be brief."},
                                           {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
SHAREGPT_TOOLS = {  # LLaMA-Factory's ShareGPT function-calling layout: tools as a JSON string, parallel calls
    "system": "You can call tools.",
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris and Oslo?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Oslo"}}])},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "observation", "value": '{"temp": 5}'},
        {"from": "gpt", "value": "Paris 20C, Oslo 5C."},
    ],
}
SHAREGPT_GPT_FIRST = {"conversations": [{"from": "gpt", "value": "Ask me."}, {"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}]}
OPENAI_TEXT_AND_CALL = {  # legacy function_call with text, function result as an object
    "functions": [WEATHER],
    "messages": [
        _user("Weather in Paris?"),
        {"role": "assistant", "content": "Let me look.", "function_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"role": "function", "name": "get_weather", "content": {"temp": 20}},
        _assistant("It is 20C."),
    ],
}


def test_reformat_converts_sharegpt_and_reports_every_line_it_leaves_out(tmp_path, capsys) -> None:
    lines = [SHAREGPT, SHAREGPT_TOOLS, SHAREGPT_GPT_FIRST, OPENAI_TEXT_AND_CALL,
             {"conversations": [{"from": "bing", "value": "x"}, {"from": "gpt", "value": "y"}]},
             {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
             {"messages": [_user("a"), {"role": "assistant", "content": "b", "weight": 0.5}]},  # nothing to convert
             {"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "1"},
                                {"from": "gpt", "value": "y"}]}]
    src = write_jsonl(tmp_path / "sharegpt.jsonl", lines)
    assert {e.line for e in _check(src, tmp_path).errors} == set(range(1, len(lines) + 1))
    assert reformat_data.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert f"{src}:5: skipped: message 0 has from 'bing'; known: assistant, chatgpt, developer, function" in text
    assert f"{src}:6: skipped: function call 'get_weather(Paris)' is not JSON" in text
    assert f"{src}:7: skipped: invalid: message 1 (assistant) has weight 0.5" in text
    assert f"{src}:8: skipped: message 1 (tool) does not follow an assistant tool call" in text
    assert "4 line(s), 4 changed, 4 skipped" in text  # every line is written or named
    out = tmp_path / "sharegpt.reformatted.jsonl"
    report = _check(out, tmp_path)
    assert report.ok and report.sources[0].lines == 4, [str(e) for e in report.errors]
    plain, tools, gpt_first, openai = (json.loads(line) for line in out.read_text().splitlines())
    assert plain == {"messages": [{"role": "system", "content": "Be brief."}, _user("2+2?"), _assistant("4")],
                     "id": "sg1"}
    assert tools["tools"] == [{"type": "function", "function": WEATHER}]
    system, user, calls, paris, oslo, answer = tools["messages"]
    assert system == {"role": "system", "content": "You can call tools."} and answer == _assistant("Paris 20C, Oslo 5C.")
    assert [c["function"]["arguments"] for c in calls["tool_calls"]] == ['{"city": "Paris"}', '{"city": "Oslo"}']
    assert [paris["tool_call_id"], oslo["tool_call_id"]] == [c["id"] for c in calls["tool_calls"]]
    assert paris["content"] == '{"temp": 20}' and paris["role"] == "tool"
    assert gpt_first["messages"] == [_user("Hi"), _assistant("Hello")]  # leading gpt and trailing human dropped
    text_turn, call_turn, result, _ = openai["messages"][1:]
    assert text_turn == _assistant("Let me look.") and "content" not in call_turn
    assert result["tool_call_id"] == call_turn["tool_calls"][0]["id"] and result["content"] == '{"temp": 20}'
    # A Glaive row given to reformat_data comes out as reformat_data_glaive writes it.
    glaive = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE])
    assert reformat_data.main([str(glaive), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert reformat_data_glaive.main([str(glaive), "--output", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


# Each line is invalid for one reason that validate_data says utils.reformat_data fixes.
REFORMAT_FIXES = [
    SHAREGPT, SHAREGPT_TOOLS, SHAREGPT_GPT_FIRST, OPENAI_FUNCTIONS, OPENAI_TEXT_AND_CALL, TOOL_CALLS_NO_IDS, ULTRACHAT,
    {"messages": SHAREGPT["conversations"]},
    {"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]},
    {"messages": [_user("a"), _assistant("b")], "system": "Be brief."},
    {"messages": [_user("a"), _assistant("b")], "tools": json.dumps([WEATHER])},
    {"messages": [_user("a"), _assistant("b")], "tools": [WEATHER]},
    tool_conversation_with(**{"2__tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": "{}"}}],
             "3__tool_call_id": "call_1"}),
    tool_conversation_with(**{"3__tool_call_id": "x"}),
    tool_conversation_with(**{"3__tool_call_id": "QQQQQQQQQ"}),
    tool_conversation_with(**{"3__content": {"temp": 20}}),
    tool_conversation_with(**{"2__content": "Let me look."}),
]


def test_every_line_validate_data_sends_to_reformat_data_comes_out_valid(tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path / "fixable.jsonl", REFORMAT_FIXES)
    errors = _check(src, tmp_path).errors
    assert [e.line for e in errors] == list(range(1, len(REFORMAT_FIXES) + 1))
    for e in errors:
        assert "`python -m utils.reformat_data FILE`" in e.message, str(e)
    assert reformat_data.main([str(src)]) == 0
    assert f"{len(REFORMAT_FIXES)} line(s), {len(REFORMAT_FIXES)} changed, 0 skipped" in capsys.readouterr().out
    report = _check(tmp_path / "fixable.reformatted.jsonl", tmp_path)
    assert report.ok, [str(e) for e in report.errors]


def test_reformat_command_line_reports_a_bad_glaive_row(tmp_path) -> None:
    """As ``python -m``, the module is __main__ and reformat_data_glaive imports a second copy of it."""
    import subprocess
    import sys

    src = write_jsonl(tmp_path / "mixed.jsonl", [{"function_description": "", "conversations": [
        {"from": "alien", "value": "x"}]}, SHAREGPT])
    run = subprocess.run([sys.executable, "-m", "utils.reformat_data", str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{src}:1: skipped: turn 0 has unknown 'from' 'alien'" in run.stdout
    assert "1 line(s), 1 changed, 1 skipped" in run.stdout


# Reasoning traces as exporters write them, and the thinking chunks reformat_data makes of them.
THINK = {"type": "thinking", "thinking": "2 and 2 make 4.", "closed": True}
REASONING_EXPORTS = [
    {"messages": [_user("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4."}]},
    {"messages": [_user("2+2?"), _assistant("<think>\n2 and 2 make 4.\n</think>\n\n4")]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>2 and 2 make 4.</think>4"}]},
    {"messages": [_user("2+2?"), {"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4."}]},
    {"tools": [{"type": "function", "function": WEATHER}], "messages": [  # reasoning, then a call
        _user("Weather in Paris?"),
        {"role": "assistant", "content": None, "reasoning_content": "I need the weather tool.", "tool_calls": [
            {"id": "aB3dE5gH7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "aB3dE5gH7", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "<think>It says 20.</think>It is 20C."}]},
    {"messages": [_user("2+2?"), _assistant("<think></think>4")]},  # a model's "no thinking" mode
    {"messages": [_user("2+2?"), _assistant("<think>2 and 2 make")]},  # cut off: skipped
    VALID,
]


def test_reformat_turns_reasoning_exports_into_thinking_chunks(tmp_path, capsys) -> None:
    v13 = tekken_v("v13")
    src = write_jsonl(tmp_path / "reasoning.jsonl", REASONING_EXPORTS)
    before = _check(src, tmp_path, v13, "c1")
    assert [(e.line, e.kind) for e in before.errors] == [(1, "bad_chunk"), (3, "missing_key"), (4, "bad_chunk"),
                                                         (5, "bad_chunk")]
    assert "reformat_data" in before.errors[0].message
    assert reformat_data.main([str(src)]) == 0
    text = capsys.readouterr().out
    assert f"{src}:1: message 1: 'reasoning_content' -> thinking chunk" in text
    assert f"{src}:2: message 1: <think> tags -> thinking chunk" in text
    assert f"{src}:6: message 1: empty <think> removed" in text
    assert f"{src}:7: skipped: message 1: <think> without a closing </think>" in text
    assert "7 line(s), 6 changed, 1 skipped" in text
    out = tmp_path / "reasoning.reformatted.jsonl"
    report = _check(out, tmp_path, v13, "c2")
    assert report.ok, [str(e) for e in report.errors]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answer = {"role": "assistant", "content": [THINK, {"type": "text", "text": "4"}]}
    assert [r["messages"][1] for r in rows[:4]] == [answer] * 4
    call, _, final = rows[4]["messages"][1:]
    assert call["content"] == [{**THINK, "thinking": "I need the weather tool."}] and len(call["tool_calls"]) == 1
    assert final["content"] == [{**THINK, "thinking": "It says 20."}, {"type": "text", "text": "It is 20C."}]
    assert rows[5]["messages"][1] == _assistant("4") and rows[6] == VALID
    # what training makes of it: [THINK]reasoning[/THINK]answer</s>, all of it trained
    [ts] = encode_all(rows[1], v13, SampleType.INSTRUCT, chunk=False)
    trained = v13.decode([t for t, m in zip(ts.tokens, ts.masks, strict=True) if m],
                         special_token_policy=SpecialTokenPolicy.KEEP)
    assert trained == "[THINK]2 and 2 make 4.[/THINK]4</s>"


@pytest.mark.parametrize("extra, match", [
    ({"reasoning_content": ["a list"]}, "message 1: 'reasoning_content' must be a string, got list"),
    ({"reasoning_content": "a", "reasoning": "b"}, "'reasoning_content' and 'reasoning' differ"),
    ({"reasoning": "a", "content": "<think>b</think>c"}, "has both a reasoning field and <think> tags"),
    ({"reasoning": "a", "content": [THINK]}, "has a reasoning field and thinking chunks"),
])
def test_reformat_skips_reasoning_it_cannot_convert_by_name(extra: dict, match: str) -> None:
    sample = {"messages": [_user("2+2?"), {"role": "assistant", "content": "4", **extra}]}
    with pytest.raises(reformat_data.Skip, match=match):
        reformat_data.reformat_sample(sample, random.Random(0))


def test_inspect_shows_thinking_as_trained(tmp_path, capsys) -> None:
    model = tmp_path / "model"
    write_checkpoint(model, tiny_vocab_args(vocab_size=131072, dim=8, hidden_dim=16, n_heads=2, n_kv_heads=1,
                                            head_dim=4, n_layers=1), tokenizer=False)
    write_tekken(model, "v13")
    row = {"messages": [_user("2+2?"), {"role": "assistant", "content": [THINK, {"type": "text", "text": "4"}]}]}
    data = write_jsonl(tmp_path / "train.jsonl", [row])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_id_or_path": str(model), "run_dir": str(tmp_path / "run"),
                                      "data": {"instruct_data": str(data), "cache_dir": str(tmp_path / "cache")},
                                      "seq_len": 64, "batch_size": 1, "max_steps": 1}))
    assert inspect_data.main(["--train_yaml", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<s>[INST]2+2?[/INST]«[THINK]2 and 2 make 4.[/THINK]4</s>»" in out
    tok = tekken_v("v13").tokenizer
    n_thinking = 1 + len(tok.encode(THINK["thinking"], bos=False, eos=False)) + 1  # [THINK] ... [/THINK]
    n_trained = n_thinking + len(tok.encode("4", bos=False, eos=False)) + 1  # the answer and EOS
    assert f"{n_trained} trained ({n_thinking} in [THINK])" in out
    assert inspect_data.main(["--train_yaml", str(config), "--json"]) == 0
    [shown] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (shown["n_thinking"], shown["n_trained"]) == (n_thinking, n_trained)
