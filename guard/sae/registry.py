"""Architectures by name, the way SAELens's ``registry.py`` keeps them.

Each architecture module registers its class at import; registering a name twice is a bug
and fails loudly instead of silently replacing an implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.sae.architectures.base import Architecture

_ARCHITECTURES: dict[str, type[Architecture[Any]]] = {}


def register_architecture(cls: type[Architecture[Any]]) -> type[Architecture[Any]]:
    """Register an architecture class under its ``name``; usable as a class decorator."""
    if cls.name in _ARCHITECTURES:
        raise ValueError(
            f"architecture {cls.name!r} is already registered by "
            f"{_ARCHITECTURES[cls.name].__qualname__}"
        )
    _ARCHITECTURES[cls.name] = cls
    return cls


def get_architecture(name: str) -> type[Architecture[Any]] | None:
    """The class registered under ``name``, or None."""
    return _ARCHITECTURES.get(name)


def known_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)
