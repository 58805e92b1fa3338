"""Parse one JSON sample, check it, and turn it into tokens plus a training-target mask.

Instruct samples are encoded message by message with mistral-common's own instruct tokenizer, so the
tokens equal ``encode_instruct(InstructRequest(...))`` token for token (the tests check this); doing it
per message tells us which tokens belong to which message, which is what the mask needs.
``masks[i]`` is True when token ``i`` is a training target: the trainer feeds ``tokens[:-1]`` and
predicts ``tokens[1:]`` where ``masks[1:]`` is True.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageURLChunk, TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV7,
    InstructTokenizerV11,
    InstructTokenizerV13,
)

from finetune.data.errors import FOREIGN_ROLES, DataFormatError, reformat_hint
from finetune.data.images import IMAGE_SHAPES, load_image, parse_image_chunk, require_opencv


class SampleType(Enum):
    PRETRAIN = "pretrain"
    INSTRUCT = "instruct"


@dataclass
class TokenSample:
    tokens: list[int]
    masks: list[bool]
    # mistral-common's processed pictures, float32 (C, H, W), in the order of their [IMG] runs.
    images: list[np.ndarray] = field(default_factory=list)
    # where each picture came from: a file:// (absolute path) or data: URI, as parse_image_chunk gives it
    image_sources: list[str] = field(default_factory=list)


_ROLES = ("system", "user", "assistant", "tool")
# Which role may follow which (mistral-common's finetuning validator, v3).
_NEXT_ROLES = {
    "system": {"user", "assistant", "system"},
    "user": {"assistant", "system", "user"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}
_TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_RELINK = "or let " + reformat_hint("give every call a valid id and relink the tool messages to them")
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Conversation:
    """A checked instruct sample: mistral-common messages (no system messages) plus sample settings.

    ``system_at`` is where the system prompt stood: before ``messages[system_at]``. v3 tokenizers fold
    the prompt into the last user turn and ignore it; v7+ encode it as a message at that place.
    ``index[k]`` is ``messages[k]``'s index in the line's own list, which error messages name.
    """

    messages: list[UserMessage | FinetuningAssistantMessage | ToolMessage]
    system_prompt: str | None
    tools: list[Tool] | None
    only_last: bool
    system_at: int = 0
    index: list[int] = field(default_factory=list)


def _one_of(obj: dict, keys: tuple[str, str], where: str) -> tuple[str | None, Any]:
    present = [k for k in keys if k in obj]
    if len(present) == 2:
        raise DataFormatError(
            "conflicting_keys",
            f"{where} has both '{keys[0]}' and '{keys[1]}'; keep only '{keys[0]}'.",
        )
    if not present:
        return None, None
    return present[0], obj[present[0]]


def _text_of(msg: dict, role: str, index: int) -> Any:
    _, content = _one_of(msg, ("content", "text"), f"message {index} ({role})")
    return content


def _require_str(value: Any, what: str, fix: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(
            "bad_type", f"{what} must be a string, got {type(value).__name__} {_short(value)}; {fix}"
        )
    return value


def _short(value: Any, n: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_pretrain(sample: Any) -> str:
    if not isinstance(sample, dict):
        raise DataFormatError(
            "not_object", f'expected a JSON object like {{"text": "..."}}, got {type(sample).__name__}.'
        )
    key, text = _one_of(sample, ("text", "content"), "the sample")
    if key is None:
        raise DataFormatError(
            "missing_key",
            f'pretraining sample has no \'text\' key (keys: {sorted(sample)}); write {{"text": "..."}}.',
        )
    text = _require_str(text, f"'{key}'", "put the document text in a JSON string.")
    if not text:
        raise DataFormatError("empty_text", f"'{key}' is empty; delete the line or add text.")
    return text


def _is_call_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_TOOL_CALL_ID.match(value))


def _function_name(name: Any, where: str, kind: str) -> str:
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise DataFormatError(
            kind,
            f"{where} has function name {_short(name)}; use 1 to 64 characters from a-z, A-Z, 0-9, _ and -.",
        )
    return name


def _parse_tool(tool: Any, i: int) -> Tool:
    """One entry of the sample's 'tools': a function definition."""
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        fix = 'write {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
        if isinstance(tool, dict) and "name" in tool:
            fix += f", or let {reformat_hint('wrap bare function definitions')}"
        raise DataFormatError("bad_tool", f"tool {i} has no 'function' object; {fix}.")
    fn = tool["function"]
    name = _function_name(fn.get("name"), f"tool {i}", "bad_tool")
    description = fn.get("description", "")
    _require_str(description, f"tool {i} ({name}) 'description'", "describe the function in a string.")
    params = fn.get("parameters", {})
    if not isinstance(params, dict):
        raise DataFormatError(
            "bad_tool",
            f"tool {i} ({name}) 'parameters' must be a JSON-schema object, got {_short(params)}; "
            "use {} for a function without parameters.",
        )
    return Tool(function=Function(name=name, description=description, parameters=params))


