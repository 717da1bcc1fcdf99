"""``slr_w``: sparse SVD selecting rows/columns by absolute weight (SLR, Yang et al.).

Input node i scores Σ_j |W_ij| of the ORIGINAL dense weight, output node j scores
Σ_i |W_ij|; the ⌊sr·D⌋ lowest are sparsified. Compare entries derived from another main
method use the paper's sr = rr = 0.5.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from fairdeploy.lrf import SelectionInputs
from fairdeploy.methods._lrf import SLRMethod, SparsePlan
from fairdeploy.methods._registry import register_method

if TYPE_CHECKING:
    from fairdeploy.context import Context

__all__ = ["SLRWeight", "SLRWeightPlan"]


class SLRWeightPlan(SparsePlan):
    """Target layers with rank, sr and rr."""


@register_method
class SLRWeight(SLRMethod[SLRWeightPlan]):
    """SLR-w: sparsify the rows/columns of least absolute weight."""

    name: ClassVar[str] = "slr_w"
    label: ClassVar[str] = "SLR-w"
    order: ClassVar[int] = 20

    def vanilla_inputs(
        self, plan: SLRWeightPlan, ctx: Context, layer: str
    ) -> SelectionInputs:
        return SelectionInputs(weight=ctx.head.get_submodule(layer).weight.detach())
