"""Architectures by name, the way SAELens's ``registry.py`` keeps them.

Each architecture module registers its class at import; registering a name twice is a bug
and fails loudly instead of silently replacing an implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.sae.architectures.base import Architecture

_ARCHITECTURES: dict[str, type[Architecture[Any]]] = {}
_REFUSED: dict[str, str] = {}


def register_architecture(cls: type[Architecture[Any]]) -> type[Architecture[Any]]:
    """Register an architecture class under its ``name``; usable as a class decorator."""
    _check_free(cls.name)
    _ARCHITECTURES[cls.name] = cls
    return cls


def refuse_architecture(name: str, reason: str) -> None:
    """Record that SAEs of architecture ``name`` are refused, and why (said in the error)."""
    _check_free(name)
    _REFUSED[name] = reason


def refusal(name: str) -> str | None:
    """Why architecture ``name`` is refused, or None when it is not."""
    return _REFUSED.get(name)


def _check_free(name: str) -> None:
    if name in _ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} is already registered by {_ARCHITECTURES[name].__qualname__}"
        )
    if name in _REFUSED:
        raise ValueError(f"architecture {name!r} is already registered as refused")


def get_architecture(name: str) -> type[Architecture[Any]] | None:
    """The class registered under ``name``, or None."""
    return _ARCHITECTURES.get(name)


def known_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)
