"""The registered methods by name: the table that :mod:`fairdeploy.methods` fills and
:mod:`fairdeploy.plan` reads.

It sits below both, so a plan finds its method without importing the methods package
(whose modules import plans). :func:`fairdeploy.methods.register_method` checks a method
class and adds it here; importing :mod:`fairdeploy.methods` registers every built-in
method; a method named by import string (``package.module:Class``) is added when a recipe
names it, or by :func:`fairdeploy.methods.get_method`. This module imports nothing of
fairdeploy but the error type, and never imports a method: a name that is not in the
table is refused with the names that are.
"""

from __future__ import annotations

from typing import Any, Protocol

from fairdeploy.errors import FairDeployError

__all__ = ["METHODS", "RegisteredMethod", "find_method", "method_names"]


class RegisteredMethod(Protocol):
    """What a plan reads from its method (a :class:`fairdeploy.methods.Method`)."""

    name: str
    order: int
    factorizes: bool
    plan_class: type[Any]

    def describe(self, plan: Any) -> str:
        """The table label of ``plan``: the method's label and its settings."""
        ...


#: Registered method instances by name (import-string methods under their string).
#: Written only by :mod:`fairdeploy.methods`, which checks each entry first.
METHODS: dict[str, RegisteredMethod] = {}


def method_names() -> list[str]:
    """The registered names, in table order (``order``, then name); import strings left out."""
    named = [(m.order, name) for name, m in METHODS.items() if ":" not in name]
    return [name for _, name in sorted(named)]


def find_method(name: str) -> RegisteredMethod:
    """The registered method ``name``.

    Raises
    ------
    FairDeployError
        ``name`` is not registered: the message lists the names that are, and says how
        the built-in methods and import-string methods get registered.
    """
    method = METHODS.get(name)
    if method is not None:
        return method
    if ":" in name:
        raise FairDeployError(
            f"method {name!r} is not registered: a method named by import string is imported "
            "when a recipe names it; in Python, call "
            f"fairdeploy.methods.get_method({name!r}) first"
        )
    names = method_names()
    if not names:
        raise FairDeployError(
            f"method {name!r} is unknown: no method is registered yet (import "
            "fairdeploy.methods first, or use `from fairdeploy import Plan`: either "
            "registers the built-in methods)"
        )
    raise FairDeployError(
        f"method {name!r} is unknown: use one of {', '.join(names)} or package.module:Class"
    )
