"""Make common chat exports valid training data (OpenAI, ShareGPT, UltraChat, Glaive).

    python -m utils.reformat_data FILE [--output OUT | --in-place] [--seed 0]

Per line, and only where needed (an untouched line is copied byte for byte):
  - ShareGPT: ``conversations`` becomes ``messages`` and each turn's ``from``/``value`` a ``role``/
    ``content`` (``human`` -> user, ``gpt`` -> assistant, ``system``; ``function_call`` -> an assistant
    ``tool_calls`` message with a fresh 9-character id, its value read as ``{"name", "arguments"}`` or a
    list of them; ``observation`` / ``function_response`` -> a ``tool`` message answering the call
    before it); a top-level ``system`` becomes the first message; ``tools`` written as a JSON string
    are parsed. Glaive rows (with ``function_description``) are converted as
    ``utils.reformat_data_glaive`` converts them.
  - top-level OpenAI ``functions`` become ``tools`` (``{"type": "function", "function": ...}``), and so
    do bare function definitions in ``tools``;
  - an assistant ``function_call`` becomes ``tool_calls`` with a fresh 9-character id, and its empty
    ``content`` is removed; ``tool_calls`` get a valid id (a-z, A-Z, 0-9) and ``type`` where missing,
    and ``arguments`` given as a JSON object are encoded as a JSON string; an assistant message with
    both text and calls is split into a text message followed by a call message;
  - ``function`` messages become ``tool`` messages whose ``tool_call_id`` answers the matching call
    (by id, else by function name, else the next unanswered call of the preceding assistant turn);
  - reasoning traces: an assistant message's ``reasoning_content`` (or ``reasoning``) field, or
    ``<think>...</think>`` at the start of its content, becomes mistral-common's thinking chunk:
    ``"content": [{"type": "thinking", "thinking": ..., "closed": true}, {"type": "text", "text": ...}]``
    (whitespace around the reasoning and before the answer is dropped; an empty one is removed);
    reasoning before tool calls stays in the calls' message;
  - messages before the first user (or system) message and after the last assistant message are
    dropped (UltraChat ends many conversations on a user turn, ShareGPT dumps often start on a
    ``gpt`` turn): a training sample starts with the user and ends with the assistant.
  - images (OpenAI chat-completions and Responses API exports): a user message's content parts
    ``{"type": "image_url", "image_url": {"url": U, "detail": ...}}`` and ``{"type": "input_image",
    "image_url": U, "detail": ...}`` become ``{"type": "image_url", "image_url": U}`` (``detail`` is
    dropped: the tokenizer's image config sets the resolution), ``input_text`` parts become ``text``
    parts; an Anthropic-style ``{"type": "image", "source": {"type": "base64", ...}}`` becomes a data:
    URI. A ``developer`` message becomes ``system``, and a system message written as text parts one
    string (joined with a blank line, as user text chunks are); an assistant's ``output_text`` /
    ``refusal`` parts become text (one string when there is one part). The pictures themselves are
    never read or re-encoded: a data: URI is copied as it is, and a path is kept, except that with
    ``--output`` in another folder a relative path is rewritten relative to the output file's folder
    (relative paths start at the JSONL file's folder), so it names the same file.
    LLaVA and LLaMA-Factory rows (a top-level ``image`` / ``images`` list, ``<image>`` placeholders in
    the user text) get image chunks at the placeholders (before the first user text when there is
    none); their paths, too, start at the JSONL file's folder.
    Not fixable here, so the line is skipped and named (``FILE:LINE: skipped: ...``): an http(s) image
    (training never downloads: download it, write its path relative to the JSONL file, and run this
    again; the closing summary counts these lines), an OpenAI ``file_id`` image, and an image in a
    system, assistant or tool message (the model sees pictures only in user messages; moving one would
    change what the conversation says, so the choice is left to you). Pictures are not opened here:
    ``utils.validate_data`` on the output checks that each exists and decodes.
Every line written is checked with the training rules (``finetune.data.tokenize.parse_instruct``).
Every change is printed as ``FILE:LINE: what changed``, every line left out as
``FILE:LINE: skipped: why``; the counts close the output. Function-calling samples are kept (the
reference dropped them all). Writes ``FILE`` with ``.reformatted`` before the suffix unless
``--output`` or ``--in-place`` is given; with ``--in-place`` the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.data.errors import FOREIGN_ROLES, DataFormatError
from finetune.data.images import parse_image_chunk
from finetune.data.tokenize import parse_instruct

_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits
_ROLES = ("system", "user", "assistant", "tool")


class Skip(ValueError):
    """The line cannot be made valid; the message says why."""


class UrlImage(Skip):
    """The line names an image by http(s) URL, which only downloading it can fix."""


def new_id(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(9))


def parse_json_values(text: str, what: str) -> list[Any]:
    """Every JSON value in ``text``: one value, or several written one after the other (with or
    without commas between them), as Glaive writes function descriptions."""
    decoder = json.JSONDecoder()
    values, i, text = [], 0, text.strip()
    while i < len(text):
        if text[i] in ", \n\t\r":
            i += 1
            continue
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise Skip(f"{what} is not JSON ({e.msg} at character {e.pos})") from None
        values.append(value)
    return values


def as_tool(function: dict) -> dict:
    """A bare function definition as a ``tools`` entry; ``parameters: null`` becomes ``{}``."""
    function = dict(function)
    if function.get("parameters") is None:
        function["parameters"] = {}
    return {"type": "function", "function": function}


def parse_tools(description: Any, what: str) -> list[dict] | None:
    """Function definitions (a JSON string, an object or a list; wrapped or bare) as ``tools``."""
    if description is None or (isinstance(description, str) and not description.strip()):
        return None
    values = parse_json_values(description, what) if isinstance(description, str) else [description]
    functions = []
    for v in values:
        functions += v if isinstance(v, list) else [v]
    tools = []
    for f in functions:
        if not isinstance(f, dict):
            raise Skip(f"{what} holds {type(f).__name__}, not a function object")
        if not f:
            continue  # Glaive writes {} for "no functions"
        tools.append(f if isinstance(f.get("function"), dict) else as_tool(f))
    return tools or None


def parse_call(value: Any) -> list[dict]:
    """A function-call turn's value -> [{"name", "arguments": JSON string}]. Accepts JSON, a Python
    literal, and JSON with the arguments in single quotes (Glaive); never ``str()``s a value."""
    if isinstance(value, (dict, list)):
        obj, text = value, json.dumps(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(text)  # {'name': 'f', 'arguments': '{...}'}, a Python literal
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = _single_quoted_arguments(text)
    else:
        raise Skip(f"function call {value!r} is not a JSON object")
    calls = obj if isinstance(obj, list) else [obj]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise Skip(f"function call {text[:60]!r} has no function name")
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                try:
                    args = ast.literal_eval(args)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise Skip(f"function call arguments {args[:60]!r} are not JSON") from None
        out.append({"name": c["name"], "arguments": json.dumps(args, ensure_ascii=False)})
    return out


def _single_quoted_arguments(text: str) -> Any:
    """``{"name": "f", "arguments": '{"a": 1}'}``: JSON except for single quotes around the arguments."""
    head, sep, rest = text.partition("'")
    body, sep2, tail = rest.rpartition("'")
    if not (sep and sep2):
        raise Skip(f"function call {text[:60]!r} is not JSON")
    try:
        return json.loads(head + json.dumps(body) + tail)
    except json.JSONDecodeError:
        raise Skip(f"function call {text[:60]!r} is not JSON") from None


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


def _convert_turn(msg: dict, i: int, rng: random.Random, notes: list[str]) -> dict:
    """A ShareGPT turn (``from``/``value``) or a message with a foreign role name, in our format."""
    sharegpt = "from" in msg and "role" not in msg
    who = msg.get("from") if sharegpt else msg.get("role")
    if not sharegpt and (who in _ROLES or who is None):
        return msg  # ours (or no role: the training check below reports it)
    target = who if who in _ROLES else FOREIGN_ROLES.get(who) if isinstance(who, str) else None
    if target is None:
        known = ", ".join(sorted({*_ROLES, *FOREIGN_ROLES}))  # the names validate_data suggests us for
        raise Skip(f"message {i} has {'from' if sharegpt else 'role'} {who!r}; known: {known}")
    if not sharegpt and target != "tool_call":  # keep the message's other keys (name, tool_call_id)
        notes.append(f"message {i}: role {who} -> {target}")
        return {**msg, "role": target}
    text = msg.get("value", msg.get("content")) if sharegpt else msg.get("content")
    if target == "tool_call":
        calls = [{"id": new_id(rng), "type": "function", "function": c} for c in parse_call(text)]
        out: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
    else:
        out = {"role": target, "content": text}
    out.update({k: msg[k] for k in ("weight", "name") if k in msg})
    return out


def _fix_calls(
    msg: dict, i: int, rng: random.Random, renamed: dict[str, str], notes: list[str]
) -> dict | None:
    """Fix an assistant message's calls in place; returns the text message to put before it, if any."""
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
        return None
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
    text = None
    for key in ("content", "text"):
        if key in msg:
            value = msg.pop(key)
            if _is_thinking_only(value):
                msg[key] = value  # reasoning before the calls is part of the calls' turn
            elif value:
                text = {"role": "assistant", "content": value}
                notes.append(f"message {i}: text and tool calls split into two assistant messages")
            else:
                notes.append(f"message {i}: empty '{key}' removed from tool-call message")
    return text


