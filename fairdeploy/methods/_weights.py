"""What the weight-level methods (FairPrune, FairQuantize) share: chosen layers, β, scoring,
per-group Hessian diagonals of the chosen weights, where they run, packed storage.

Both score every weight of the chosen ``nn.Linear``/``nn.Conv2d`` layers with per-group
Hessian diagonals (:mod:`fairdeploy.weight_hessian`) on the balanced scoring sets that
FairLRF uses (same draw for the same ``samples_per_group`` and ``seed``). Where:

* every chosen layer at or after the experiment's cut (in the head): the head runs on
  the cached trunk features, for scoring and evaluation alike;
* a chosen layer in the trunk (``layers: all`` on a CNN), or fine-tuning (which trains
  the whole model): the full model runs on the scoring samples' own inputs, and the
  processed model runs over the validation and test splits once (the feature cache
  cannot serve them); the row's notes say so.

Hessians come from :meth:`~fairdeploy.experiment.Context.hessians`, which keys them by
the weights, where they ran, the estimator and its settings, the scoring draw and the
privileged group, so FairPrune and FairQuantize on the same layers and draw share one
computation (the costliest step of both).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from fairdeploy._schema import NonNegFloat, PosInt
from fairdeploy._text import plural
from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import functional_linears
from fairdeploy.methods._base import Method, Processed, count_parameters, estimator_inputs
from fairdeploy.plan import Plan, ScoringSpec
from fairdeploy.progress import phase

if TYPE_CHECKING:
    from fairdeploy.context import Context, ScoringSet

__all__ = ["WeightMethod", "WeightPlan", "WeightScoring", "weight_layers"]

#: Above this many classes, exact Hessians of Conv2d weights (one backward pass per class
#: per chunk) take hours on a CPU for VGG-sized trunks: the plan warns.
_EXACT_CONV_CLASSES = 16


class WeightScoring(ScoringSpec):
    """Scoring of the weight methods: the Hessian estimator, the scoring sets, and for
    ``ggn_mc`` the label draws per sample.

    ``batch_size`` is the number of samples per chunk of the Hessian computation: on
    images through a whole VGG-11, 64 samples hold about 1 GB of activations (the
    default here; a compare entry does not inherit FairLRF's, which runs on features).
    """

    batch_size: PosInt = 64


class WeightPlan(Plan):
    """Chosen layers (names, or ``all``: every Linear and Conv2d weight), β, scoring."""

    layers: Literal["all"] | tuple[str, ...] = "all"
    beta: NonNegFloat = 5 / 9
    scoring: WeightScoring = Field(default_factory=WeightScoring)

    @field_validator("layers", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one layer name, or all")
            return tuple(value)
        return value


def weight_layers(plan: WeightPlan, model: nn.Module) -> list[str]:
    """The chosen Linear/Conv2d modules of ``plan`` in ``model``: definition order for
    ``all``, else the plan's order (the tie-break order of a global selection).
    Linear layers used functionally (``nn.MultiheadAttention``'s ``out_proj``,
    :func:`~fairdeploy.lrf.functional_linears`) are not part of ``all`` and are refused
    by name."""
    kinds = (nn.Linear, nn.Conv2d)
    functional = functional_linears(model)
    found = [
        n for n, m in model.named_modules() if n and isinstance(m, kinds) and n not in functional
    ]
    layers = plan.layers
    for name in layers if layers != "all" else ():
        if name in functional:
            raise FairDeployError(f"method.layers: {name!r} cannot be chosen: {functional[name]}")
    if layers == "all":
        if not found:
            raise FairDeployError(
                "method.layers: all — the model has no nn.Linear or nn.Conv2d layer"
            )
        return found
    for name in layers:
        if name not in found:
            raise FairDeployError(
                f"method.layers: {name!r} is not a Linear or Conv2d layer of the model; "
                f"they are: {', '.join(found) or '(none)'}"
            )
    if len(set(layers)) != len(layers):
        dup = next(n for n in layers if layers.count(n) > 1)
        raise FairDeployError(f"method.layers: {dup!r} is listed twice (list each layer once)")
    return list(layers)


WP = TypeVar("WP", bound=WeightPlan)


class WeightMethod(Method[WP]):
    """Base of the methods that change individual weights of chosen layers."""

    def target_layers(self, plan: WP) -> tuple[str, ...]:
        layers = plan.layers
        return ("",) if layers == "all" else tuple(layers)

    def resolve_layers(self, plan: WP, model: nn.Module) -> tuple[str, ...]:
        return tuple(weight_layers(plan, model))

    def check(self, plan: WP, model: nn.Module) -> None:
        weight_layers(plan, model)

    def derive(self, main: Plan, given: Mapping[str, Any]) -> dict[str, Any]:
        out = super().derive(main, given)
        scoring = out.get("scoring")
        main_scoring = getattr(main, "scoring", None)
        if (
            "scoring" not in given
            and isinstance(scoring, dict)
            and not isinstance(main_scoring, WeightScoring)
        ):
            # The main method's batch size is for its own inputs (FairLRF: features of
            # one layer); on images through the whole model it may not fit in memory.
            scoring.pop("batch_size", None)
        return out

    def warnings(self, plan: WP, model: nn.Module) -> list[str]:
        spec: WeightScoring = plan.scoring
        convs = [
            n for n in weight_layers(plan, model) if isinstance(model.get_submodule(n), nn.Conv2d)
        ]
        classes = _num_classes(model)
        if spec.estimator == "exact" and convs and classes > _EXACT_CONV_CLASSES:
            return [
                f"{self.describe(plan)}: exact Hessian diagonals of the {len(convs)} Conv2d "
                f"weights cost one backward pass per class ({classes}) per chunk of samples — "
                "hours on a CPU for a VGG-11; on a CPU use scoring.estimator: ggn_mc (one "
                "backward pass per draw), or run it on a GPU (--device cuda)"
            ]
        return []

    def chosen_weights(self, plan: WP, model: nn.Module) -> int:
        """Number of weight entries (biases excluded) in the chosen layers."""
        return sum(model.get_submodule(n).weight.numel() for n in weight_layers(plan, model))

    def describe(self, plan: WP) -> str:
        layers = plan.layers
        where = "all layers" if layers == "all" else ", ".join(layers)
        return f"{self.label} ({self.describe_ratio(plan)}, β={plan.beta:.3g}, {where})"

    def describe_ratio(self, plan: WP) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ accounting

    def changed_weights(self, plan: WP, model: nn.Module) -> int:
        """Weights the plan changes (pruned or quantized), from shapes alone."""
        raise NotImplementedError

    def saved_bits(self, plan: WP, model: nn.Module) -> int:
        """Bits the changed weights no longer need (32 per pruned weight, 24 per int8)."""
        raise NotImplementedError

    def stored_cr(self, plan: WP, model: nn.Module) -> float:
        """Theoretical C.R. of the packed storage: every chosen weight pays one mask bit
        (``32·P / (32·P − saved bits + chosen weights)``), what
        :func:`~fairdeploy.export.pack_weights` stores when it packs every chosen tensor
        (it keeps a tensor dense where packing would not save bytes)."""
        total = 32 * count_parameters(model)
        return total / (total - self.saved_bits(plan, model) + self.chosen_weights(plan, model))

    # ------------------------------------------------------------------ doing it

    def runs_on_model(self, plan: WP, ctx: Context) -> bool:
        """Whether the plan needs the full model (a chosen layer before the cut, or
        anything else the method decides) instead of the head on cached features."""
        in_head = dict(ctx.head.named_modules())
        return any(n not in in_head for n in weight_layers(plan, ctx.model))

    def scoring_data(self, plan: WP, ctx: Context, *, full_model: bool) -> ScoringSet:
        """The scoring samples: trunk features for the head, the inputs for the model."""
        spec = plan.scoring
        return ctx.scoring_inputs(spec) if full_model else ctx.scoring_set(spec)

    def hessians(
        self, plan: WP, ctx: Context, *, full_model: bool
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Per-group Hessian diagonals of the chosen weights of the VANILLA model (or
        head), keyed by role: ``{0: unprivileged, 1: privileged}``; cached."""
        from fairdeploy.weight_hessian import group_weight_hessians

        spec: WeightScoring = plan.scoring
        pnames = [f"{n}.weight" for n in weight_layers(plan, ctx.model)]
        net = ctx.model if full_model else ctx.head

        def compute(data: ScoringSet, ids: tuple[int, int]) -> dict[int, dict[str, Any]]:
            n = int(np.isin(np.asarray(data.features.groups), ids).sum())
            with phase(f"{self.label}: Hessians of {plural(len(pnames), 'weight tensor')}",
                       total=n, unit="sample", enabled=ctx.progress) as bar:
                samples, settings = estimator_inputs(data, spec)
                return group_weight_hessians(
                    self.on_device(net, ctx) if full_model else net,
                    pnames,
                    *samples,
                    group_ids=ids,
                    on_chunk=bar.advance,
                    **settings,
                )

        return ctx.hessians(
            spec,
            compute,
            of={"weights": pnames},
            inputs="model" if full_model else "features",
            kind="weight_hessian",
        )

    @staticmethod
    def on_device(model: nn.Module, ctx: Context) -> nn.Module:
        """``model`` on the experiment's device (``--device cuda``): a copy, or itself on
        the CPU. The whole-model path runs there (Hessians, fine-tuning); a head on
        cached features stays on the CPU, as FairLRF's scoring does."""
        if torch.device(ctx.device).type == "cpu":
            return model
        return copy.deepcopy(model).to(ctx.device)

    def processed(
        self,
        plan: WP,
        model: nn.Module,
        *,
        full: bool,
        details: dict[str, Any],
        notes: list[str],
    ) -> Processed:
        """The method's result: ``model`` as the processed full model (on the CPU) when
        the plan ran on it, else as the head; ``details`` gain ``ran_on``."""
        details = {**details, "ran_on": "model" if full else "head"}
        if full:
            return Processed(plan, model=model.cpu(), details=details, notes=notes)
        return Processed(plan, head=model, details=details, notes=notes)

    def trunk_note(self, plan: WP, ctx: Context, reason: str) -> str:
        """The report's note for a row that ran the full model."""
        return (
            f"{self.describe(plan)}: {reason}, so the cached trunk features cannot serve it: "
            "the Hessians were computed on the scoring samples' own inputs through the whole "
            "model, and the processed model runs over the validation and test splits once"
        )

    def packing(self, plan: WP, processed: Any) -> dict[str, Any] | None:
        """Per chosen weight, its :class:`~fairdeploy.export.PackSpec` (from the masks
        the method left in ``processed.details``)."""
        from fairdeploy.export import PackSpec

        module = processed.head if processed.head is not None else processed.model
        out = {}
        for name, spec in self.pack_specs(processed).items():
            weight = module.get_submodule(name).weight.detach().cpu()
            out[f"{name}.weight"] = PackSpec(weight=weight.numpy(), **spec)
        return out

    def pack_specs(self, processed: Any) -> dict[str, dict[str, Any]]:
        """Per layer, the PackSpec fields besides ``weight``."""
        raise NotImplementedError


def _num_classes(model: nn.Module) -> int:
    """Output features of the model's last Linear layer (the classes), 0 if none."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0
