"""Parsers for the value syntaxes of the config file: durations, sizes, booleans, lists.

Each parser takes the raw string and returns the typed value or raises
``ValueError`` whose message says what was expected; the config loader adds
the file, section and key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3,
    "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
}

# Upper bounds: a value past them is a typo or an attack on the parser (``1e400``
# would be ``inf``), never a setting anyone means; timers and buffers stay sane.
MAX_DURATION = 30 * 24 * 3600.0  # 720h
MAX_SIZE = 1024 ** 4  # 1 TiB

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


def parse_duration(text: str) -> float:
    """``500ms``, ``10s``, ``2m``, ``1h`` or a bare number of seconds → float seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration such as 500ms, 10s, 2m or 1h, got {text!r}")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not value <= MAX_DURATION:  # also refuses inf and nan
        raise ValueError(f"expected a duration of at most 720h, got {text!r}")
    return value


def positive_duration(text: str) -> float:
    """A duration above 0 (:func:`parse_duration`)."""
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"expected a duration above 0, got {text!r}")
    return value


def parse_size(text: str) -> int:
    """``64KiB``, ``1MiB``, ``1GiB`` or a bare number of bytes → int bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size such as 65536, 64KiB or 1MiB, got {text!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if value > MAX_SIZE:
        raise ValueError(f"expected a size of at most 1024GiB, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    """``yes/no``, ``true/false``, ``on/off``, ``1/0`` (any case) → bool."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated values, spaces ignored, empty items dropped → tuple of str."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_rate(text: str) -> tuple[float, float]:
    """``10/s``, ``100/m``, ``1000/h`` → (count, per-second rate)."""
    count, sep, unit = text.strip().partition("/")
    seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
    try:
        number = float(count)
    except ValueError:
        number = -1
    if not sep or seconds is None or not 0 < number <= 1e9:  # refuses inf, nan, 1e20
        raise ValueError(f"expected a rate such as 10/s, 100/m or 1000/h, got {text!r}")
    return number, number / seconds


def choice(*options: str) -> Callable[[str], str]:
    """A parser accepting one of *options* (any case) → the lower-case option."""
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return value
    return parse


def parse_positive_int(text: str) -> int:
    """A whole number ≥ 1."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a number of at least 1, got {value}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A parser for a whole number from *low* to *high*."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value}")
        return value
    return parse


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for display (``wsgate check``, logs)."""
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """The inverse of :func:`parse_size` for display."""
    for unit, factor in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def non_empty(text: str) -> str:
    """Any text but blank → the text without surrounding spaces."""
    text = text.strip()
    if not text:
        raise ValueError("expected a value, got nothing")
    return text


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def placeholders(template: str) -> list[str]:
    """The ``{name}`` placeholders of a template (a channel or an upstream URL)."""
    return _PLACEHOLDER.findall(template)


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """*template* with each ``{name}`` replaced by ``values[name]``."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