_THINK_TAGS = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


def _is_thinking_only(content: Any) -> bool:
    return isinstance(content, list) and bool(content) and all(
        isinstance(c, dict) and c.get("type") == "thinking" for c in content
    )


def _thinking(msg: dict, i: int, notes: list[str]) -> None:
    """An assistant message's reasoning, exported as a ``reasoning_content`` / ``reasoning`` field or as
    ``<think>...</think>`` at the start of its content, as a leading thinking chunk."""
    fields = {k: msg.pop(k) for k in ("reasoning_content", "reasoning") if k in msg}
    for k, v in fields.items():  # before the set below: a list is unhashable
        if v and not isinstance(v, str):
            raise Skip(f"message {i}: '{k}' must be a string, got {type(v).__name__}")
    values = {v for v in fields.values() if v}
    if len(values) > 1:
        raise Skip(f"message {i}: 'reasoning_content' and 'reasoning' differ")
    thinking = values.pop() if values else None
    for k, v in fields.items():
        notes.append(f"message {i}: '{k}' -> thinking chunk" if v else f"message {i}: empty '{k}' removed")
    content = msg.get("content")
    if isinstance(content, str) and content.lstrip().startswith("<think>"):
        tags = _THINK_TAGS.match(content)
        if tags is None:
            raise Skip(f"message {i}: <think> without a closing </think>")
        if thinking is not None:
            raise Skip(f"message {i}: has both a reasoning field and <think> tags")
        thinking, content = tags.group(1).strip(), content[tags.end() :]
        msg["content"] = content
        notes.append(f"message {i}: <think> tags -> thinking chunk" if thinking else f"message {i}: empty <think> removed")
    if not thinking:
        return
    if isinstance(content, list):
        if any(isinstance(c, dict) and c.get("type") == "thinking" for c in content):
            raise Skip(f"message {i}: has a reasoning field and thinking chunks")
        chunks = content
    else:
        chunks = [{"type": "text", "text": content}] if content else []
    msg["content"] = [{"type": "thinking", "thinking": thinking, "closed": True}, *chunks]


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


