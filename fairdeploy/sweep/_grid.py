"""The sweep's grid: parsing ``key=values`` and expanding it into validated plans.

A grid names values for some of ``layer``, ``rank``, ``sr``, ``rr`` and ``beta``
(:data:`GRID_KEYS`); every combination is one point. The text is parsed by
:mod:`fairdeploy.grammar` (re-exported here). Values are written as

- a comma-separated list: ``rr=0,0.25,0.5``, ``beta=1/3,5/9,0.8``, ``rank=16,64``,
  ``layer=classifier.0,classifier.3``;
- an inclusive range ``start:stop:step``: ``sr=0:0.9:0.1`` is 0, 0.1, …, 0.9;
- ``layer=all``: every ``nn.Linear`` of the model, in call order (the paper's Table 3:
  the same setting applied to each layer in turn).

A point is the recipe's plan (or a compared method's plan derived from it) with the
point's values put in: without ``layer`` in the grid the values apply to every target
layer of the plan; with ``layer`` each point targets that one layer, at the grid's rank,
else at the rank the plan gives that layer, else at the plan's first layer's rank. A key
a method does not read (β for SLR-w) is left out of that method's points. Every point
is rebuilt as a new plan and validated; a combination the model cannot take (a rank
above ``min(Din, Dout)``) stays in the table, marked invalid with the reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.features import layers_in_call_order, uncalled_layers
from fairdeploy.grammar import GRID_KEYS, parse_grid, parse_grid_values
from fairdeploy.lrf import linear_layers
from fairdeploy.methods import get_method
from fairdeploy.plan import LayerPlan, Plan

__all__ = [
    "GRID_KEYS",
    "SweepPoint",
    "grid_points",
    "parse_grid",
    "parse_grid_values",
    "reference_plan",
]

@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid for one method.

    Attributes
    ----------
    index : int
        Position in grid order (the row order of sweep.csv).
    method : str
        The swept method's registry name.
    settings : dict
        ``layer``, ``rank``, ``sr``, ``rr``, ``beta`` of the point (None where the method
        does not read it); several target layers are joined with ``+``.
    plan : Plan or None
        The validated plan (its ``scoring.repeats`` draws are evaluated); None when the
        combination does not fit the model.
    reference : Plan or None
        Truncated SVD of the same layers at the same ranks.
    invalid : str or None
        Why the combination cannot run on this model (e.g. a rank above the layer's
        ``min(Din, Dout)``).
    """

    index: int
    method: str
    settings: dict[str, Any]
    plan: Plan | None
    reference: Plan | None
    invalid: str | None = None


def _plan_layers(plan: Plan) -> tuple[LayerPlan, ...]:
    layers = getattr(plan, "layers", None)
    if not isinstance(layers, tuple) or not all(isinstance(lp, LayerPlan) for lp in layers):
        raise FairDeployError(
            f"sweep: method {plan.method!r} has no low-rank target layers; the grid varies the "
            "layer, rank, sr, rr and β of a low-rank method (truncated_svd, slr_w, slr_a, "
            "fairlrf): make one of them the recipe's method"
        )
    return layers


def _reads(method: str) -> tuple[str, ...]:
    """The grid keys a low-rank method reads: layer and rank, and its own layer keys."""
    plan_class = get_method(method).plan_class
    # LowRankPlan subclasses list the LayerPlan fields they read besides layer and rank.
    return ("layer", "rank", *getattr(plan_class, "_layer_keys", ()))


def reference_plan(layers: Sequence[tuple[str, int]]) -> Plan:
    """Truncated SVD of ``(layer, rank)`` pairs: the reference a point is compared with."""
    return Plan("truncated_svd", [LayerPlan(name, rank) for name, rank in layers])


def _base_plan(main: Plan, method: str) -> Plan:
    if method == main.method:
        return main
    impl = get_method(method)
    raw = impl.derive(main, {})
    raw["name"] = raw.pop("method", method)
    return Plan(**raw)


def _layer_names(values: tuple[Any, ...], model: nn.Module) -> list[str]:
    if values == ("all",):
        found = linear_layers(model)
        if not found:
            raise FairDeployError("--grid layer=all: the model has no nn.Linear layer")
        # Linear layers used functionally (nn.MultiheadAttention's out_proj) come last;
        # their points are marked invalid with the reason (_point).
        uncalled = uncalled_layers(model, found)
        called = [name for name in found if name not in uncalled]
        return [*layers_in_call_order(model, called), *uncalled]
    linear = set(linear_layers(model))
    for name in values:
        if name not in linear:
            raise FairDeployError(
                f"--grid layer: {name!r} is not an nn.Linear of the model; they are: "
                f"{', '.join(linear_layers(model)) or '(none)'} (or write layer=all)"
            )
    return list(values)


