"""``fairlrf``: fairness-oriented low-rank factorization (the paper's method).

After the truncated SVD of each target layer, every entry θ of U and V scores
``½θ²(h0 − βh1)``, h_c the diagonal of the Hessian of the mean cross-entropy on group
c's scoring set (group 0 unprivileged, 1 privileged); the ⌊sr·Din⌋ rows of U and
⌊sr·Dout⌋ columns of V whose removal costs least (summed over the entries it zeroes, or
over the whole row with ``row_score: full``) are sparsified, keeping their first ⌊rr·k⌋
entries. Layers are processed in plan order, each scored on the head as processed so
far. No retraining.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from fairdeploy._schema import NonNegFloat, parse_fraction
from fairdeploy.lrf import SelectionInputs
from fairdeploy.methods._base import estimator_inputs
from fairdeploy.methods._lrf import SparseLowRankMethod, SparsePlan
from fairdeploy.methods._registry import register_method
from fairdeploy.plan import LayerPlan, ScoringSpec
from fairdeploy.scoring import group_hessians

if TYPE_CHECKING:
    from fairdeploy.context import Context, ScoringSet

__all__ = ["FairLRF", "FairLRFPlan", "FairLRFScoring"]

#: The paper's default trade-off (Tables 1 and 2 use 5/9).
DEFAULT_BETA = 5 / 9


class FairLRFScoring(ScoringSpec):
    """FairLRF's scoring: the Hessian estimator and scoring sets, and how entry scores
    add up to a row's score (``removed``: the entries the sparsification zeroes, the
    Taylor estimate of exactly that removal; ``full``: the whole row)."""

    row_score: Literal["removed", "full"] = "removed"


class FairLRFPlan(SparsePlan):
    """Target layers with rank, sr, rr and β (a layer without β takes ``beta``)."""

    beta: NonNegFloat = DEFAULT_BETA
    scoring: FairLRFScoring = Field(default_factory=FairLRFScoring)

    _layer_keys: ClassVar[tuple[str, ...]] = ("sr", "rr", "beta")

    @model_validator(mode="before")
    @classmethod
    def _layer_beta(cls, data: Any) -> Any:
        # A layer without its own β takes the plan's (default: the paper's 5/9).
        if isinstance(data, dict) and isinstance(data.get("layers"), list | tuple):
            beta = data.get("beta", DEFAULT_BETA)
            try:
                beta = parse_fraction(beta)
            except ValueError:
                return data  # reported at `beta` itself
            data = dict(data)
            data["layers"] = [
                (
                    {**lp, "beta": beta}
                    if isinstance(lp, dict) and lp.get("beta") is None
                    else lp.model_copy(update={"beta": beta})
                    if isinstance(lp, LayerPlan) and lp.beta is None
                    else lp
                )
                for lp in data["layers"]
            ]
        return data


@register_method
class FairLRF(SparseLowRankMethod[FairLRFPlan]):
    """FairLRF: sparsify the rows/columns whose removal costs the unprivileged group
    least relative to β times the privileged group's cost."""

    name: ClassVar[str] = "fairlrf"
    label: ClassVar[str] = "FairLRF"
    default_compare: ClassVar[bool] = True
    order: ClassVar[int] = 60

    def describe_layer(self, lp: LayerPlan) -> str:
        return f"{super().describe_layer(lp)}, β={lp.beta:.3g}"

    def warnings(self, plan: FairLRFPlan, model: nn.Module) -> list[str]:
        out = super().warnings(plan, model)
        for lp in plan.layers:
            if lp.beta is not None and lp.beta >= 1:
                out.append(
                    f"layer {lp.layer}: β = {lp.beta:.3g} ≥ 1 scores the rows that matter to "
                    "both groups (h0 ≈ h1) negative, so the most important rows are removed "
                    "first; the paper uses β < 1 (5/9, 3/7)"
                )
        if plan.scoring.estimator == "exact":
            for lp in plan.layers:
                curved = curved_modules_after(model, lp.layer)
                if curved:
                    out.append(
                        f"layer {lp.layer}: the modules after it are not piecewise linear "
                        f"({', '.join(curved)}): the 'exact' Hessian estimator gives the "
                        "Gauss-Newton diagonal there, an approximation of the Hessian "
                        "diagonal (HessianApproximationWarning)"
                    )
        return out

    def selection_inputs(
        self,
        plan: FairLRFPlan,
        ctx: Context,
        head: nn.Module,
        index: int,
        selections: Mapping[str, Mapping[str, list[int]]],
    ) -> SelectionInputs:
        layers = plan.layers
        lp = layers[index]
        spec: FairLRFScoring = plan.scoring

        def hessians(data: ScoringSet, ids: tuple[int, int]) -> dict[int, dict[str, Any]]:
            samples, settings = estimator_inputs(data, spec)
            return group_hessians(head, lp.layer, *samples, group_ids=ids, **settings)

        # The head's state so far: every layer's rank, the earlier layers' settings and
        # selections (not this layer's sr/rr/β: a sweep over them reuses the Hessians).
        state = {
            "settings": [p.model_dump(mode="json") for p in layers[:index]],
            "rows": {k: dict(v) for k, v in selections.items()},
        }
        of = {
            "layer": lp.layer,
            "ranks": [(p.layer, p.rank) for p in layers],
            "before": hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest(),
        }
        h = ctx.hessians(spec, hessians, of=of)
        return SelectionInputs(
            hessians={role: {p: h[role][p] for p in ("U", "V")} for role in (0, 1)},
            beta=plan.beta if lp.beta is None else lp.beta,  # filled by the plan: never None
            row_score=spec.row_score,
        )


def curved_modules_after(model: nn.Module, layer: str) -> list[str]:
    """The operations after ``layer`` that are not piecewise linear (Tanh, GELU,
    Softmax ...): with them the 'exact' estimator's Gauss-Newton diagonal is an
    approximation. From the model's traced graph (:mod:`fairdeploy.structure`), before any
    Hessian is computed — for ``--dry-run`` and the report, also on a cache hit."""
    from fairdeploy.errors import FairDeployError
    from fairdeploy.structure import analyze_structure

    try:
        return analyze_structure(model, leaves=[layer]).not_piecewise_linear_after(layer)
    except FairDeployError:
        return ["(unknown: the model cannot be traced)"]