def _tools(obj: dict, notes: list[str]) -> None:
    """OpenAI ``functions``, and ``tools`` written as a JSON string or as bare functions, as ``tools``."""
    if "functions" in obj:
        functions = obj.pop("functions")
        if not isinstance(functions, list):
            raise Skip("'functions' must be a list")
        obj.setdefault("tools", [])
        if not isinstance(obj["tools"], list):
            raise Skip("has both 'functions' and a 'tools' that is not a list")
        obj["tools"] += [as_tool(f) if isinstance(f, dict) else f for f in functions]
        notes.append(f"functions -> tools ({len(functions)})")
    tools = obj.get("tools")
    if isinstance(tools, str) or (
        isinstance(tools, list)
        and any(isinstance(t, dict) and "function" not in t and "name" in t for t in tools)
    ):
        parsed = parse_tools(tools, "'tools'")
        obj["tools"] = parsed or []
        notes.append(f"tools read as {len(parsed or [])} function definition(s)")


def _system(obj: dict, messages: list[dict], notes: list[str]) -> None:
    """ShareGPT's top-level ``system`` (which training does not read) as the first message."""
    if "system" not in obj:
        return
    system = obj.pop("system")
    if system is None or system == "":
        notes.append("empty 'system' removed")
    elif not isinstance(system, str):
        raise Skip(f"'system' must be a string, got {type(system).__name__}")
    elif obj.get("system_prompt") or any(m.get("role") == "system" for m in messages):
        raise Skip("has a top-level 'system' and another system prompt; keep one")
    else:
        messages.insert(0, {"role": "system", "content": system})
        notes.append("'system' -> first message")