def _with_repeats(raw: dict[str, Any], repeats: int | None) -> dict[str, Any]:
    if repeats is None or not isinstance(raw.get("scoring"), dict):
        return raw
    return raw | {"scoring": raw["scoring"] | {"repeats": repeats}}


def grid_points(
    main: Plan,
    grid: Mapping[str, tuple[Any, ...]],
    model: nn.Module,
    *,
    methods: Sequence[str] | None = None,
    repeats: int | None = None,
) -> list[SweepPoint]:
    """Every point of ``grid`` for each method, as validated plans, in grid order.

    Parameters
    ----------
    main : Plan
        The recipe's method; other ``methods`` derive their plans from it as ``compare:``
        entries do.
    grid : mapping
        :func:`parse_grid`'s result.
    model : nn.Module
        The vanilla model (shapes only), for ``layer=all`` and for checking each point.
    methods : sequence of str, optional
        Low-rank methods to sweep (default: the recipe's method).
    repeats : int, optional
        Override every point's ``scoring.repeats``.

    Raises
    ------
    FairDeployError
        A method without low-rank layers, a grid key none of the methods reads, a layer
        that is not an ``nn.Linear`` of the model.
    """
    methods = list(methods or [main.method])
    grid = dict(grid)
    unread = [k for k in grid if not any(k in _reads(m) for m in methods)]
    if unread:
        raise FairDeployError(
            f"--grid {unread[0]}: none of the swept methods ({', '.join(methods)}) reads "
            f"{unread[0]}; drop it or sweep a method that does (fairlrf reads sr, rr and beta)"
        )
    layer_values = _layer_names(grid["layer"], model) if "layer" in grid else None
    uncalled = uncalled_layers(model, layer_values) if layer_values else {}
    points: list[SweepPoint] = []
    for method in methods:
        base = _base_plan(main, method)
        base_layers = _plan_layers(base)
        reads = _reads(method)
        keys = [k for k in GRID_KEYS if k in grid and k in reads]
        raw_base = base.model_dump(mode="json", by_alias=True)
        if "layer" in keys:
            assert layer_values is not None
            value_lists = [layer_values if k == "layer" else grid[k] for k in keys]
        else:
            value_lists = [grid[k] for k in keys]
        for combo in itertools.product(*value_lists):
            chosen = dict(zip(keys, combo, strict=True))
            point = _point(len(points), method, chosen, base_layers, raw_base, reads, model,
                           repeats)
            why = uncalled.get(chosen.get("layer", ""))
            if why is not None and point.plan is not None:
                point = SweepPoint(point.index, method, point.settings, None, None,
                                   invalid=f"layer {chosen['layer']!r}: {why}")
            points.append(point)
    return points


def _point(
    index: int,
    method: str,
    chosen: dict[str, Any],
    base_layers: tuple[LayerPlan, ...],
    raw_base: dict[str, Any],
    reads: tuple[str, ...],
    model: nn.Module,
    repeats: int | None,
) -> SweepPoint:
    by_name = {lp.layer: lp for lp in base_layers}
    if "layer" in chosen:
        # The plan's own settings for that layer if it lists it, else its first layer's.
        template = by_name.get(chosen["layer"], base_layers[0])
        targets = [(chosen["layer"], template.rank, template)]
    else:
        targets = [(lp.layer, lp.rank, lp) for lp in base_layers]
    layers = []
    for name, rank, template in targets:
        entry: dict[str, Any] = {"layer": name, "rank": chosen.get("rank", rank)}
        for key in ("sr", "rr", "beta"):
            if key in reads:
                entry[key] = chosen.get(key, getattr(template, key))
        layers.append(entry)
    raw = _with_repeats(dict(raw_base) | {"layers": layers}, repeats)
    if "beta" in chosen and "beta" in raw:
        raw["beta"] = chosen["beta"]  # the plan's default β follows the point's
    settings = {
        "layer": "+".join(e["layer"] for e in layers),
        "rank": _joined([e["rank"] for e in layers]),
        "sr": _joined([e.get("sr") for e in layers]),
        "rr": _joined([e.get("rr") for e in layers]),
        "beta": _joined([e.get("beta") for e in layers]),
    }
    plan = Plan(**raw)
    reference = reference_plan([(e["layer"], e["rank"]) for e in layers])
    try:
        plan.implementation.check(plan, model)
    except FairDeployError as exc:
        return SweepPoint(index, method, settings, None, None, invalid=str(exc))
    return SweepPoint(index, method, settings, plan, reference)


def _joined(values: list[Any]) -> Any:
    """One value when every layer has it, else the values joined with ``+``."""
    if all(v == values[0] for v in values):
        return values[0]
    return "+".join(str(v) for v in values)