def _parse_tools(raw: Any) -> list[Tool]:
    if not isinstance(raw, list):
        hint = f"; {reformat_hint('parses tools written as a JSON string')}" if isinstance(raw, str) else ""
        raise DataFormatError(
            "bad_tool", f"'tools' must be a list of tool definitions, got {_short(raw)}{hint}."
        )
    return [_parse_tool(tool, i) for i, tool in enumerate(raw)]


def _check_arguments(args: Any, where: str, name: str) -> str:
    """A tool call's arguments: a string holding JSON, as mistral-common encodes them verbatim."""
    if not isinstance(args, str):
        raise DataFormatError(
            "bad_arguments",
            f'{where} ({name}) \'arguments\' must be a JSON-encoded string such as "{{\\"city\\": \\"Paris\\"}}", '
            f"got {type(args).__name__} {_short(args)}; encode it with json.dumps(arguments) "
            f"({reformat_hint('does')}).",
        )
    try:
        json.loads(args)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            "bad_arguments",
            f"{where} ({name}) 'arguments' is not valid JSON ({e.msg} at column {e.colno}): {_short(args)}; "
            "it must be json.dumps(arguments).",
        ) from None
    return args


def _parse_tool_call(call: Any, where: str, is_last: bool) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise DataFormatError(
            "bad_tool_call",
            f"{where} has no 'function' object; write "
            '{"id": "abc123XYZ", "type": "function", "function": {"name": ..., "arguments": "{...}"}}.',
        )
    call_id = call.get("id")
    # The final turn's ids are dropped before encoding, so only earlier calls need one.
    if not (is_last and call_id is None) and not _is_call_id(call_id):
        raise DataFormatError(
            "bad_tool_call_id",
            f"{where} has id {_short(call_id)}; ids must be exactly 9 characters from a-z, A-Z, 0-9 "
            "(e.g. 'a1B2c3D4e'), the same in the tool message's 'tool_call_id'; "
            f"{_RELINK}.",
        )
    fn = call["function"]
    name = _function_name(fn.get("name"), where, "bad_tool_call")
    args = _check_arguments(fn.get("arguments"), where, name)
    return ToolCall(
        id=call_id if isinstance(call_id, str) else "null",
        function=FunctionCall(name=name, arguments=args),
    )


def _parse_tool_calls(raw: Any, index: int, is_last: bool) -> list[ToolCall]:
    if not isinstance(raw, list) or not raw:
        raise DataFormatError(
            "bad_tool_call",
            f"message {index} (assistant) 'tool_calls' must be a non-empty list, got {_short(raw)}.",
        )
    return [
        _parse_tool_call(call, f"message {index} (assistant) tool call {j}", is_last)
        for j, call in enumerate(raw)
    ]


# The sample: its list of messages and its settings.