_IMAGE_PARTS = ("image_url", "input_image", "image")
_FOREIGN_TEXT_PARTS = ("input_text", "output_text", "refusal")  # Responses API, chat-completions refusal


def _image_ref(part: dict, where: str, changes: list[str]) -> tuple[str, Any]:
    """(our chunk type, the picture's reference) of an image part in any of the exported shapes."""
    kind = part["type"]
    if kind == "input_image":  # OpenAI Responses API: {"type": "input_image", "image_url": U, "detail": ...}
        if part.get("file_id") and not part.get("image_url"):
            raise Skip(
                f"{where} is the OpenAI file {part['file_id']!r}, which cannot be read offline; download it, "
                "write its path relative to the JSONL file (or a data: URI), and run reformat_data again"
            )
        changes.append("input_image -> image_url")
        kind, ref = "image_url", part.get("image_url")
    elif kind == "image" and "image" not in part and isinstance(part.get("source"), dict):
        source = part["source"]  # Anthropic: {"type": "image", "source": {"type": "base64", ...}}
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            changes.append("base64 image source -> data: URI")
            kind, ref = "image_url", f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
        else:
            changes.append("image source -> image_url")
            kind, ref = "image_url", source.get("url")
    else:
        ref = part.get(kind)
    if isinstance(ref, dict):
        ref = ref.get("url", ref)  # still a dict without "url": the training check names it
    dropped = sorted(set(part) - {"type", kind, "source"})
    dropped += sorted(set(part.get(kind) or {}) - {"url"}) if isinstance(part.get(kind), dict) else []
    if dropped:
        changes.append(f"{', '.join(map(repr, dropped))} dropped")
    return kind, ref


def _image_part(part: dict, where: str, folders: tuple[Path, Path] | None, changes: list[str]) -> dict:
    """An image part in our shape, naming the same picture from the output file's folder. The part is
    returned as it is when nothing needs changing, so an untouched line stays byte for byte."""
    before = len(changes)
    kind, ref = _image_ref(part, where, changes)
    if not isinstance(ref, str):
        return part  # an empty or malformed reference: the training check reports it by chunk
    source_dir = folders[0] if folders else None
    try:
        url = parse_image_chunk({"type": kind, kind: ref}, where, source_dir).get_url()
    except DataFormatError as e:
        if ref[:8].lower().startswith(("http://", "https://")):
            raise UrlImage(e.message.rstrip(".") + ", then run reformat_data again") from None
        raise Skip(e.message.rstrip(".")) from None
    if url.startswith("file://") and folders is not None:
        new = _rebase(ref, Path(url.removeprefix("file://")), *folders)
        if new != ref:
            changes.append("relative path rewritten for the output file's folder")
            ref = new
    return part if len(changes) == before else {"type": kind, kind: ref}


def _rebase(ref: str, path: Path, source_dir: Path, target_dir: Path) -> str:
    """``ref`` (a path relative to ``source_dir``, resolving to ``path``) relative to ``target_dir``;
    absolute paths and files in the same folder are returned unchanged."""
    if Path(ref.removeprefix("file://")).expanduser().is_absolute():
        return ref
    source, target = os.path.realpath(source_dir), os.path.realpath(target_dir)
    if source == target:
        return ref
    # Resolve the folders (symlinks, "..") but keep the file's own name.
    resolved = os.path.join(os.path.realpath(path.parent), path.name)
    try:
        return os.path.relpath(resolved, target)
    except ValueError:  # another drive (Windows): no relative path exists
        return resolved


