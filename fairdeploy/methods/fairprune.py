"""``fairprune``: FairPrune (Wu et al. 2022): unstructured pruning of the weights with the
lowest saliency ``½θ²(h0 − βh1)`` (per-group Hessian diagonals), ``prune_ratio`` of each
chosen layer (``scope: layer``) or of all chosen weights together (``global``); no
fine-tuning. Pruned weights are stored dense: theoretical C.R. 1.000 (the paper's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from torch import nn

from fairdeploy._schema import PosFraction
from fairdeploy.errors import FairDeployError
from fairdeploy.methods._base import Processed
from fairdeploy.methods._registry import register_method
from fairdeploy.methods._weights import WeightMethod, WeightPlan
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.experiment import Context

__all__ = ["FairPrune", "FairPrunePlan"]


class FairPrunePlan(WeightPlan):
    """The pruned fraction, its scope, the chosen layers, β and the scoring sets."""

    prune_ratio: PosFraction
    scope: Literal["layer", "global"] = "layer"


@register_method
class FairPrune(WeightMethod):
    """FairPrune: prune the weights whose removal costs the unprivileged group least."""

    name: ClassVar[str] = "fairprune"
    label: ClassVar[str] = "FairPrune"
    plan_class: ClassVar[type[Plan]] = FairPrunePlan
    order: ClassVar[int] = 40
    unavailable: ClassVar[str | None] = "FairPrune is not available in fairdeploy yet"

    def example(self, model: nn.Module) -> Plan:
        return self.plan_class(method=self.name, prune_ratio=0.3)

    def describe_ratio(self, plan: Plan) -> str:
        return f"prune {plan.prune_ratio:.0%} per {plan.scope}"  # type: ignore[attr-defined]

    def apply(self, plan: Plan, ctx: Context) -> Processed:
        raise FairDeployError(f"{self.unavailable}: remove it from the recipe")
