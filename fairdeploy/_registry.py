"""The decorator registry that architectures and selection strategies share (timm's
``register_model`` pattern): a name bound once to a function in a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["register_in"]

F = TypeVar("F", bound=Callable[..., object])


def register_in(table: dict[str, F], name: str, what: str) -> Callable[[F], F]:
    """A decorator that stores its function in ``table`` under ``name``; a second
    registration of one name is a ValueError naming ``what`` was registered (a bug in
    the code that registers, not a user mistake)."""

    def deco(fn: F) -> F:
        if name in table:
            raise ValueError(f"{what} {name!r} registered twice")
        table[name] = fn
        return fn

    return deco
