"""Incremental UTF-8 validation for text messages, on CPython's own decoder.

Why: Autobahn's validator (NVX, or its pure-Python DFA) is a byte-at-a-time
state machine: 44 µs for a 16 KiB message here, the largest single cost of
echoing 16 KiB text. CPython's UTF-8 decoder checks ASCII a word at a time
and the rest in C; ``bytes.isascii`` needs no allocation at all.

Contract (Autobahn's ``Utf8Validator``): ``validate(chunk)`` returns
``(valid, ends_on_code_point, current_index, total_index)`` and, like
Autobahn's, fails *fast*: a chunk is refused as soon as no continuation
could make the bytes so far valid, which the Autobahn testsuite's 6.4.*
cases check. CPython's incremental decoder already refuses every impossible
prefix except one: a lead byte ``ED`` followed by ``A0``-``BF`` (the start
of a UTF-16 surrogate), which it holds back waiting for more; that prefix
is refused here explicitly.
"""

from __future__ import annotations

from codecs import utf_8_decode
from typing import TypeAlias

# (valid, ends_on_code_point, current_index, total_index), as Autobahn's validator
Verdict: TypeAlias = "tuple[bool, bool, int, int]"


class Utf8Validator:
    """One text message at a time; ``reset()`` between messages."""

    __slots__ = ("_pending", "_total", "_valid")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new message."""
        self._pending = b""
        self._total = 0
        self._valid = True

    def validate(self, chunk: bytes) -> Verdict:
        """The verdict on the message so far, *chunk* its latest bytes (see the module
        docstring); once invalid, every later chunk is refused too."""
        if not self._valid:
            return (False, False, 0, self._total)
        pending = self._pending
        if not pending and chunk.isascii():
            self._total += len(chunk)
            return (True, True, len(chunk), self._total)
        data = pending + chunk if pending else chunk
        try:
            consumed = utf_8_decode(data, "strict", False)[1]
        except UnicodeDecodeError as error:
            return self._invalid(error.start - len(pending))
        rest = data[consumed:]
        if len(rest) > 1 and rest[0] == 0xED and rest[1] >= 0xA0:
            return self._invalid(consumed - len(pending))  # a surrogate: never valid
        self._pending = bytes(rest)
        self._total += len(chunk)
        return (True, not rest, len(chunk), self._total)

    def _invalid(self, index_in_chunk: int) -> Verdict:
        self._valid = False
        index = max(0, index_in_chunk)
        self._total += index
        return (False, False, index, self._total)
