"""A config section's raw keys, handed out typed: what policy and target plugins read.

The core sections are read by :mod:`wsgate.config` with the same parsers
(:mod:`wsgate.units`); a plugin declares its keys and reads them here, and
an error names the key so the loader can name the file and section too.
"""

from __future__ import annotations

import os
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

    def secret(self, key: str, config_dir: str, parse: Callable[[str], Any] = str,
               default: Any = REQUIRED) -> Any:
        """A secret: the value of *key*, or the content of the file ``<key>_file`` names.

        The file (relative to *config_dir*, the config file's folder) is read
        now, so a reload reads it again; its content with trailing whitespace
        stripped is the value (then given to *parse*). Setting both keys, an
        unreadable file or an empty one is a :class:`SettingError` naming the
        ``_file`` key (and the file). A type that takes a secret declares both
        keys.
        """
        file_key = key + "_file"
        if file_key not in self.raw:
            return self.get(key, parse, default)
        if key in self.raw:
            raise SettingError(file_key, f"set {key} or {file_key}, not both")
        path = self.raw[file_key].strip()
        if not path:
            raise SettingError(file_key, "expected a file name")
        if not os.path.isabs(path):
            path = os.path.join(config_dir, path)
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().rstrip()
        except OSError as e:
            raise SettingError(file_key, f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise SettingError(file_key, f"expected UTF-8 text in {path}") from None
        if not value:
            raise SettingError(file_key, f"{path} is empty")
        try:
            return parse(value)
        except ValueError:  # its message could quote the secret
            raise SettingError(file_key, f"the content of {path} is not valid here") from None
