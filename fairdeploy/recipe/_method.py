"""``method:`` and ``compare:`` — plans of registered methods, read from the recipe.

The ``method:`` section names a registered method (``name: fairlrf``, or
``name: package.module:Class``); its other keys are that method's plan fields, so a key
the method does not read is refused. Each ``compare:`` entry is a complete plan of its
own: a bare name (``- slr_w``) or a mapping; what an entry leaves out is completed from
the main method by the entry's method (:meth:`fairdeploy.methods.Method.derive`: same
settings where the main method has them, derived target layers, the paper's sr/rr for
the SLR methods). Without a ``compare:`` list, ``compare`` runs every method marked
``default_compare`` that can derive its settings, and the main method.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationInfo
from pydantic_core import PydanticCustomError

from fairdeploy.errors import FairDeployError
from fairdeploy.methods import get_method, list_methods
from fairdeploy.plan import Plan, nested_validation

__all__ = ["compare_entry", "default_compare", "main_plan"]


def _raw(value: Any) -> dict[str, Any]:
    if isinstance(value, Plan):
        return value.model_dump(by_alias=True, exclude_unset=True) | {"name": value.method}
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "fd_method_type", "use a method name or a mapping with name: and its settings"
        )
    if "name" not in value:
        raise PydanticCustomError(
            "fd_method_name",
            f"name: required key is missing (use one of {', '.join(list_methods())} or "
            "package.module:Class)",
        )
    return dict(value)


def _method(name: Any) -> Any:
    if ":" not in str(name) and str(name) not in list_methods():
        raise PydanticCustomError(
            "fd_method",
            f"name: {name!r} is not allowed (use one of {', '.join(list_methods())} or "
            "package.module:Class)",
        )
    try:
        return get_method(str(name))
    except FairDeployError as exc:
        raise PydanticCustomError("fd_method", f"name: {exc}") from None


def main_plan(value: Any) -> Plan:
    """Validate the recipe's ``method:`` section into its method's plan."""
    if isinstance(value, Plan):
        return value
    raw = _raw(value)
    with nested_validation():
        return _method(raw["name"]).plan_class.model_validate(raw)


def compare_entry(value: Any, info: ValidationInfo) -> Plan:
    """Validate one ``compare:`` entry, completed from the main method (if it validated)."""
    raw = _raw(value)
    impl = _method(raw["name"])
    main = info.data.get("method")
    if isinstance(main, Plan):
        given = {k: v for k, v in raw.items() if k != "name"}
        try:
            raw = {"name": impl.name, **impl.derive(main, given)}
        except FairDeployError as exc:
            raise PydanticCustomError("fd_compare_derive", str(exc)) from None
        raw.pop("method", None)
    if isinstance(value, Plan) and isinstance(main, Plan) and value == main:
        return value
    with nested_validation():
        return impl.plan_class.model_validate(raw)


def default_compare(main: Plan) -> list[Plan]:
    """The ``compare`` list of a recipe without one: every ``default_compare`` method
    that can derive its settings from ``main``, then ``main`` if not among them."""
    plans: list[Plan] = []
    for name in list_methods():
        impl = get_method(name)
        if not impl.default_compare:
            continue
        if name == main.method:
            plans.append(main)
            continue
        try:
            raw = impl.derive(main, {})
        except FairDeployError:
            continue  # e.g. a low-rank method when the main method names no layers
        with nested_validation():
            plans.append(impl.plan_class.model_validate(raw))
    if main not in plans:
        plans.append(main)
    return plans