def _raw_messages(sample: Any) -> list:
    if not isinstance(sample, dict):
        raise DataFormatError(
            "not_object", f'expected a JSON object like {{"messages": [...]}}, got {type(sample).__name__}.'
        )
    key, raw_messages = _one_of(sample, ("messages", "interactions"), "the sample")
    if key is None:
        if "conversations" in sample:
            raise DataFormatError(
                "missing_key",
                "instruct sample has 'conversations', not 'messages': a ShareGPT (or Glaive) export; "
                f"{reformat_hint('converts it')}.",
            )
        raise DataFormatError(
            "missing_key",
            f"instruct sample has no 'messages' key (keys: {sorted(sample)}); write "
            '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}.',
        )
    if not isinstance(raw_messages, list):
        raise DataFormatError("bad_type", f"'{key}' must be a list of messages, got {_short(raw_messages)}.")
    if not raw_messages:
        raise DataFormatError(
            "empty_conversation",
            f"'{key}' is empty; a sample needs at least a user and an assistant message.",
        )
    return raw_messages


def _refuse_unread_keys(sample: dict) -> None:
    """Top-level keys from other formats that training would silently ignore."""
    if sample.get("functions"):  # read by nobody: the model would never see these definitions
        raise DataFormatError(
            "bad_tool",
            "the sample has 'functions', OpenAI's legacy name for 'tools', which training does not read; "
            f"{reformat_hint('turns it into tools')}.",
        )
    if sample.get("system"):
        raise DataFormatError(
            "missing_key",
            "the sample has a top-level 'system', which training does not read; rename it 'system_prompt', "
            f"or let {reformat_hint('make it the first message')}.",
        )
    for key in ("image", "images"):
        if sample.get(key):  # LLaVA / LLaMA-Factory rows: the pictures would be dropped silently
            raise DataFormatError(
                "bad_image",
                f"the sample has a top-level '{key}' (LLaVA / LLaMA-Factory style), which training does not read; "
                "put each picture in a user message as an image chunk, or let "
                f"{reformat_hint('place them where the <image> placeholders are')}.",
            )


def _sample_settings(sample: dict) -> tuple[list[Tool] | None, bool, str | None]:
    """The sample's tools (None for none), only_last and system_prompt."""
    _, raw_tools = _one_of(sample, ("tools", "available_tools"), "the sample")
    tools = _parse_tools(raw_tools) if raw_tools is not None else None
    only_last = sample.get("only_last", False)
    if not isinstance(only_last, bool):
        raise DataFormatError("bad_type", f"'only_last' must be true or false, got {_short(only_last)}.")
    system_prompt = sample.get("system_prompt")
    if system_prompt is not None:
        system_prompt = _require_str(system_prompt, "'system_prompt'", "write the system prompt as a string.")
    return tools or None, only_last, system_prompt  # an empty list of tools means no tools


# One parser per role. Each gets the message, its text ('content' or 'text') and its index.


def _role_of(msg: Any, i: int) -> str:
    if not isinstance(msg, dict):
        raise DataFormatError("bad_type", f"message {i} must be a JSON object, got {_short(msg)}.")
    role = msg.get("role")
    if role is None:
        if "from" in msg:
            raise DataFormatError(
                "missing_key",
                f"message {i} is a ShareGPT turn ('from'/'value'), not a message ('role'/'content'); "
                f"{reformat_hint('converts it')}.",
            )
        raise DataFormatError(
            "missing_key",
            f"message {i} has no 'role' (keys: {sorted(msg)}); use one of {', '.join(_ROLES)}.",
        )
    if role not in _ROLES:
        hint = f", or let {reformat_hint('convert it')}" if isinstance(role, str) and role in FOREIGN_ROLES else ""
        raise DataFormatError(
            "unknown_role",
            f"message {i} has role {_short(role)}; use one of {', '.join(_ROLES)}{hint}.",
        )
    return role


def _parse_system(content: Any, i: int, system_prompt: str | None) -> str:
    """The system prompt; ``system_prompt`` is the one already given, if any."""
    if system_prompt is not None:
        raise DataFormatError(
            "multiple_system",
            f"message {i} is a second system prompt; keep one system message (or 'system_prompt').",
        )
    return _require_str(content, f"message {i} (system) 'content'", "write the system prompt as a string.")


