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

import json
import os
import random
import sys
from typing import Any

from utils.reformat_data import Skip, new_id, parse_call, parse_reformat_args, parse_tools


def _system_text(value: str) -> str:
    """Drop a trailing `` - {functions}`` (Glaive repeats the function JSON in the system prompt)."""
    head, sep, tail = value.rpartition(" -")
    if sep and tail.strip()[:1] in ("{", "["):
        return head.rstrip()
    return value


def convert(row: Any, rng: random.Random) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise Skip("expected an object with a 'conversations' list")
    tools = parse_tools(row.get("function_description"), "function_description")
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
