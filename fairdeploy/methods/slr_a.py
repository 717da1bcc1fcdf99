"""``slr_a``: sparse SVD selecting rows/columns by absolute activation (SLR, Yang et al.).

Input node i scores Σ |input activation_i| and output node j Σ |output activation_j|
(after the activation that follows the layer), summed over the scoring samples drawn
from the training split (``scoring``: samples per group, seed). Compare entries derived
from another main method use the paper's sr = rr = 0.5.

Every layer of a multi-layer plan is scored on the VANILLA model's activations, not on
the head as processed so far (as FairLRF does): SLR gathers its activation statistics
from the trained network once, as SLR-w scores the original weights, so a layer's
selection does not depend on the layers listed before it. An activation module called
after several layers (one ``self.act`` reused) counts only its call on the layer's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from fairdeploy.lrf import SelectionInputs, activation_abs_sums, following_activation
from fairdeploy.methods._lrf import SLRMethod, SparsePlan
from fairdeploy.methods._registry import register_method
from fairdeploy.plan import SamplingSpec

if TYPE_CHECKING:
    from fairdeploy.context import Context, ScoringSet

__all__ = ["SLRActivation", "SLRActivationPlan"]


class SLRActivationPlan(SparsePlan):
    """Target layers with rank, sr and rr; the samples activations are summed over."""

    scoring: SamplingSpec = Field(default_factory=SamplingSpec)


@register_method
class SLRActivation(SLRMethod[SLRActivationPlan]):
    """SLR-a: sparsify the rows/columns of least absolute activation."""

    name: ClassVar[str] = "slr_a"
    label: ClassVar[str] = "SLR-a"
    order: ClassVar[int] = 30

    def vanilla_inputs(
        self, plan: SLRActivationPlan, ctx: Context, layer: str
    ) -> SelectionInputs:
        activation = following_activation(ctx.model, layer)

        # The vanilla head keeps the model's qualified names but not its containers, so
        # the activation after the layer is found in the full model.
        def sums(data: ScoringSet) -> dict[str, torch.Tensor]:
            inputs, outputs = activation_abs_sums(
                ctx.head, layer, data.features.features.split(1024), activation=activation
            )
            return {"input": inputs, "output": outputs}

        got = ctx.activations(
            plan.scoring,
            sums,
            of={"abs_sums": layer, "activation": activation, "module": "vanilla head"},
        )
        return SelectionInputs(input_abs_sum=got["input"], output_abs_sum=got["output"])