def _parse_user(content: Any, i: int, base_dir: Path | None) -> UserMessage:
    if isinstance(content, list):
        return UserMessage(content=_parse_user_chunks(content, i, base_dir))
    content = _require_str(
        content, f"message {i} (user) 'content'", "write the user text as a string (or a list of chunks)."
    )
    return UserMessage(content=content)


def _parse_user_chunks(content: list, i: int, base_dir: Path | None) -> str | list[TextChunk | ImageURLChunk]:
    """Text and image chunks, coalesced as mistral-common's request normalizer does for v3-v13: adjacent
    text chunks joined with a blank line, empty ones dropped, a list of text alone becomes a string."""
    where = f"message {i} (user) content"
    if not content:
        raise DataFormatError("empty_content", f"{where} is an empty list; write the question or delete the turn.")
    out: list[TextChunk | ImageURLChunk] = []
    texts: list[str] = []
    for j, chunk in enumerate(content):
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind == "text":
            text = _require_str(chunk.get("text"), f"{where} chunk {j} 'text'", "write the text as a string.")
            if text:
                texts.append(text)
        elif kind in ("image_url", "image"):
            if texts:
                out.append(TextChunk(text="\n\n".join(texts)))
                texts = []
            out.append(parse_image_chunk(chunk, f"{where} chunk {j}", base_dir))
        else:
            raise DataFormatError(
                "bad_chunk", f"{where} chunk {j} is {_short(chunk)}; write {{\"type\": \"text\", \"text\": ...}} or {IMAGE_SHAPES}."
            )
    if not out:
        return "\n\n".join(texts)
    if texts:
        out.append(TextChunk(text="\n\n".join(texts)))
    return out


def _parse_tool_result(msg: dict, content: Any, i: int) -> ToolMessage:
    content = _require_str(
        content,
        f"message {i} (tool) 'content'",
        f"write the tool result as a string ({reformat_hint('encodes it as JSON')}).",
    )
    call_id = msg.get("tool_call_id")
    if not _is_call_id(call_id):
        raise DataFormatError(
            "bad_tool_call_id",
            f"message {i} (tool) has tool_call_id {_short(call_id)}; it must be the 9-character id "
            f"(a-z, A-Z, 0-9) of the tool call it answers, {_RELINK}.",
        )
    return ToolMessage(content=content, tool_call_id=call_id)


def _assistant_weight(msg: dict, i: int) -> int | None:
    weight = msg.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise DataFormatError(
            "bad_weight",
            f"message {i} (assistant) has weight {_short(weight)}; use 0 (not trained) or 1 (trained, the default).",
        )
    return weight


_CHUNK_SHAPES = '{"type": "thinking", "thinking": "...", "closed": true} or {"type": "text", "text": "..."}'


def _parse_chunk(chunk: Any, where: str) -> ThinkChunk | TextChunk:
    kind = chunk.get("type") if isinstance(chunk, dict) else None
    if kind == "thinking":
        thinking = _require_str(chunk.get("thinking"), f"{where} 'thinking'", "write the reasoning as a string.")
        closed = chunk.get("closed", True)
        if not isinstance(closed, bool):
            raise DataFormatError("bad_type", f"{where} 'closed' must be true or false, got {_short(closed)}.")
        return ThinkChunk(thinking=thinking, closed=closed)
    if kind == "text":
        return TextChunk(text=_require_str(chunk.get("text"), f"{where} 'text'", "write the text as a string."))
    raise DataFormatError("bad_chunk", f"{where} is {_short(chunk)}; write {_CHUNK_SHAPES}.")


def _parse_chunks(content: list, i: int) -> list[ThinkChunk | TextChunk]:
    """An assistant answer in mistral-common's chunk form: reasoning first, then the text."""
    where = f"message {i} (assistant) content"
    if not content:
        raise DataFormatError("empty_content", f"{where} is an empty list; write the answer or delete the turn.")
    chunks = [_parse_chunk(c, f"{where} chunk {j}") for j, c in enumerate(content)]
    kinds = [isinstance(c, ThinkChunk) for c in chunks]
    if kinds != sorted(kinds, reverse=True):
        raise DataFormatError(
            "bad_chunk", f"{where} has a thinking chunk after a text chunk; put the reasoning first."
        )
    return chunks