def _parts(msg: dict, i: int, folders: tuple[Path, Path] | None, notes: list[str]) -> None:
    """A message's content parts in our chunk shapes (see the module docstring), in place."""
    key = "content" if "content" in msg else "text"
    content, role = msg.get(key), msg.get("role")
    if not isinstance(content, list) or role not in _ROLES:
        return  # a string, or a message the training check reports
    changes: list[str] = []
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"message {i} ({role}) chunk {j}"
        if kind in _IMAGE_PARTS and role != "user":
            fix = {
                "system": "move it into the first user message, or delete it",
                "assistant": "a model is not trained to write pictures: delete it (or the turn)",
                "tool": "pass it in the next user message, or delete it",
            }[role]
            raise Skip(f"{where} is an image, but the model sees pictures only in user messages; {fix}")
        if kind in _IMAGE_PARTS:
            out.append(_image_part(part, where, folders, changes))
        elif kind in _FOREIGN_TEXT_PARTS and role != "tool":  # a tool result's list is encoded as JSON below
            changes.append(f"{kind} -> text")
            out.append({"type": "text", "text": part.get("text", part.get("refusal"))})
        else:
            out.append(part)
    texts = [p.get("text") for p in out if isinstance(p, dict) and p.get("type") == "text"]
    if role == "system" and out and len(texts) == len(out) and all(isinstance(t, str) for t in texts):
        changes.append("text parts -> one string")  # a system prompt is one string
        out = "\n\n".join(t for t in texts if t)
    elif role == "assistant" and changes and len(out) == 1 and len(texts) == 1 and isinstance(texts[0], str):
        out = texts[0]  # one part: a string, which every tokenizer version encodes
    if changes:
        counts = Counter(changes)
        notes.append(f"message {i}: " + ", ".join(c + (f" ({n})" if n > 1 else "") for c, n in counts.items()))
        msg[key] = out


_TAG = "<image>"


def _place_images(obj: dict, messages: list[dict], folders: tuple[Path, Path] | None, notes: list[str]) -> None:
    """LLaVA / LLaMA-Factory rows: pictures listed in a top-level ``image`` or ``images`` and marked by
    ``<image>`` in the user text become image chunks where the placeholders are (before the first
    user text when there is none). Training does not read those keys: left alone, the pictures
    would be dropped without a word."""
    keys = [k for k in ("images", "image") if k in obj and obj[k] not in (None, [])]
    if not keys:
        return  # none, or a text-only row of a dataset with an image column: nothing to place or change
    if len(keys) == 2:
        raise Skip("has both 'image' and 'images'; keep one list of pictures")
    key = keys[0]
    refs = obj.pop(key)
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise Skip(f"'{key}' must be a path or a list of paths, got {json.dumps(refs)[:60]}")
    users = [m for m in messages if m.get("role") == "user"]
    for k, m in enumerate(messages):
        content = m.get("content")
        if m.get("role") != "user" and isinstance(content, str) and _TAG in content:
            raise Skip(f"message {k} ({m.get('role')}) has an {_TAG} placeholder; pictures go in user messages")
    n_tags = sum(m["content"].count(_TAG) for m in users if isinstance(m.get("content"), str))
    if not users or (n_tags and n_tags != len(refs)):
        raise Skip(f"'{key}' lists {len(refs)} picture(s) but the user messages have {n_tags} {_TAG} placeholder(s); "
                   "make them match (one placeholder where each picture goes)")
    changes: list[str] = []
    chunks = iter(
        _image_part({"type": "image_url", "image_url": r}, f"'{key}' entry {j}", folders, changes)
        for j, r in enumerate(refs)
    )
    if not n_tags:
        first = users[0]
        content = first.get("content")
        rest = content if isinstance(content, list) else [{"type": "text", "text": content}] if content else []
        first["content"] = [*chunks, *rest]
    for m in users:  # without placeholders none matches
        if not isinstance(m.get("content"), str) or _TAG not in m["content"]:
            continue
        pieces = m["content"].split(_TAG)
        parts = [{"type": "text", "text": pieces[0].strip()}]
        for text in pieces[1:]:
            parts += [next(chunks), {"type": "text", "text": text.strip()}]
        m["content"] = [c for c in parts if c.get("type") != "text" or c["text"]]
    where = "at the <image> placeholders" if n_tags else "before the first user text (no <image> placeholder)"
    notes.append(f"'{key}' ({len(refs)}) -> image chunks {where}" + "".join(f"; {c}" for c in sorted(set(changes))))


