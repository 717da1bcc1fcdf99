"""The :class:`Method` interface: what every compression method owns.

A method is a class with a ``name``, a table ``label``, its plan class (a
:class:`~fairdeploy.plan.Plan` subclass holding every setting it reads, so the recipe
schema comes from it), what it does to a model (:meth:`Method.apply`, given the shared
:class:`~fairdeploy.experiment.Context`: the cut model, cached features, scoring sets,
cached SVD factors and Hessians) and its compression accounting from shapes alone
(:meth:`Method.layer_table`, :meth:`Method.theoretical_cr`). Register it with
:func:`~fairdeploy.methods.register_method`, or name it in a recipe as
``package.module:Class``.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel
from torch import nn

from fairdeploy.plan import Plan, ScoringSpec

if TYPE_CHECKING:
    from fairdeploy.context import Context, ScoringSet

__all__ = ["Method", "P", "Processed", "count_parameters", "estimator_inputs"]

#: The plan class a method takes (``Method[FairLRFPlan]``).
P = TypeVar("P", bound=Plan)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter entries (weights and biases) of a module; shapes only."""
    return sum(p.numel() for p in module.parameters())


def estimator_inputs(
    data: ScoringSet, spec: ScoringSpec
) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    """The scoring samples and the estimator settings, as the per-group Hessian
    functions take them (``group_hessians``, ``group_weight_hessians``, ``fairquantize``).

    Returns ``(features, targets, groups)`` of ``data`` and the keyword arguments
    ``estimator``, ``batch_size``, ``seed`` and, where ``spec`` has it, ``mc_samples``:
    every method passes the spec through here, so each setting the cache key names
    (:meth:`~fairdeploy.experiment.Context.hessians`) reaches the estimator.
    """
    fs = data.features
    settings: dict[str, Any] = {
        "estimator": spec.estimator, "batch_size": spec.batch_size, "seed": spec.seed
    }
    if hasattr(spec, "mc_samples"):
        settings["mc_samples"] = spec.mc_samples
    return (fs.features, fs.targets, fs.groups), settings


@dataclass
class Processed:
    """A model after a plan was applied.

    Attributes
    ----------
    plan : Plan
        What was applied.
    head : nn.Module or None
        The processed head (the model from the cut on) when the method changed only
        layers at or after the cut: it is evaluated on the cached trunk features.
    model : nn.Module or None
        The processed full model, when the method changed the trunk too (then it runs
        over the data to be evaluated). At least one of ``head`` and ``model`` is set.
    selections : dict
        Per layer, what the method chose (e.g. ``{"rows": [...], "cols": [...]}``).
    details : dict
        Anything else the method reports (counts, masks' sizes, notes).
    notes : list of str
        Warnings a reader of the report must see next to this method's numbers.
    """

    plan: Plan
    head: nn.Module | None = None
    model: nn.Module | None = None
    selections: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Logits per split, filled by :meth:`fairdeploy.Experiment.logits`.
    outputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head is None and self.model is None:
            raise ValueError("Processed needs the processed head or the processed model")


