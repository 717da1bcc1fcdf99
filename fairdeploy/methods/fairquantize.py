"""``fairquantize``: FairQuantize (Guo et al. 2024): the ``quantize_ratio`` fraction of the
chosen weights with the lowest score ``½Δθ²(h0 − βh1)`` (Δθ the rounding change of
symmetric per-output-channel int8) is quantized, in ``steps``, optionally fine-tuning the
float weights between steps. C.R.: a quantized weight costs 8 bits of 32, so with q of
all weights quantized C.R. = 32 / (32 − 24q) (the paper's); biases and unchosen layers
count as float."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from fairdeploy._schema import NonNegInt, PosFraction, PosInt
from fairdeploy.errors import FairDeployError
from fairdeploy.methods._base import Processed, count_parameters
from fairdeploy.methods._registry import register_method
from fairdeploy.methods._weights import WeightMethod, WeightPlan
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.experiment import Context

__all__ = ["FairQuantize", "FairQuantizePlan"]


class FairQuantizePlan(WeightPlan):
    """The quantized fraction, steps, fine-tuning epochs, chosen layers, β, scoring."""

    quantize_ratio: PosFraction
    steps: PosInt = 1
    finetune_epochs: NonNegInt = 0


@register_method
class FairQuantize(WeightMethod):
    """FairQuantize: quantize to int8 the weights whose rounding costs least."""

    name: ClassVar[str] = "fairquantize"
    label: ClassVar[str] = "FairQuantize"
    plan_class: ClassVar[type[Plan]] = FairQuantizePlan
    order: ClassVar[int] = 50
    unavailable: ClassVar[str | None] = "FairQuantize is not available in fairdeploy yet"

    def example(self, model: nn.Module) -> Plan:
        return self.plan_class(method=self.name, quantize_ratio=0.3)

    def describe_ratio(self, plan: Plan) -> str:
        return f"int8 {plan.quantize_ratio:.0%}"  # type: ignore[attr-defined]

    def theoretical_cr(self, plan: Plan, model: nn.Module) -> float:
        # Bits: every parameter 32, minus 24 per quantized weight.
        total = 32 * count_parameters(model)
        quantized = plan.quantize_ratio * self.chosen_weights(plan, model)  # type: ignore[attr-defined]
        return total / (total - 24 * quantized)

    def apply(self, plan: Plan, ctx: Context) -> Processed:
        raise FairDeployError(f"{self.unavailable}: remove it from the recipe")
