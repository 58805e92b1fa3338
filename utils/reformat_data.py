"""Make common chat exports valid training data (OpenAI/ShareGPT-style messages, UltraChat).

    python -m utils.reformat_data FILE [--output OUT | --in-place] [--seed 0]

Per line, and only where needed (an untouched line is copied byte for byte):
  - top-level OpenAI ``functions`` become ``tools`` (``{"type": "function", "function": ...}``);
  - an assistant ``function_call`` becomes ``tool_calls`` with a fresh 9-character id, and its empty
    ``content`` is removed; ``tool_calls`` get a valid id (a-z, A-Z, 0-9) and ``type`` where missing,
    and ``arguments`` given as a JSON object are encoded as a JSON string;
  - ``function`` messages become ``tool`` messages whose ``tool_call_id`` answers the matching call
    (by id, else by function name, else the next unanswered call of the preceding assistant turn);
  - trailing messages after the last assistant turn are dropped (UltraChat ends many conversations
    on a user turn): a training sample must end with the assistant.
Every change and every skipped line is printed with its line number. Function-calling samples are
kept (the reference dropped them all). Writes ``FILE`` with ``.reformatted`` before the suffix
unless ``--output`` or ``--in-place`` is given; with ``--in-place`` the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import sys
from pathlib import Path
from typing import Any

_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits


class Skip(ValueError):
    """The line cannot be made valid; the message says why."""


def new_id(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(9))


def _arguments(value: Any, where: str) -> str:
    """Tool-call arguments as the JSON string training expects."""
    if value is None:
        return "{}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            raise Skip(f"{where}: arguments {value[:40]!r} are not valid JSON") from None
        return value
    raise Skip(f"{where}: arguments must be a JSON object or string, got {type(value).__name__}")


def _fix_calls(msg: dict, i: int, rng: random.Random, renamed: dict[str, str], notes: list[str]) -> None:
    if "function_call" in msg:
        fc = msg.pop("function_call")
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str):
            raise Skip(f"message {i}: function_call must be an object with a 'name'")
        if msg.get("tool_calls"):
            raise Skip(f"message {i}: has both function_call and tool_calls")
        msg["tool_calls"] = [
            {
                "id": new_id(rng),
                "type": "function",
                "function": {"name": fc["name"], "arguments": fc.get("arguments")},
            }
        ]
        notes.append(f"message {i}: function_call -> tool_calls")
    calls = msg.get("tool_calls")
    if not calls:
        return
    if not isinstance(calls, list):
        raise Skip(f"message {i}: tool_calls must be a list")
    for j, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise Skip(f"message {i} tool call {j}: no 'function' object")
        old = call.get("id")
        if not (isinstance(old, str) and _ID.match(old)):
            call["id"] = new_id(rng)
            if isinstance(old, str):
                renamed[old] = call["id"]
            notes.append(f"message {i} tool call {j}: id {old!r} -> {call['id']!r}")
        call.setdefault("type", "function")
        fn = call["function"]
        args = _arguments(fn.get("arguments"), f"message {i} tool call {j}")
        if args != fn.get("arguments"):
            notes.append(f"message {i} tool call {j}: arguments encoded as a JSON string")
            fn["arguments"] = args
    for key in ("content", "text"):
        if key in msg and not msg[key]:
            del msg[key]
            notes.append(f"message {i}: empty '{key}' removed from tool-call message")


def reformat_sample(obj: Any, rng: random.Random) -> tuple[Any, list[str]]:
    """(fixed sample, notes); raises Skip when the line cannot be made valid."""
    if not isinstance(obj, dict):
        raise Skip(f"expected a JSON object, got {type(obj).__name__}")
    notes: list[str] = []
    if "functions" in obj:
        functions = obj.pop("functions")
        if not isinstance(functions, list):
            raise Skip("'functions' must be a list")
        obj.setdefault("tools", [])
        obj["tools"] += [{"type": "function", "function": f} for f in functions]
        notes.append(f"functions -> tools ({len(functions)})")
    key = "messages" if "messages" in obj else "interactions" if "interactions" in obj else None
    if key is None or not isinstance(obj[key], list):
        raise Skip("no 'messages' list")
    messages = obj[key]
    renamed: dict[str, str] = {}
    pending: list[dict] = []  # unanswered calls of the latest assistant turn
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Skip(f"message {i} is not an object")
        role = msg.get("role")
        if role == "assistant":
            _fix_calls(msg, i, rng, renamed, notes)
            pending = list(msg.get("tool_calls") or [])
        elif role in ("tool", "function"):
            if role == "function":
                msg["role"] = "tool"
                notes.append(f"message {i}: role function -> tool")
            _link_tool_message(msg, i, pending, renamed, notes)
        elif role in ("user", "system"):
            pending = []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise Skip("no assistant message")
    if last < len(messages) - 1:
        dropped = [m.get("role") for m in messages[last + 1 :]]
        del messages[last + 1 :]
        notes.append(
            f"dropped {len(dropped)} trailing message(s) after the last assistant turn ({', '.join(map(str, dropped))})"
        )
    return obj, notes


def _link_tool_message(
    msg: dict, i: int, pending: list[dict], renamed: dict[str, str], notes: list[str]
) -> None:
    if not pending:
        raise Skip(f"message {i} (tool) does not follow an assistant tool call")
    call_id = msg.get("tool_call_id")
    call_id = renamed.get(call_id, call_id)
    match = next((c for c in pending if c["id"] == call_id), None)
    if match is None:
        match = next((c for c in pending if c["function"].get("name") == msg.get("name")), pending[0])
    if msg.get("tool_call_id") != match["id"]:
        notes.append(f"message {i}: tool_call_id {msg.get('tool_call_id')!r} -> {match['id']!r}")
        msg["tool_call_id"] = match["id"]
    pending.remove(match)
    if not isinstance(msg.get("content"), str):
        content = msg.get("content")
        msg["content"] = json.dumps(content, ensure_ascii=False) if content is not None else ""
        notes.append(f"message {i}: tool result encoded as a string")


def reformat_file(path: Path, out: Path, seed: int) -> tuple[int, int, int]:
    """Returns (lines written, lines changed, lines skipped); prints each change and skip."""
    rng = random.Random(seed)
    written = changed = skipped = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src, start=1):
            text = line.rstrip("\n")
            if not text.strip():
                print(f"{path}:{n}: skipped: blank line")
                skipped += 1
                continue
            try:
                obj, notes = reformat_sample(json.loads(text), rng)
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped: invalid JSON ({e.msg} at column {e.colno})")
                skipped += 1
                continue
            except Skip as e:
                print(f"{path}:{n}: skipped: {e}")
                skipped += 1
                continue
            if notes:
                print(f"{path}:{n}: " + "; ".join(notes))
                dst.write(json.dumps(obj, ensure_ascii=False) + "\n")
                changed += 1
            else:
                dst.write(text + "\n")
            written += 1
    os.replace(tmp, out)
    return written, changed, skipped


def default_output(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix or '.jsonl'}")


def parse_reformat_args(prog: str, description: str, argv: list[str] | None) -> tuple[Path, Path, int] | None:
    """The command line shared by the reformat tools: (input, output, seed), or None after an error."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", default=None, help="default: FILE.reformatted.jsonl next to FILE")
    where.add_argument("--in-place", "--in_place", dest="in_place", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated tool-call ids")
    opts = parser.parse_args(argv)
    path = Path(opts.file)
    if not path.is_file():
        print(f"error: {path} is not a file.", file=sys.stderr)
        return None
    out = path if opts.in_place else Path(opts.output) if opts.output else default_output(path, "reformatted")
    return path, out, opts.seed


def main(argv: list[str] | None = None) -> int:
    parsed = parse_reformat_args("python -m utils.reformat_data", __doc__.split("\n")[0], argv)
    if parsed is None:
        return 1
    path, out, seed = parsed
    written, changed, skipped = reformat_file(path, out, seed)
    print(f"Wrote {out}: {written} line(s), {changed} changed, {skipped} skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
