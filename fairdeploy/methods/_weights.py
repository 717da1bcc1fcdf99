"""What the weight-level methods (FairPrune, FairQuantize) share: chosen layers, β, scoring."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from fairdeploy._schema import NonNegFloat
from fairdeploy.errors import FairDeployError
from fairdeploy.methods._base import Method
from fairdeploy.plan import Plan, ScoringSpec

__all__ = ["WeightMethod", "WeightPlan", "weight_layers"]


class WeightPlan(Plan):
    """Chosen layers (names, or ``all``: every Linear and Conv2d weight), β, scoring."""

    layers: Literal["all"] | tuple[str, ...] = "all"
    beta: NonNegFloat = 5 / 9
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)

    @field_validator("layers", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one layer name, or all")
            return tuple(value)
        return value


def weight_layers(plan: Plan, model: nn.Module) -> list[str]:
    """The chosen Linear/Conv2d modules of ``plan`` in ``model``, in definition order."""
    kinds = (nn.Linear, nn.Conv2d)
    found = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    layers = plan.layers  # type: ignore[attr-defined]
    if layers == "all":
        return found
    for name in layers:
        if name not in found:
            raise FairDeployError(
                f"method.layers: {name!r} is not a Linear or Conv2d layer of the model; "
                f"they are: {', '.join(found) or '(none)'}"
            )
    return [n for n in found if n in layers]


class WeightMethod(Method):
    """Base of the methods that change individual weights of chosen layers."""

    def target_layers(self, plan: Plan) -> tuple[str, ...]:
        layers = plan.layers  # type: ignore[attr-defined]
        return ("",) if layers == "all" else tuple(layers)

    def resolve_layers(self, plan: Plan, model: nn.Module) -> tuple[str, ...]:
        return tuple(weight_layers(plan, model))

    def check(self, plan: Plan, model: nn.Module) -> None:
        weight_layers(plan, model)

    def chosen_weights(self, plan: Plan, model: nn.Module) -> int:
        """Number of weight entries (biases excluded) in the chosen layers."""
        return sum(model.get_submodule(n).weight.numel() for n in weight_layers(plan, model))

    def describe(self, plan: Plan) -> str:
        layers = plan.layers  # type: ignore[attr-defined]
        where = "all layers" if layers == "all" else ", ".join(layers)
        return f"{self.label} ({self.describe_ratio(plan)}, β={plan.beta:.3g}, {where})"  # type: ignore[attr-defined]

    def describe_ratio(self, plan: Plan) -> str:
        raise NotImplementedError