def _parse_assistant(msg: dict, content: Any, i: int, is_last: bool) -> FinetuningAssistantMessage:
    """An answer: text (a string or chunks), tool calls, or from v7 on both (checked when encoding)."""
    weight = _assistant_weight(msg, i)
    if "function_call" in msg:  # never trained on: the call would be dropped silently
        raise DataFormatError(
            "bad_tool_call",
            f"message {i} (assistant) has OpenAI's legacy 'function_call', which training does not read; "
            f"write 'tool_calls', or let {reformat_hint('convert it (and link the function results)')}.",
        )
    for key in ("reasoning_content", "reasoning"):  # never trained on: the reasoning would be dropped silently
        if msg.get(key):
            raise DataFormatError(
                "bad_chunk",
                f"message {i} (assistant) has '{key}', which training does not read; for a reasoning model "
                f"(a tokenizer with [THINK]) write it as a thinking chunk in 'content' ({_CHUNK_SHAPES}) or let "
                f"{reformat_hint('convert it')}, otherwise delete it.",
            )
    raw_calls = msg.get("tool_calls")
    calls = _parse_tool_calls(raw_calls, i, is_last) if raw_calls else None
    if content is None or (calls and content == ""):  # "" beside calls is no text, as mistral-common reads it
        if not calls:
            raise DataFormatError(
                "missing_key",
                f"message {i} (assistant) has neither 'content' nor 'tool_calls'; add one.",
            )
        return FinetuningAssistantMessage(tool_calls=calls, weight=weight)
    if isinstance(content, list):
        return FinetuningAssistantMessage(content=_parse_chunks(content, i), tool_calls=calls, weight=weight)
    content = _require_str(
        content, f"message {i} (assistant) 'content'", "write the answer as a string (or a list of chunks)."
    )
    if not content.rstrip(" "):
        raise DataFormatError(
            "empty_content",
            f"message {i} (assistant) has empty content; write the answer or delete the turn.",
        )
    return FinetuningAssistantMessage(content=content, tool_calls=calls, weight=weight)


# The order rules: which role may follow which, how the conversation starts and ends, and which
# call each tool result answers.


def _check_follows(previous: str, role: str, i: int) -> None:
    if role not in _NEXT_ROLES[previous]:
        raise DataFormatError(
            "bad_role_order",
            f"message {i} ({role}) cannot follow a {previous} message; a {previous} message may be "
            f"followed by {', '.join(sorted(_NEXT_ROLES[previous]))}.",
        )


def _check_start_and_end(roles: list[str]) -> None:
    if roles[0] not in ("user", "system"):
        raise DataFormatError(
            "bad_role_order",
            f"the conversation starts with a {roles[0]} message; start with a user (or system) message "
            f"({reformat_hint('drops the leading turns')}).",
        )
    if roles[-1] != "assistant":
        raise DataFormatError(
            "last_role",
            f"the last message is a {roles[-1]} message; a training sample must end with an assistant message "
            "(delete the trailing messages or add the assistant's answer; "
            f"{reformat_hint('drops the trailing messages')}).",
        )


