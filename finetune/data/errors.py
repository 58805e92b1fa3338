"""The data pipeline's exception type.

A user's mistake in a data file becomes a :class:`DataFormatError`: a ``ValueError`` whose message says
what is wrong and how to fix it. Code that reads files attaches the path and the 1-based line number.
"""

from __future__ import annotations

# Role names of other chat formats (ShareGPT's "from", OpenAI's legacy "function") and what
# ``utils.reformat_data`` turns them into: "tool_call" is an assistant message with ``tool_calls``.
# The data checks use it to point at that tool; the tool uses it to convert.
FOREIGN_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "function_call": "tool_call",
    "function-call": "tool_call",
    "observation": "tool",
    "function_response": "tool",
    "function-response": "tool",
    "function": "tool",
    "developer": "system",  # OpenAI's newer name for the system role
}


def reformat_hint(what: str) -> str:
    """The clause that sends a user to ``utils.reformat_data`` for something it converts."""
    return f"`python -m utils.reformat_data FILE` {what}"


class DataFormatError(ValueError):
    """A malformed sample. ``kind`` is a short stable tag (``invalid_json``, ``unknown_role``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # survive pickling through a multiprocessing pool
        return (DataFormatError, (self.kind, self.message))
