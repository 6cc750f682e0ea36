"""A config section's raw keys, handed out typed: what policy and target plugins read.

The core sections are read by :mod:`wsgate.config` with the same parsers
(:mod:`wsgate.units`); a plugin declares its keys and reads them here, and
an error names the key so the loader can name the file and section too.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

REQUIRED: Any = object()  # get()'s default: the key must be there


class SettingError(Exception):
    """A problem with one key of a section (*key* may be None: the section as a whole)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class Settings:
    """A section's raw string values; :meth:`get` parses one, errors name the key."""

    def __init__(self, raw: Mapping[str, str]):
        self.raw = dict(raw)

    def get(self, key: str, parse: Callable[[str], Any] = str, default: Any = REQUIRED) -> Any:
        if key not in self.raw:
            if default is REQUIRED:
                raise SettingError(key, "is required")
            return default
        try:
            return parse(self.raw[key])
        except ValueError as e:
            raise SettingError(key, str(e)) from None

    def has(self, key: str) -> bool:
        return key in self.raw