class Method(Generic[P]):
    """Base class of every compression method (one instance per registered method).

    Generic in its plan: ``class FairLRF(SparseLowRankMethod[FairLRFPlan])`` types every
    ``plan`` argument as a ``FairLRFPlan``, so its fields (``plan.beta``) are known to a
    type checker, and ``plan_class`` is that same class at run time, taken from the type
    argument (a class that names no concrete plan there sets ``plan_class`` itself).

    Class attributes
    ----------------
    name : str
        Registry name, also the recipe's ``method.name``.
    label : str
        Name in tables (``FairLRF``); :meth:`describe` adds the settings.
    plan_class : type of Plan
        The method's plan: its fields are the recipe keys it reads (by default the
        class's type argument, ``Method[ThisPlan]``).
    factorizes : bool
        Whether target layers become :class:`~fairdeploy.lrf.FactorizedLinear`.
    default_compare : bool
        Whether ``compare`` runs it when a recipe lists no ``compare:`` entries.
    unavailable : str or None
        Why the method cannot run in this installation (``compare`` skips it and says
        so; ``optimize`` refuses it); None when it can.
    rank_baseline : bool
        Whether this is the plain low-rank baseline other rows are compared with at
        the same ranks (truncated SVD).
    order : int
        Position in tables and in :func:`~fairdeploy.methods.list_methods` (the paper's
        row order for the built-ins; user methods come last by default).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    plan_class: ClassVar[type[Plan]]
    factorizes: ClassVar[bool] = False
    default_compare: ClassVar[bool] = False
    order: ClassVar[int] = 100
    unavailable: ClassVar[str | None] = None
    #: The plain low-rank baseline (truncated SVD): ``compare`` gives every row's paired
    #: change against the row of this method at the same ranks, as well as vanilla.
    rank_baseline: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "plan_class" not in cls.__dict__:
            plan = _plan_argument(cls)
            if plan is not None:
                cls.plan_class = plan

    # ------------------------------------------------------------------ the plan

    def target_layers(self, plan: P) -> tuple[str, ...]:
        """Qualified names of the modules the plan changes (the cut precedes them all).

        An empty tuple means the method changes nothing (vanilla). A name of ``""``
        means the whole model (the method touches the trunk; no feature cache).
        """
        return ()

    def resolve_layers(self, plan: P, model: nn.Module) -> tuple[str, ...]:
        """:meth:`target_layers` with names like ``all`` expanded against ``model``."""
        return self.target_layers(plan)

    def ranks(self, plan: P) -> tuple[tuple[str, int], ...]:
        """``(layer, rank)`` of every layer the plan factorizes; () when none."""
        return ()

    def derive(self, main: Plan, given: Mapping[str, Any]) -> dict[str, Any]:
        """The raw settings of a ``compare:`` entry of this method, completed from ``main``.

        ``given`` is what the entry wrote. A setting it leaves out is taken from the
        recipe's main ``method:`` when that plan has a field of the same name (a nested
        section, e.g. ``scoring``, only its fields this method knows); otherwise the
        plan class's default applies. Methods with target layers complete them in
        :meth:`derive_layers`.
        """
        out: dict[str, Any] = {**given, "method": self.name}
        fields = self.plan_class.model_fields
        for key, info in fields.items():
            if key in out or key in ("method", "layers") or key not in type(main).model_fields:
                continue
            value = getattr(main, key)
            sub = info.annotation
            nested = isinstance(sub, type) and issubclass(sub, BaseModel)
            if isinstance(value, BaseModel) and nested:
                # A nested section (e.g. scoring): only the fields this method knows.
                value = {k: getattr(value, k) for k in sub.model_fields if hasattr(value, k)}
            out[key] = value
        if "layers" in fields and "layers" not in given:
            layers = self.derive_layers(main, given)
            if layers is not None:
                out["layers"] = layers
        if "scoring" not in given:
            out = self._without_an_unread_seed(out)
        return out

    def _without_an_unread_seed(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` with the scoring seed taken from the main plan reset to 0 where this
        method would not read it (every sample, no label draws: the plan refuses another
        seed there, and the main plan's seed is nothing this entry could use)."""
        scoring = out.get("scoring")
        if not isinstance(scoring, dict) or scoring.get("samples_per_group") != "all":
            return out
        if not scoring.get("seed"):
            return out
        section = self.plan_class.model_fields["scoring"].annotation.model_construct(**scoring)
        probe = self.plan_class.model_construct(**{**out, "scoring": section})
        if probe.reads_scoring_seed_without_a_draw():
            return out
        return {**out, "scoring": {**scoring, "seed": 0}}

    def derive_layers(self, main: Plan, given: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """Target layers of a ``compare:`` entry that names none (None: use the default)."""
        return None

    def example(self, model: nn.Module) -> Plan:
        """A small valid plan of this method for ``model`` (docs, tests over the registry)."""
        return self.plan_class(method=self.name)

    def check(self, plan: P, model: nn.Module) -> None:
        """Raise :class:`~fairdeploy.errors.FairDeployError` if ``plan`` does not fit
        ``model`` (a missing layer, a rank too large); reads shapes only."""

    def warnings(self, plan: P, model: nn.Module) -> list[str]:
        """Things a user must know before trusting the numbers (shapes only)."""
        return []

    def describe(self, plan: P) -> str:
        """Row label: the method's label and its settings."""
        return self.label

    # ------------------------------------------------------------------ doing it

    def apply(self, plan: P, ctx: Context) -> Processed:
        """Apply ``plan`` to the experiment's vanilla model (never modified)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ accounting

    def layer_table(self, plan: P, model: nn.Module) -> list[dict[str, Any]]:
        """Per changed layer: shapes and parameter counts (the report's layer table)."""
        return []

    def theoretical_cr(self, plan: P, model: nn.Module) -> float:
        """The paper's theoretical compression rate: vanilla / processed parameter count
        (or bits), from shapes alone (the meta device works)."""
        return 1.0

    def stored_parameters(self, plan: P, model: nn.Module) -> int:
        """Parameters the exported graph stores (e.g. S as k values, not k×k)."""
        return count_parameters(model)

    def stored_cr(self, plan: P, model: nn.Module) -> float:
        """Theoretical C.R. of what the exported graph stores, from shapes alone: by
        default parameters of the vanilla model over :meth:`stored_parameters` (S as k
        values); methods with packed weights count bits (e.g. a mask bit per weight)."""
        return count_parameters(model) / self.stored_parameters(plan, model)

    # ------------------------------------------------------------------ deploying

    def packing(self, plan: P, processed: Processed) -> Mapping[str, Any] | None:
        """How the export stores this method's weights compactly: PyTorch parameter
        name (in the full model) → :class:`~fairdeploy.export.PackSpec`, for
        :func:`~fairdeploy.export.pack_weights` after the dense export; None (default)
        keeps the dense export. The packed model computes exactly what the dense one
        does (ONNX Runtime folds the rebuild when a session loads)."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def _plan_argument(cls: type) -> type[Plan] | None:
    """The concrete :class:`~fairdeploy.plan.Plan` subclass ``cls`` itself gives a generic
    :class:`Method` base (``FairLRF(SparseLowRankMethod[FairLRFPlan])`` → ``FairLRFPlan``),
    or None when it gives a type variable or names no such base (the class then inherits
    ``plan_class`` or sets it). Only the class's own bases count (not its parents'), and
    only those that are methods (another generic base's argument is not the plan)."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, Method)):
            continue
        for arg in typing.get_args(base):
            if isinstance(arg, type) and issubclass(arg, Plan):
                return arg
    return None
