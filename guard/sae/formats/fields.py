"""Reading JSON config files of SAE formats with errors that name the file and the field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from guard.errors import SaeFileError
from guard.sae.safetensors import SafetensorsFile


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SaeFileError(path, "file not found") from e
    except OSError as e:
        raise SaeFileError(path, f"cannot read file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise SaeFileError(path, f"not valid JSON: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SaeFileError(path, f"not valid JSON: {e}") from e
    except RecursionError as e:  # nesting deeper than Python's recursion limit
        raise SaeFileError(path, "not valid JSON: nested too deeply") from e
    if not isinstance(value, dict):
        raise SaeFileError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def positive_int(path: Path, cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """``cfg[key]`` as a positive int; missing uses ``default`` or is an error."""
    if key not in cfg or cfg[key] is None:
        if default is not None:
            return default
        raise SaeFileError(path, f"missing field {key!r}: expected a positive integer")
    value = cfg[key]
    # bool is an int subclass: refuse it so "d_in": true is not read as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SaeFileError(path, f"field {key!r}: expected a positive integer, found {value!r}")
    return value


def boolean(path: Path, cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    """``cfg[key]`` as a bool; missing or null uses ``default``."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SaeFileError(path, f"field {key!r}: expected true or false, found {value!r}")
    return value


def check_tensor_names(
    file: SafetensorsFile, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> None:
    """Every required tensor present and nothing unexpected, as the reference libraries'
    strict ``load_state_dict`` demands: an unknown tensor may carry semantics we would
    silently drop."""
    present = set(file.names())
    missing = sorted(required - present)
    if missing:
        raise SaeFileError(
            file.path,
            f"missing tensor {missing[0]!r}"
            + (f" (and {missing[1:]})" if missing[1:] else "")
            + f"; expected {sorted(required)}, found {sorted(present)}",
        )
    unexpected = sorted(present - required - optional)
    if unexpected:
        raise SaeFileError(
            file.path,
            f"unexpected tensor(s) {unexpected}: expected only {sorted(required | optional)}",
        )
