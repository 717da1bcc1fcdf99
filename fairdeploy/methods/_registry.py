"""The method registry: built-in methods, registered ones and ``package.module:Class``.

Built-in methods are the public modules of this package; each registers itself with
:func:`register_method` when imported, and importing the package imports them all, so
adding a method is adding one module. A recipe may also name a method by import
string (``mypkg.methods:MyMethod``): the class is imported and registered under that
string, as architectures are. The table itself is :data:`fairdeploy._method_table.METHODS`,
below :mod:`fairdeploy.plan`, which reads it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar, cast

from fairdeploy._method_table import METHODS, method_names
from fairdeploy._trust import check_import_allowed
from fairdeploy.errors import FairDeployError
from fairdeploy.methods._base import Method
from fairdeploy.plan import Plan

__all__ = ["get_method", "list_methods", "register_method"]

# The one table of registered methods; it lives below fairdeploy.plan, which reads it.
_METHODS = cast("dict[str, Method]", METHODS)
_BUILTINS_LOADED = False
M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register a :class:`Method` subclass under its ``name``.

    Raises
    ------
    FairDeployError
        The name is taken by another class, or the class lacks ``name``, ``label`` or
        a ``plan_class`` deriving from :class:`~fairdeploy.plan.Plan`.
    """
    _check_class(cls, where=cls.__qualname__)
    existing = _METHODS.get(cls.name)
    if existing is not None and type(existing) is not cls:
        raise FairDeployError(
            f"method {cls.name!r} is already registered by {type(existing).__qualname__}: "
            "choose another name"
        )
    _METHODS[cls.name] = cls()
    return cls


def _check_class(cls: Any, *, where: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise FairDeployError(f"{where} is not a fairdeploy.methods.Method subclass")
    for attr in ("name", "label", "plan_class"):
        if not hasattr(cls, attr):
            raise FairDeployError(f"method class {where} has no {attr!r} attribute: set it")
    if not (isinstance(cls.plan_class, type) and issubclass(cls.plan_class, Plan)):
        raise FairDeployError(
            f"method class {where}: plan_class must be a subclass of fairdeploy.plan.Plan"
        )


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module("fairdeploy.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"fairdeploy.methods.{info.name}")


def _import_method(spec: str) -> Method:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise FairDeployError(f"method {spec!r}: use package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FairDeployError(
            f"method {spec!r}: cannot import {module_name!r} ({exc}); the module must be "
            "importable (an installed package, or its folder on PYTHONPATH)"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise FairDeployError(f"method {spec!r}: {module_name!r} has no attribute {attr!r}")
    _check_class(cls, where=spec)
    # Registered under the import string: that is what the plan and the metadata record.
    method = cls()
    method.name = spec  # type: ignore[misc]
    _METHODS[spec] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name`` (or imported from ``package.module:Class``)."""
    _load_builtins()
    if ":" in name:  # an import string: only when recipes are trusted, before importing
        check_import_allowed(name, "method")
    if name in _METHODS:
        return _METHODS[name]
    if ":" in name:
        return _import_method(name)
    raise FairDeployError(
        f"method {name!r} is unknown: use one of {', '.join(list_methods())} "
        "or package.module:Class"
    )


def list_methods() -> list[str]:
    """Names of the registered methods, in table order (``Method.order``, then name)."""
    _load_builtins()
    return method_names()