def _check_tool_results(messages: list, index: list[int]) -> None:
    """Each call of an assistant turn gets exactly one tool message, right after the turn (the final turn's
    calls excepted), as mistral-common's validator requires on every version. It links results to calls
    by id from v11 on and only counts them before; v3/v7 still encode the id, so a result linked to no
    call is refused on every version."""
    pending: list[str] = []  # unanswered call ids (v3/v7 allow one id twice in a turn; v11+ refuse it later)
    caller = -1  # index of the assistant message making them
    for m, i in zip(messages, index, strict=True):
        if isinstance(m, ToolMessage):
            if m.tool_call_id not in pending:
                raise DataFormatError(
                    "bad_tool_call_id",
                    f"message {i} (tool) answers tool_call_id {m.tool_call_id!r}, which is not an unanswered call "
                    f"of the preceding assistant message; match it to the call's 'id', {_RELINK}.",
                )
            pending.remove(m.tool_call_id)
            continue
        if pending:
            role = "user" if isinstance(m, UserMessage) else "assistant"
            raise DataFormatError(
                "missing_tool_result",
                f"message {caller} (assistant) makes tool call(s) "
                f"{', '.join(map(repr, pending))} that get no tool message before message {i} ({role}); "
                "add a tool message with each call's 'tool_call_id' right after the calls, or drop the calls.",
            )
        if isinstance(m, FinetuningAssistantMessage) and m.tool_calls:
            pending, caller = [c.id for c in m.tool_calls], i


def parse_instruct(sample: Any, base_dir: Path | None = None) -> Conversation:
    """Check an instruct sample against the rules of mistral-common's finetuning validator.

    Every rule is checked here, in plain Python, so that a bad line gets a message that says how to fix it
    instead of a traceback from inside mistral-common. The first broken rule is reported, in reading
    order: the sample's keys, each message in turn (its role, whether that role may follow the previous
    one, its fields), then how the conversation starts and ends, then the tool results' links.
    Image paths are resolved against ``base_dir`` (the JSONL file's folder) but not read here.
    """
    raw_messages = _raw_messages(sample)
    _refuse_unread_keys(sample)
    tools, only_last, system_prompt = _sample_settings(sample)
    messages: list[UserMessage | FinetuningAssistantMessage | ToolMessage] = []
    roles: list[str] = []
    index: list[int] = []
    last = len(raw_messages) - 1
    system_at = 0
    for i, msg in enumerate(raw_messages):
        role = _role_of(msg, i)
        if roles:
            _check_follows(roles[-1], role, i)
        roles.append(role)
        content = _text_of(msg, role, i)
        if role == "system":
            system_prompt = _parse_system(content, i, system_prompt)
            system_at = len(messages)
            continue
        index.append(i)
        if role == "user":
            messages.append(_parse_user(content, i, base_dir))
        elif role == "tool":
            messages.append(_parse_tool_result(msg, content, i))
        else:
            messages.append(_parse_assistant(msg, content, i, is_last=i == last))
    _check_start_and_end(roles)
    _check_tool_results(messages, index)
    return Conversation(messages, system_prompt, tools, only_last or tools is not None, system_at, index)


def chunk_conversation(conv: Conversation) -> list[Conversation]:
    """The conversation plus, for a trained-only-last sample with k assistant turns, the k-1 prefixes
    that end at each earlier assistant turn (longest first). Each prefix trains its own last turn."""
    out = [conv]
    if not conv.only_last:
        return out
    ends = [i for i, m in enumerate(conv.messages) if isinstance(m, FinetuningAssistantMessage)]
    for end in reversed(ends[:-1]):
        out.append(replace(conv, messages=conv.messages[: end + 1], index=conv.index[: end + 1]))
    return out


def _tokens(encoded: Any) -> list[int]:
    # mistral-common returns (tokens, images, audios) from some encoders and a bare list from others.
    return list(encoded[0]) if isinstance(encoded, tuple) else list(encoded)


def _with_images(m: UserMessage, i: int, it: Any) -> tuple[UserMessage, list[str]]:
    """The user message with its pictures loaded, and their URIs; ``i`` is its index in the line."""
    if not isinstance(m.content, list):
        return m, []
    if it.image_encoder is None:
        raise DataFormatError(
            "no_image_encoder",
            f"message {i} (user) has an image, but this model's tokenizer has no image encoder (its tokenizer "
            "file has no image config), so the model cannot see pictures; train a vision model (e.g. Pixtral, "
            "Mistral Small 3.1) with its own tokenizer file, or remove the image chunks.",
        )
    require_opencv("training on images")  # the machine, not the line: an ImportError stops the scan
    content, urls = [], []
    for c in m.content:
        if isinstance(c, ImageURLChunk):
            urls.append(c.get_url())
            c = load_image(c, f"message {i} (user) image {len(urls) - 1}")
        content.append(c)
    return UserMessage(content=content), urls


