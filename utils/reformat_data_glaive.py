"""Convert Glaive function-calling chats to training data with ``tools`` and ``tool_calls``.

    python -m utils.reformat_data_glaive FILE [--output OUT | --in-place] [--seed 0]

Input lines: ``{"function_description": "<JSON of one or more functions>", "conversations":
[{"from": "system"|"human"|"gpt"|"function-call"|"function-response", "value": "..."}]}``.
Output lines: ``{"messages": [...], "tools": [...]}`` where
  - ``function_description`` (one object, a list, or several objects one after the other, as Glaive
    writes them) becomes ``tools``; a function's ``parameters: null`` becomes ``{}``;
  - ``system`` keeps its text minus a trailing `` - {function JSON}`` (the functions are in ``tools``);
  - ``function-call`` becomes an assistant ``tool_calls`` message with a fresh 9-character id and
    ``arguments`` as a real JSON string (Glaive quotes them with single quotes, or as Python
    literals; both are parsed, never ``str()``-ed);
  - ``function-response`` becomes a ``tool`` message answering the preceding call;
  - a sample must end with an assistant turn: trailing turns are dropped; a sample left without
    one is skipped.
Skipped lines are printed with their line number and the reason, then counted.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sys
from typing import Any

from utils.reformat_data import Skip, new_id, parse_reformat_args


def parse_json_values(text: str) -> list[Any]:
    """Every JSON value in ``text``: one value, or several written one after the other (with or
    without commas between them)."""
    decoder = json.JSONDecoder()
    values, i, text = [], 0, text.strip()
    while i < len(text):
        if text[i] in ", \n\t\r":
            i += 1
            continue
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise Skip(f"function_description is not JSON ({e.msg} at character {e.pos})") from None
        values.append(value)
    return values


def parse_tools(description: Any) -> list[dict] | None:
    if description is None or (isinstance(description, str) and not description.strip()):
        return None
    values = parse_json_values(description) if isinstance(description, str) else [description]
    functions = []
    for v in values:
        functions += v if isinstance(v, list) else [v]
    tools = []
    for f in functions:
        if not isinstance(f, dict):
            raise Skip(f"function_description holds {type(f).__name__}, not a function object")
        if not f:
            continue  # Glaive writes {} for "no functions"
        f = dict(f)
        if f.get("parameters") is None:
            f["parameters"] = {}
        tools.append({"type": "function", "function": f})
    return tools or None


def parse_call(value: str) -> list[dict]:
    """Glaive's function-call text -> [{"name", "arguments": JSON string}]."""
    text = value.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(text)  # {'name': 'f', 'arguments': '{...}'}, a Python literal
        except (ValueError, SyntaxError):
            obj = _single_quoted_arguments(text)
    calls = obj if isinstance(obj, list) else [obj]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise Skip(f"function-call {text[:60]!r} has no function name")
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                try:
                    args = ast.literal_eval(args)
                except (ValueError, SyntaxError):
                    raise Skip(f"function-call arguments {args[:60]!r} are not JSON") from None
        out.append({"name": c["name"], "arguments": json.dumps(args, ensure_ascii=False)})
    return out


def _single_quoted_arguments(text: str) -> Any:
    """``{"name": "f", "arguments": '{"a": 1}'}``: JSON except for single quotes around the arguments."""
    head, sep, rest = text.partition("'")
    body, sep2, tail = rest.rpartition("'")
    if not (sep and sep2):
        raise Skip(f"function-call {text[:60]!r} is not JSON")
    try:
        return json.loads(head + json.dumps(body) + tail)
    except json.JSONDecodeError:
        raise Skip(f"function-call {text[:60]!r} is not JSON") from None


def _system_text(value: str) -> str:
    """Drop a trailing `` - {functions}`` (Glaive repeats the function JSON in the system prompt)."""
    head, sep, tail = value.rpartition(" -")
    if sep and tail.strip()[:1] in ("{", "["):
        return head.rstrip()
    return value


def convert(row: Any, rng: random.Random) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise Skip("expected an object with a 'conversations' list")
    tools = parse_tools(row.get("function_description"))
    messages: list[dict] = []
    for i, turn in enumerate(row["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Skip(f"turn {i} has no string 'value'")
        who, value = turn.get("from"), turn["value"]
        if who == "system":
            messages.append({"role": "system", "content": _system_text(value)})
        elif who == "human":
            messages.append({"role": "user", "content": value})
        elif who == "gpt":
            messages.append({"role": "assistant", "content": value})
        elif who == "function-call":
            calls = [{"id": new_id(rng), "type": "function", "function": c} for c in parse_call(value)]
            messages.append({"role": "assistant", "tool_calls": calls})
        elif who == "function-response":
            prev = messages[-1] if messages else {}
            calls = prev.get("tool_calls") or []
            if len(calls) != 1:
                raise Skip(f"turn {i} (function-response) does not follow exactly one function call")
            messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": value})
        else:
            raise Skip(f"turn {i} has unknown 'from' {who!r}")
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise Skip("no assistant turn")
    out: dict[str, Any] = {"messages": messages}
    if tools:
        out["tools"] = tools
    return out


def main(argv: list[str] | None = None) -> int:
    parsed = parse_reformat_args("python -m utils.reformat_data_glaive", __doc__.split("\n")[0], argv)
    if parsed is None:
        return 1
    path, out, seed = parsed
    rng = random.Random(seed)
    total, skipped = 0, []
    tmp = out.with_name(out.name + ".tmp")
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src, start=1):
            if not line.strip():
                continue
            total += 1
            try:
                dst.write(json.dumps(convert(json.loads(line), rng), ensure_ascii=False) + "\n")
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped: invalid JSON ({e.msg} at column {e.colno})")
                skipped.append(n)
            except Skip as e:
                print(f"{path}:{n}: skipped: {e}")
                skipped.append(n)
    os.replace(tmp, out)
    share = len(skipped) / total if total else 0.0
    print(f"Wrote {out}: {total - len(skipped)} of {total} sample(s); skipped {len(skipped)} ({share:.1%}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
