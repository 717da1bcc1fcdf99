"""Value types and the strict base model of every recipe section and method plan.

Shared by the recipe schema (:mod:`fairdeploy.recipe`) and the method plans
(:mod:`fairdeploy.methods`): a value that is not allowed becomes one line naming the key
path, the value and what is allowed (the recipe loader adds file and line).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fairdeploy.grammar import NumberError, parse_number

__all__ = [
    "Fraction01",
    "GroupValue",
    "LocalPath",
    "NonNegFloat",
    "NonNegInt",
    "PosFraction",
    "PosInt",
    "Seed",
    "Strict",
    "no_bool",
    "parse_fraction",
    "schema_error",
]


# --------------------------------------------------------------------------- value types


def no_bool(value: Any) -> Any:
    # pydantic's lax mode turns YAML `true` into 1; a boolean where a number belongs is a typo.
    if isinstance(value, bool):
        raise ValueError("use a number, not true/false")
    return value


def parse_fraction(value: Any) -> Any:
    """A number written as text (``5/9``, ``1e-3``, ``50%``) read by the one number
    grammar (:func:`fairdeploy.grammar.parse_number`); other values pass through."""
    value = no_bool(value)
    if isinstance(value, str):
        try:
            return parse_number(value, what="number")
        except NumberError as exc:
            problem = "" if exc.problem == "is not a number" else f"it {exc.problem}: "
            raise ValueError(f"{problem}use a number or a fraction such as 5/9") from None
    return value


def _bound(ok: Callable[[Any], bool], hint: str, range_text: str = "") -> Callable[[Any], Any]:
    """An after-validator that passes a value through when ``ok(value)``, else says ``hint``.
    ``range_text`` (e.g. ``" ≥ 1"``) is the range in words, kept on the validator as
    ``range_text`` so the recipe reference (``docs/recipe.md``) shows what is enforced."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(hint)
        return value

    check.range_text = range_text  # type: ignore[attr-defined]
    return check


_finite = _bound(math.isfinite, "use a finite number")
_unit_interval = _bound(lambda v: 0.0 <= v <= 1.0, "use a number in [0, 1]", " in [0, 1]")
_positive_fraction = _bound(
    lambda v: 0.0 < v <= 1.0, "use a fraction in (0, 1], e.g. 0.35", " in (0, 1]"
)
_non_negative = _bound(lambda v: not v < 0, "use a number ≥ 0", " ≥ 0")
_positive_int = _bound(lambda v: not v < 1, "use an integer ≥ 1", " ≥ 1")
_non_negative_int = _bound(lambda v: not v < 0, "use an integer ≥ 0", " ≥ 0")


def _expand_path(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ValueError("use a path string")
    path = Path(os.path.expandvars(os.path.expanduser(os.fspath(value))))
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


Fraction01 = Annotated[
    float, BeforeValidator(parse_fraction), AfterValidator(_finite), AfterValidator(_unit_interval)
]
#: A fraction in (0, 1]: a ratio that must do something (prune or quantize some weights).
PosFraction = Annotated[
    float,
    BeforeValidator(parse_fraction),
    AfterValidator(_finite),
    AfterValidator(_positive_fraction),
]
NonNegFloat = Annotated[
    float, BeforeValidator(parse_fraction), AfterValidator(_finite), AfterValidator(_non_negative)
]
PosInt = Annotated[int, BeforeValidator(no_bool), AfterValidator(_positive_int)]
NonNegInt = Annotated[int, BeforeValidator(no_bool), AfterValidator(_non_negative_int)]
Seed = Annotated[int, BeforeValidator(no_bool), AfterValidator(_non_negative_int)]
LocalPath = Annotated[Path, BeforeValidator(_expand_path)]
GroupValue = Annotated[int | float | str, BeforeValidator(no_bool)]


def schema_error(kind: str, template: str, ctx: dict[str, Any]) -> PydanticCustomError:
    # pydantic's own templates know no !r or {{ }}: format here, hand over plain text.
    return PydanticCustomError(kind, template.format(**ctx))


class Strict(BaseModel):
    """Base: unknown keys are an error naming the allowed keys (and the closest one)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # A field with an alias is written by its alias (``name:`` for a plan's method).
            allowed = [f.alias or name for name, f in cls.model_fields.items()]
            accepted = {*allowed, *cls.model_fields}
            for key in data:
                if key not in accepted:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key", {"key": str(key), "allowed": allowed}
                    )
        return data

    def changed_fields(self, names: Iterable[str] | None = None) -> list[str]:
        """The fields (of ``names``; default: all) whose value is not their default, in
        field order: what a user set, for refusing a setting the configuration never reads
        (a resolved recipe spells out every default, and those stay accepted)."""
        fields = type(self).model_fields
        wanted = fields if names is None else set(names)
        return [
            k for k, f in fields.items()
            if k in wanted and getattr(self, k) != f.get_default(call_default_factory=True)
        ]