def _check_assistant(m: FinetuningAssistantMessage, i: int, it: Any) -> None:
    """The rules that depend on the tokenizer version, where mistral-common would assert or its validator
    refuse: chunk lists need v7+, thinking needs [THINK], text beside calls needs v7+, and from v11 the
    calls of one turn need distinct ids. ``i`` is the message's index in the line."""
    version = it.tokenizer.version.value
    if isinstance(m.content, list) and not isinstance(it, InstructTokenizerV7):
        raise DataFormatError(
            "bad_chunk",
            f"message {i} (assistant) content is a list of chunks, which this model's {version} tokenizer cannot "
            "encode (v7 or later can); write the answer as a string.",
        )
    if isinstance(m.content, list) and any(isinstance(c, ThinkChunk) for c in m.content):
        if getattr(it, "BEGIN_THINK", None) is None:
            raise DataFormatError(
                "no_think_token",
                f"message {i} (assistant) has a 'thinking' chunk, but this model's tokenizer ({version}) has no "
                "[THINK]/[/THINK] tokens, so it cannot be trained on reasoning traces; drop the thinking chunks "
                "(keep the text) or train a reasoning model (e.g. Magistral) with its own tokenizer file.",
            )
    if m.content and m.tool_calls and not isinstance(it, InstructTokenizerV7):
        raise DataFormatError(
            "content_and_tool_calls",
            f"message {i} (assistant) has both content and tool_calls, which this model's {version} tokenizer "
            f"cannot encode in one turn (v7 or later can); split it into two assistant messages "
            f"({reformat_hint('does')}).",
        )
    if m.tool_calls and isinstance(it, InstructTokenizerV11):
        ids = [c.id for c in m.tool_calls if c.id != "null"]  # "null": the final turn's id left out
        for call_id in ids:
            if ids.count(call_id) > 1:
                raise DataFormatError(
                    "bad_tool_call_id",
                    f"message {i} (assistant) has {ids.count(call_id)} tool calls with id {call_id!r}, which this "
                    f"model's {version} tokenizer refuses; give each call of a turn its own id and link each tool "
                    f"message to its call, {_RELINK}.",
                )


def check_instruct_version(instruct_tokenizer: Any) -> None:
    """Refuse instruct versions whose layout this encoder does not reproduce. v15 adds model settings
    ([MODEL_SETTINGS]{"reasoning_effort": ...}[/MODEL_SETTINGS] at the first user turn), which mistral-common
    fills with the tokenizer's defaults when serving; samples carry no settings, so their prompts would
    differ from the served ones."""
    version = _as_instruct_tokenizer(instruct_tokenizer).tokenizer.version
    if version > TokenizerVersion.v13:
        raise DataFormatError(
            "unsupported_tokenizer",
            f"this model's tokenizer is instruct version {version.value}, whose prompts carry model settings "
            "([MODEL_SETTINGS], e.g. reasoning_effort) that training samples cannot express yet; instruct data "
            "can be trained with tokenizers v3, v7, v11 and v13 (pretraining data with any version).",
        )


def _final_calls(m: FinetuningAssistantMessage, it: Any) -> FinetuningAssistantMessage:
    """The final turn's calls as trained: v3-v11 encode their id, which is random, so it becomes "null"
    (encoded as no id). v13 never encodes ids but refuses "null", so a missing one gets a placeholder."""
    ids_encoded = not isinstance(it, InstructTokenizerV13)
    calls = [
        c.model_copy(update={"id": "null" if ids_encoded else (c.id if c.id != "null" else "000000000")})
        for c in m.tool_calls or []
    ]
    return m.model_copy(update={"tool_calls": calls})


