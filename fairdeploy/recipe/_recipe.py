"""The recipe: its sections, and the defaults that depend on more than one section."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    SerializeAsAny,
    model_validator,
)

from fairdeploy._schema import Strict, schema_error
from fairdeploy.data_specs import (
    CELEBA_ATTRIBUTES,
    CelebAAttributesData,
    CelebAData,
    DataSpec,
    SensitiveSpec,
)
from fairdeploy.plan import Plan
from fairdeploy.recipe._method import compare_entry, default_compare, main_plan
from fairdeploy.recipe._sections import (
    ExportSpec,
    ModelSpec,
    ReportSpec,
    SweepSpec,
    TrainSpec,
)

__all__ = ["Recipe"]


class Recipe(Strict):
    """A fully resolved fairdeploy recipe. Build it with :func:`load_recipe`."""

    version: Literal[1] = 1
    name: str | None = None
    model: ModelSpec
    data: DataSpec
    sensitive: SensitiveSpec = Field(default_factory=SensitiveSpec)
    method: SerializeAsAny[Annotated[Plan, BeforeValidator(main_plan)]]
    compare: list[SerializeAsAny[Annotated[Plan, BeforeValidator(compare_entry)]]] | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    sweep: SweepSpec | None = None

    _source: Path | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal recipes, wherever they were read from.
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  (mutable model)

    @property
    def source(self) -> Path | None:
        """The YAML file the recipe was read from (None when built from a mapping)."""
        return self._source

    @model_validator(mode="after")
    def _resolve(self) -> Recipe:
        self._resolve_sensitive()
        self._resolve_celeba()
        self._resolve_compare()
        return self

    def _resolve_sensitive(self) -> None:
        kind, sens = self.data.kind, self.sensitive
        if sens.attribute is None:
            sens.attribute = {
                "celeba": "Male",
                "celeba_attributes": "Male",
                "fitzpatrick17k": "fitzpatrick_scale",
            }.get(kind, "group")
        if sens.groups is None:
            if kind in ("celeba", "celeba_attributes"):
                a = sens.attribute
                sens.groups = {f"not_{a}": [-1], a: [1]}
            elif kind == "fitzpatrick17k":
                sens.groups = {"light": [1, 2, 3], "dark": [4, 5, 6]}
            else:
                raise schema_error(
                    "fd_groups_required",
                    "sensitive.groups: required for data.kind {kind} (map two group names to "
                    "the values of {attr!r}, e.g. {{a: [0], b: [1]}})",
                    {"kind": kind, "attr": sens.attribute},
                )
        if sens.privileged != "auto" and sens.privileged not in sens.groups:
            raise schema_error(
                "fd_privileged",
                "sensitive.privileged: {value!r} is not allowed (use auto or one of {names})",
                {"value": sens.privileged, "names": ", ".join(sens.groups)},
            )

    def _resolve_celeba(self) -> None:
        data = self.data
        if not isinstance(data, CelebAData | CelebAAttributesData):
            return
        attr = self.sensitive.attribute
        for key, value in (("data.target", data.target), ("sensitive.attribute", attr)):
            if value not in CELEBA_ATTRIBUTES:
                close = difflib.get_close_matches(str(value), CELEBA_ATTRIBUTES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise schema_error(
                    "fd_attribute",
                    "{key}: {value!r} is not a CelebA attribute ({hint}use one of the 40 names "
                    "of list_attr_celeba.txt, e.g. Smiling, Male, Young)",
                    {"key": key, "value": value, "hint": hint},
                )
        if data.target == attr:
            raise schema_error(
                "fd_target_is_sensitive",
                "sensitive.attribute: {value!r} is not allowed (it is also data.target: use two "
                "different attributes)",
                {"value": attr},
            )
        if self.model.num_classes != 2:
            raise schema_error(
                "fd_celeba_classes",
                "model.num_classes: {n} is not allowed for data.kind {kind} (use 2: the target "
                "is a binary attribute)",
                {"n": self.model.num_classes, "kind": data.kind},
            )
        if isinstance(data, CelebAAttributesData):
            if data.features is None:
                data.features = [a for a in CELEBA_ATTRIBUTES if a not in (data.target, attr)]
            bad = [f for f in data.features if f not in CELEBA_ATTRIBUTES]
            leak = [f for f in data.features if f in (data.target, attr)]
            if bad or leak or not data.features:
                what = (
                    f"{bad[0]!r} is not a CelebA attribute" if bad
                    else f"{leak[0]!r} is the target or the sensitive attribute" if leak
                    else "the list is empty"
                )
                raise schema_error(
                    "fd_features",
                    "data.features: {what} (use CelebA attribute names other than data.target "
                    "and sensitive.attribute)",
                    {"what": what},
                )
            if self.model.arch == "mlp":
                self.model.kwargs.setdefault("in_features", len(data.features))

    def _resolve_compare(self) -> None:
        if self.compare is None:
            self.compare = default_compare(self.method)

    def to_plan(self) -> Plan:
        """The :class:`~fairdeploy.plan.Plan` of ``method`` (the recipe holds it as is)."""
        return self.method

    @property
    def plans(self) -> list[Plan]:
        """The ``compare`` plans (each complete on its own)."""
        return list(self.compare or [self.method])
