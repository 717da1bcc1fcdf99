"""``fairprune``: FairPrune (Wu et al. 2022): unstructured pruning of the weights with the
lowest saliency ``½θ²(h0 − βh1)`` (per-group Hessian diagonals), ``prune_ratio`` of each
chosen layer (``scope: layer``) or of all chosen weights together (``global``); no
fine-tuning (:func:`fairdeploy.fairprune.fairprune`).

Compression, two figures: the paper's theoretical C.R. is 1.000 (it stores pruned weights
dense); the export stores each pruned weight as a bit mask plus its remaining float values
(:func:`~fairdeploy.export.pack_weights`), rebuilt by a constant subgraph that ONNX
Runtime folds when the session loads, so the measured C.R. is above 1 (about
``32 / ((1 − p)·32 + 1)`` on the chosen weights) while inference runs the same dense
MatMul/Conv. An ONNX ``sparse_initializer`` was measured and rejected: the checker refuses
it on Conv inputs and with 12 bytes per kept weight the file grows (README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from fairdeploy._schema import PosFraction
from fairdeploy.methods._base import Processed
from fairdeploy.methods._registry import register_method
from fairdeploy.methods._weights import WeightMethod, WeightPlan, weight_layers
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.context import Context

__all__ = ["FairPrune", "FairPrunePlan"]


class FairPrunePlan(WeightPlan):
    """The pruned fraction, its scope, the chosen layers, β and the scoring sets."""

    prune_ratio: PosFraction
    scope: Literal["layer", "global"] = "layer"


@register_method
class FairPrune(WeightMethod[FairPrunePlan]):
    """FairPrune: prune the weights whose removal costs the unprivileged group least."""

    name: ClassVar[str] = "fairprune"
    label: ClassVar[str] = "FairPrune"
    order: ClassVar[int] = 40

    def example(self, model: nn.Module) -> Plan:
        return self.plan_class(method=self.name, prune_ratio=0.3)

    def describe_ratio(self, plan: FairPrunePlan) -> str:
        return f"prune {plan.prune_ratio:.0%} per {plan.scope}"

    # ------------------------------------------------------------------ accounting

    def changed_weights(self, plan: FairPrunePlan, model: nn.Module) -> int:
        from fairdeploy.weight_selection import selection_counts

        sizes = {n: model.get_submodule(n).weight.numel() for n in weight_layers(plan, model)}
        counts = selection_counts(sizes, plan.prune_ratio, plan.scope)
        return sum(counts.values()) if isinstance(counts, dict) else counts

    def saved_bits(self, plan: FairPrunePlan, model: nn.Module) -> int:
        return 32 * self.changed_weights(plan, model)

    # theoretical_cr: 1.0 (Method's default), the paper's: pruned weights stored dense.

    # ------------------------------------------------------------------ doing it

    def apply(self, plan: FairPrunePlan, ctx: Context) -> Processed:
        from fairdeploy.fairprune import fairprune

        full = self.runs_on_model(plan, ctx)
        hessians = self.hessians(plan, ctx, full_model=full)
        result = fairprune(
            ctx.model if full else ctx.head,
            hessians,
            prune_ratio=plan.prune_ratio,
            beta=plan.beta,
            layers=weight_layers(plan, ctx.model),
            scope=plan.scope,
        )
        notes = []
        if full:
            notes.append(self.trunk_note(plan, ctx, "the chosen layers include the trunk"))
        details: dict[str, Any] = {
            "pruned": dict(result.counts),
            "weights": dict(result.sizes),
            "pruned_fraction": result.pruned_fraction,
            "masks": result.masks,
        }
        return self.processed(plan, result.model, full=full, details=details, notes=notes)

    def pack_specs(self, processed: Processed) -> dict[str, dict[str, Any]]:
        return {n: {"pruned": m.cpu().numpy()} for n, m in processed.details["masks"].items()}