def encode_conversation(conv: Conversation, instruct_tokenizer: Any) -> TokenSample:
    """Tokens equal to ``encode_instruct(InstructRequest(...))``; masks mark trained assistant turns.

    Each message goes through the tokenizer's own per-message encoder, in encode_instruct's order, so
    the version-specific layouts (v3 system prompt in the last user turn, v7 [SYSTEM_PROMPT] messages,
    v11 [CALL_ID]/[ARGS] calls, v13 tools at the first user turn and [THINK] chunks, v7+ text then
    calls in one turn) come from mistral-common; an assistant message's tokens (reasoning, text, calls
    and EOS) are all targets.
    """
    it = instruct_tokenizer
    separate_system = isinstance(it, InstructTokenizerV7)  # v7+: system prompt is its own message
    tokens: list[int] = list(it.start())
    masks: list[bool] = [False] * len(tokens)
    images: list[np.ndarray] = []
    sources: list[str] = []
    system = None
    if separate_system and conv.system_prompt is not None:
        system, _ = it.encode_system_message(SystemMessage(content=conv.system_prompt))
    first_user = last_user = -1
    for i, m in enumerate(conv.messages):
        if isinstance(m, UserMessage):
            last_user = i
            if first_user < 0:
                first_user = i
    last = len(conv.messages) - 1
    for i, m in enumerate(conv.messages):
        if system is not None and i == conv.system_at:
            tokens += system
            masks += [False] * len(system)
        if isinstance(m, UserMessage):
            has_chunks = isinstance(m.content, list)
            loaded, urls = _with_images(m, conv.index[i] if conv.index else i, it)
            sources += urls
            encoded = it.encode_user_message(
                loaded,
                conv.tools,
                i == last_user,
                i == first_user,
                system_prompt=None if separate_system else conv.system_prompt,
                # encode_instruct puts an image that follows text alone first; chunk lists only
                **({"force_img_first": True} if has_chunks else {}),
            )
            t = _tokens(encoded)
            images += encoded[1] if has_chunks else []
            train = False
        elif isinstance(m, ToolMessage):
            t = _tokens(it.encode_tool_message(m, i < last_user))
            train = False
        else:
            _check_assistant(m, conv.index[i] if conv.index else i, it)
            if i == last and m.tool_calls:
                m = _final_calls(m, it)
            t = _tokens(it.encode_assistant_message(m, i < last_user))
            train = m.weight != 0 and (not conv.only_last or i == last)
        tokens += t
        masks += [train] * len(t)
    return TokenSample(tokens, masks, images, sources)


def encode_pretrain(text: str, instruct_tokenizer: Any) -> TokenSample:
    tokens = instruct_tokenizer.tokenizer.encode(text, bos=True, eos=True)
    return TokenSample(tokens, [True] * len(tokens))


def _as_instruct_tokenizer(tokenizer: Any) -> Any:
    # Accept a MistralTokenizer as well as its .instruct_tokenizer.
    return getattr(tokenizer, "instruct_tokenizer", tokenizer)


def encode_all(
    sample: Any, instruct_tokenizer: Any, as_type: SampleType, chunk: bool, base_dir: Path | None = None
) -> list[TokenSample]:
    """Encode one line into its training samples: one, or one per assistant turn when ``chunk`` applies.
    ``base_dir`` is the JSONL file's folder, which relative image paths start from."""
    it = _as_instruct_tokenizer(instruct_tokenizer)
    if as_type is SampleType.PRETRAIN:
        return [encode_pretrain(parse_pretrain(sample), it)]
    check_instruct_version(it)
    conv = parse_instruct(sample, base_dir)
    convs = chunk_conversation(conv) if chunk else [conv]
    return [_encode_or_explain(c, it) for c in convs]


def _encode_or_explain(conv: Conversation, it: Any) -> TokenSample:
    try:
        return encode_conversation(conv, it)
    except (DataFormatError, ImportError):  # ImportError: mistral-common's image encoder needs OpenCV
        raise
    except Exception as e:  # a rule mistral-common enforces that parse_instruct does not know about
        raise DataFormatError(
            "tokenizer_error",
            f"mistral-common could not encode this conversation ({type(e).__name__}: {e}); "
            "check it against the instruct format in docs/data.md.",
        ) from None
