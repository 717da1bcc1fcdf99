"""``slr_w``: sparse SVD selecting rows/columns by absolute weight (SLR, Yang et al.).

Input node i scores Σ_j |W_ij| of the ORIGINAL dense weight, output node j scores
Σ_i |W_ij|; the ⌊sr·D⌋ lowest are sparsified. Compare entries derived from another main
method use the paper's sr = rr = 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from fairdeploy.lrf import SelectionInputs
from fairdeploy.methods._lrf import SparseLowRankMethod, SparsePlan
from fairdeploy.methods._registry import register_method
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.experiment import Context

__all__ = ["SLRWeight", "SLRWeightPlan"]


class SLRWeightPlan(SparsePlan):
    """Target layers with rank, sr and rr."""



@register_method
class SLRWeight(SparseLowRankMethod[SLRWeightPlan]):
    """SLR-w: sparsify the rows/columns of least absolute weight."""

    name: ClassVar[str] = "slr_w"
    label: ClassVar[str] = "SLR-w"
    plan_class: ClassVar[type[Plan]] = SLRWeightPlan
    strategy: ClassVar[str] = "slr_w"
    paper_sr_rr: ClassVar[tuple[float, float] | None] = (0.5, 0.5)
    default_compare: ClassVar[bool] = True
    order: ClassVar[int] = 20

    def selection_inputs(
        self,
        plan: SLRWeightPlan,
        ctx: Context,
        head: nn.Module,
        index: int,
        selections: Mapping[str, Mapping[str, list[int]]],
    ) -> SelectionInputs:
        layer = plan.layers[index].layer
        return SelectionInputs(weight=ctx.head.get_submodule(layer).weight.detach())
