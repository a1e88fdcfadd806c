"""Strict reading of settings: the guard's configuration file and every plugin's block.

A :class:`Settings` reads one mapping key by key. Each read checks the value's type and
range, and a wrong value is a :class:`guard.ConfigError` that names the full key path
(``saes[1].sha256``), what was expected and what was found. :meth:`Settings.finish` (or
:meth:`Settings.only`, before reading) rejects the keys nobody reads, so that a typo is
reported as itself instead of silently falling back to a default.

A plugin reads its block in ``guard_configure``; keys are relative to the block, and the guard
prefixes ``plugins.config.<plugin>.`` to the key of the error::

    @hookimpl
    def guard_configure(self, settings):
        block = Settings(settings)
        self.hook = block.hook("hook")
        self.threshold = block.number("threshold")
        self.action = block.choice("action", ("log", "flag"), "flag")
        block.finish()
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Final, Literal, TypeVar, overload

from guard.errors import ConfigError

T = TypeVar("T")
#: A key of a mapping, or an index of a list read with :meth:`Settings.sequence`.
Name = str | int
#: Checks one value: ``check(key, value)`` returns it converted or raises ConfigError(key, ...).
Check = Callable[[str, object], T]

_HOOK_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_FEATURE_ID = "a feature id (an integer >= 0)"


class _Required(enum.Enum):
    REQUIRED = "required"


#: The default of every read: the key must be present.
REQUIRED: Final = _Required.REQUIRED


class Settings:
    """One mapping of settings (``path`` is its key path: ``""`` for a plugin's block, or
    ``server.tls``), read key by key; ``None`` reads as an empty mapping.

    Every reader takes the key and a default; without a default the key is required.
    """

    def __init__(self, data: object, path: str = "", *, what: str = "a mapping") -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, what, data)
        self.path = path
        #: The mapping read (for a list read with :meth:`sequence`: index -> item).
        self.data: Mapping[Any, Any] = data
        self._index = False
        self._read: set[str] = set()
        self._allowed: set[str] = set()

    def key(self, name: Name) -> str:
        """The full key path of ``name`` (``server.listen``, ``edits[2]``)."""
        if self._index:
            return f"{self.path}[{name}]"
        return f"{self.path}.{name}" if self.path else str(name)

    def error(self, name: Name | None, expected: str, found: object) -> ConfigError:
        """The ConfigError for ``name`` (None: this mapping itself)."""
        return ConfigError(self.path if name is None else self.key(name), expected, found)

    def __contains__(self, name: object) -> bool:
        return name in self.data

    def __len__(self) -> int:
        return len(self.data)

    def names(self) -> list[Any]:
        """The keys present, in their order (a list's indices)."""
        return list(self.data)

    # -- unknown keys ---------------------------------------------------------------------

    def only(self, keys: Iterable[str], context: str = "") -> None:
        """Reject any key outside ``keys`` now, before reading: a typo in an optional key is
        then reported as itself, not as a missing required key. ``context`` words the error
        (``of a steering rule``)."""
        self._allowed.update(keys)
        self._reject_unknown(context)

    def finish(self) -> None:
        """Reject the keys nobody read (nor :meth:`only` allowed)."""
        self._reject_unknown("")

    def _reject_unknown(self, context: str) -> None:
        known = self._read | self._allowed
        unknown = sorted(str(k) for k in self.data if str(k) not in known)
        if unknown:
            where = f" {context}:" if context else ""
            raise self.error(unknown[0], f"one of the keys{where} {', '.join(sorted(known))}",
                             f"unknown key {unknown[0]!r}")

    # -- values ---------------------------------------------------------------------------

    def get(self, name: Name, check: Check[T], default: T | _Required = REQUIRED) -> T:
        """``check(key, value)`` of the value at ``name``; ``default`` when it is absent."""
        self._read.add(str(name))
        if name not in self.data:
            if isinstance(default, _Required):
                raise self.error(name, "a value (this key is required)", "nothing")
            return default
        return check(self.key(name), self.data[name])

    @overload
    def string(self, name: Name, default: str | _Required = REQUIRED, *,
               empty: bool = False) -> str: ...
    @overload
    def string(self, name: Name, default: None, *, empty: bool = False) -> str | None: ...
    def string(self, name: Name, default: str | _Required | None = REQUIRED, *,
               empty: bool = False) -> str | None:
        """A string; non-empty unless ``empty``."""
        def check(key: str, value: object) -> str:
            if not isinstance(value, str) or (not value and not empty):
                raise ConfigError(key, "a string" if empty else "a non-empty string", value)
            return value

        return self.get(name, check, default)

    @overload
    def hook(self, name: Name, default: str | _Required = REQUIRED) -> str: ...
    @overload
    def hook(self, name: Name, default: None) -> str | None: ...
    def hook(self, name: Name, default: str | _Required | None = REQUIRED) -> str | None:
        """A hook name (``blocks.12.hook_resid_post``: letters, digits, ``_`` and dots)."""
        def check(key: str, value: object) -> str:
            if not isinstance(value, str) or not _HOOK_NAME.match(value):
                raise ConfigError(key, "a hook name such as blocks.12.hook_resid_post", value)
            return value

        return self.get(name, check, default)

    def boolean(self, name: Name, default: bool | _Required = REQUIRED) -> bool:
        """``true`` or ``false`` (not ``yes``, ``1`` or ``'true'``)."""
        def check(key: str, value: object) -> bool:
            if not isinstance(value, bool):
                raise ConfigError(key, "true or false", value)
            return value

        return self.get(name, check, default)

    def positive_int(self, name: Name, default: int | _Required = REQUIRED) -> int:
        """An integer >= 1."""
        def check(key: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(key, "a positive integer", value)
            return value

        return self.get(name, check, default)

    def number(self, name: Name, default: float | _Required = REQUIRED, *,
               min: float | None = None, above: float | None = None) -> float:
        """A finite number (an integer reads as a float), at least ``min`` / above ``above``."""
        if min is not None:
            expected = f"a number >= {min:g}"
        elif above is not None:
            expected = f"a number > {above:g}"
        else:
            expected = "a finite number"

        def check(key: str, value: object) -> float:
            # bool is an int in Python: `threshold: yes` must not read as 1.0
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or (min is not None and value < min)
                    or (above is not None and value <= above)):
                raise ConfigError(key, expected, value)
            return float(value)

        return self.get(name, check, default)

    def choice(self, name: Name, options: Collection[str], default: str | _Required = REQUIRED,
               *, fold_case: bool = False) -> str:
        """One of ``options`` (``fold_case``: in any case, read as lower case)."""
        def check(key: str, value: object) -> str:
            text = value.lower() if isinstance(value, str) and fold_case else value
            if not isinstance(text, str) or text not in options:
                raise ConfigError(key, f"one of {', '.join(options)}", value)
            return text

        return self.get(name, check, default)

    def int_list(self, name: Name, default: tuple[int, ...] | _Required = REQUIRED, *,
                 expected: str = "a list of integers >= 0") -> tuple[int, ...]:
        """A list of integers >= 0, in the order given; ``expected`` words the error."""
        def check(key: str, value: object) -> tuple[int, ...]:
            return _int_list(key, value, expected)

        return self.get(name, check, default)

    def features(self, name: Name, default: tuple[int, ...] | Literal["all"] | _Required
                 = REQUIRED) -> tuple[int, ...] | Literal["all"]:
        """``all`` or a list of feature ids, in the order given (what a FeatureRequest takes)."""
        def check(key: str, value: object) -> tuple[int, ...] | Literal["all"]:
            if value == "all":
                return "all"
            return _int_list(key, value, "'all' or a list of feature ids (integers >= 0)")

        return self.get(name, check, default)

    def feature_id(self, name: Name, default: int | _Required = REQUIRED, *,
                   digits: bool = False) -> int:
        """A feature id (an integer >= 0); ``digits``: its digits as a string too (values set
        with Helm ``--set-string``)."""
        def check(key: str, value: object) -> int:
            return _feature_id(key, value, digits)

        return self.get(name, check, default)

    def feature_keys(self) -> dict[int, Any]:
        """This mapping's keys read as feature ids (``{123: 0.7}``): feature id -> key. A key
        may be the id's digits (a map key set by Helm ``--set`` is a string), but each id
        once."""
        ids: dict[int, Any] = {}
        for name in self.names():
            feature = _feature_id(self.key(name), name, True)
            if feature in ids:  # 123 and "123" both given
                raise self.error(name, "each feature id once", name)
            ids[feature] = name
        return ids

    # -- nested settings ------------------------------------------------------------------

    def section(self, name: Name, *, what: str = "a mapping") -> Settings:
        """The mapping at ``name`` (absent or null: empty), read with its own Settings."""
        self._read.add(str(name))
        return Settings(self.data.get(name), self.key(name), what=what)

    def sections(self, what: str) -> Iterator[tuple[str, Settings]]:
        """The ``name -> mapping`` entries of this mapping (``what`` names one: ``detector``).
        Named maps rather than lists, so that Helm ``--set`` can change one entry."""
        for name in self.names():
            if not isinstance(name, str) or not name:
                raise self.error(name, f"a {what} name", name)
            yield name, self.section(name, what=f"a mapping of {what} settings")

    def sequence(self, name: Name, expected: str, *, non_empty: bool = False) -> Settings:
        """The list at ``name`` (absent or null: empty), its items read by index
        (``edits[2]``); ``expected`` words the error when it is not a list (or is empty)."""
        self._read.add(str(name))
        value = self.data.get(name)
        items = [] if value is None else value
        if not isinstance(items, list) or (non_empty and not items):
            raise self.error(name, expected, "nothing" if value is None else value)
        reader = Settings(dict(enumerate(items)), self.key(name))
        reader._index = True
        return reader


def _int_list(key: str, value: object, expected: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(key, expected, value)
    return tuple(value)


def _feature_id(key: str, value: object, digits: bool) -> int:
    if digits and isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, _FEATURE_ID, value)
    return value
