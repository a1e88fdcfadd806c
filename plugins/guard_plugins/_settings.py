"""Strict readers for the first-party plugins' settings blocks.

Every error is a :class:`guard.ConfigError` whose key is relative to the plugin's own block
(``jailbreak.threshold``); the engine prefixes ``plugins.config.<plugin>.``. Values set with
Helm ``--set`` arrive typed by Helm, so map keys that are feature ids may be digit strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from guard import ConfigError

T = TypeVar("T")
Check = Callable[[str, object], T]

class Block:
    """One settings mapping, read key by key after :meth:`only` rejected unknown keys."""

    def __init__(self, data: object, path: str, *, what: str = "a mapping of settings") -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, what, data)
        self.data: Mapping[Any, Any] = data
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def required(self, name: str, check: Check[T]) -> T:
        if name not in self.data:
            raise ConfigError(self.key(name), "a value (this key is required)", "nothing")
        return check(self.key(name), self.data[name])

    def optional(self, name: str, check: Check[T], default: T) -> T:
        if name not in self.data:
            return default
        return check(self.key(name), self.data[name])

    def only(self, keys: Iterable[str], context: str = "") -> None:
        """Reject any key outside ``keys`` before reading: a typo in an optional key must be
        reported as itself, not as a missing required key or a silent default."""
        allowed = set(keys)
        unknown = sorted(str(k) for k in self.data if str(k) not in allowed)
        if unknown:
            where = f" {context}" if context else ""
            raise ConfigError(
                self.key(unknown[0]),
                f"one of the keys{where}: {', '.join(sorted(allowed))}",
                f"unknown key {unknown[0]!r}",
            )


def entries(data: object, path: str, what: str) -> Iterator[tuple[str, object]]:
    """The ``name -> settings`` pairs of a block (maps, not lists, so ``--set`` works)."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"a mapping of {what}", data)
    for name, value in data.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.{name}" if path else str(name), f"a {what} name", name)
        yield name, value


def string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "a non-empty string", value)
    return value


def boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "true or false", value)
    return value


def number(key: str, value: object) -> float:
    # bool is an int in Python; `threshold: yes` must not read as 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, "a finite number", value)
    return float(value)


def positive_number(key: str, value: object) -> float:
    result = number(key, value)
    if result <= 0:
        raise ConfigError(key, "a number > 0", value)
    return result


def positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, "an integer >= 1", value)
    return value


def feature_id(key: str, value: object) -> int:
    """A feature id: an integer >= 0, or its digits as a string (a map key set by Helm)."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, "a feature id (an integer >= 0)", value)
    return value


def feature_ids(key: str, value: object) -> tuple[int, ...]:
    """A non-empty list of distinct feature ids, in the order given."""
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "a non-empty list of feature ids", value)
    ids = tuple(feature_id(f"{key}[{i}]", v) for i, v in enumerate(value))
    if len(set(ids)) != len(ids):
        raise ConfigError(key, "distinct feature ids", value)
    return ids


def choice(*options: str) -> Check[str]:
    def check(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise ConfigError(key, f"one of {', '.join(options)}", value)
        return value

    return check
