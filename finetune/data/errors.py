"""The data pipeline's exception type.

A user's mistake in a data file becomes a :class:`DataFormatError`: a ``ValueError`` whose message says
what is wrong and how to fix it. Code that reads files attaches the path and the 1-based line number.
"""

from __future__ import annotations


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