def reformat_sample(
    obj: Any, rng: random.Random, folders: tuple[Path, Path] | None = None
) -> tuple[Any, list[str]]:
    """(fixed sample, notes); raises Skip when the line cannot be made valid. ``folders`` is (the input
    file's folder, the output file's folder): relative image paths start at the first and are rewritten
    to start at the second."""
    if not isinstance(obj, dict):
        raise Skip(f"expected a JSON object, got {type(obj).__name__}")
    notes: list[str] = []
    if "function_description" in obj and "conversations" in obj:
        from utils.reformat_data_glaive import convert  # it imports this module

        obj = convert(obj, rng)
        notes.append("Glaive row converted (as utils.reformat_data_glaive does)")
    elif "conversations" in obj and not ("messages" in obj or "interactions" in obj):
        obj = {"messages": obj.pop("conversations"), **obj}
        notes.append("ShareGPT 'conversations' -> 'messages'")
    key = "messages" if "messages" in obj else "interactions" if "interactions" in obj else None
    if key is None or not isinstance(obj[key], list):
        raise Skip("no 'messages' (or ShareGPT 'conversations') list")
    _tools(obj, notes)
    turns = sum(1 for m in obj[key] if isinstance(m, dict) and "from" in m and "role" not in m)
    if turns:
        notes.append(f"{turns} ShareGPT turn(s) ('from'/'value') -> messages")
    fixed: list[dict] = []
    renamed: dict[str, str] = {}
    pending: list[dict] = []  # unanswered calls of the latest assistant turn
    for i, raw in enumerate(obj[key]):
        if not isinstance(raw, dict):
            raise Skip(f"message {i} is not an object")
        msg = _convert_turn(raw, i, rng, notes)
        _parts(msg, i, folders, notes)
        role = msg.get("role")
        if role == "assistant":
            _thinking(msg, i, notes)
            text = _fix_calls(msg, i, rng, renamed, notes)
            fixed += [text] if text else []
            pending = list(msg.get("tool_calls") or [])
        elif role == "tool":
            _link_tool_message(msg, i, pending, renamed, notes)
        elif role in ("user", "system"):
            pending = []
        fixed.append(msg)
    _place_images(obj, fixed, folders, notes)

    first = next((i for i, m in enumerate(fixed) if m.get("role") in ("user", "system")), None)
    if first is None:
        raise Skip("no user message")
    if first > 0:
        notes.append(
            f"dropped {first} leading message(s) before the first user message "
            f"({', '.join(str(m.get('role')) for m in fixed[:first])})"
        )
        del fixed[:first]
    _system(obj, fixed, notes)
    last = max((i for i, m in enumerate(fixed) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise Skip("no assistant message")
    if last < len(fixed) - 1:
        dropped = [m.get("role") for m in fixed[last + 1 :]]
        del fixed[last + 1 :]
        notes.append(
            f"dropped {len(dropped)} trailing message(s) after the last assistant turn ({', '.join(map(str, dropped))})"
        )
    obj[key] = fixed
    try:
        parse_instruct(obj, folders[1] if folders else None)
    except DataFormatError as e:
        raise Skip(f"{'still ' if notes else ''}invalid: {e}") from None
    return obj, notes


def reformat_file(path: Path, out: Path, seed: int) -> tuple[int, int, int]:
    """Returns (lines written, lines changed, lines skipped); prints each change and skip, and how
    many lines were skipped for http(s) images."""
    rng = random.Random(seed)
    folders = (path.parent.resolve(), out.parent.resolve())
    written = changed = skipped = urls = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src, start=1):
            text = line.rstrip("\n")
            if not text.strip():
                print(f"{path}:{n}: skipped: blank line")
                skipped += 1
                continue
            try:
                obj, notes = reformat_sample(json.loads(text), rng, folders)
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped: invalid JSON ({e.msg} at column {e.colno})")
                skipped += 1
                continue
            except Skip as e:
                print(f"{path}:{n}: skipped: {e}")
                skipped += 1
                urls += isinstance(e, UrlImage)
                continue
            if notes:
                print(f"{path}:{n}: " + "; ".join(notes))
                dst.write(json.dumps(obj, ensure_ascii=False) + "\n")
                changed += 1
            else:
                dst.write(text + "\n")
            written += 1
    os.replace(tmp, out)
    if urls:
        print(
            f"{urls} line(s) skipped for images named by http(s) URL: download each picture, write its path "
            f"relative to {path.name} (or a data: URI) and run reformat_data again."
        )
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
    if not out.parent.is_dir():
        print(f"error: the output folder {out.parent} does not exist; create it first.", file=sys.stderr)
        return None
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
    # Run the package module's main: reformat_data_glaive imports utils.reformat_data, whose Skip
    # must be the class main catches, not a second copy living in __main__.
    from utils.reformat_data import main as package_main

    sys.exit(package_main())
