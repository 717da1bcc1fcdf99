"""The sweep's grid: parsing ``key=values`` and expanding it into validated plans.

A grid names values for some of ``layer``, ``rank``, ``sr``, ``rr`` and ``beta``
(:data:`GRID_KEYS`); every combination is one point. Values are written as

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
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.features import layers_in_call_order
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

#: The settings a grid can vary, outermost first (the order of the sweep's rows).
GRID_KEYS = ("layer", "rank", "sr", "rr", "beta")
# A grid this large is a typo (a step of 0.0001), not a sweep.
_MAX_VALUES = 1000
_HELP = (
    "write KEY=VALUES with KEY one of layer, rank, sr, rr, beta and VALUES a comma-separated "
    "list (rr=0,0.25,0.5; beta=1/3,5/9), an inclusive range start:stop:step (sr=0:0.9:0.1) "
    "or, for layer, all"
)


def _number(text: str, key: str) -> float:
    try:
        value = float(Fraction(text.strip().replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise FairDeployError(
            f"--grid {key}: {text.strip()!r} is not a number (use e.g. 0.5 or 5/9)"
        ) from None
    if not math.isfinite(value):
        raise FairDeployError(f"--grid {key}: {text.strip()!r} is not a finite number")
    return value


def _range(text: str, key: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise FairDeployError(
            f"--grid {key}={text}: a range is start:stop:step, e.g. 0:0.9:0.1 (three numbers)"
        )
    start, stop, step = (_number(p, key) for p in parts)
    if step <= 0:
        raise FairDeployError(f"--grid {key}={text}: the step must be > 0")
    if stop < start:
        raise FairDeployError(f"--grid {key}={text}: stop {stop:g} is below start {start:g}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > _MAX_VALUES:
        raise FairDeployError(
            f"--grid {key}={text}: {count} values; at most {_MAX_VALUES} per key (a larger step?)"
        )
    # Rounded so 0.1 * 3 is 0.3, as written, not 0.30000000000000004.
    return [round(start + i * step, 12) for i in range(count)]


def parse_grid_values(key: str, value: Any) -> tuple[Any, ...]:
    """The values of one grid key, from the command line's text or the recipe's YAML.

    Parameters
    ----------
    key : str
        One of :data:`GRID_KEYS`.
    value : str, number or list
        ``"0:0.9:0.1"``, ``"1/3,5/9,0.8"``, ``"all"`` (layer), a number, or a YAML list of
        numbers / fraction strings / layer names.

    Returns
    -------
    tuple
        The values in the order given (duplicates removed): floats for sr, rr and β,
        ints for rank, names (or ``"all"``) for layer.

    Raises
    ------
    FairDeployError
        An unknown key, an empty list, a value out of range (sr and rr in [0, 1], β ≥ 0,
        rank an integer ≥ 1).
    """
    if key not in GRID_KEYS:
        raise FairDeployError(f"--grid {key}: unknown key; {_HELP}")
    if isinstance(value, bool):
        raise FairDeployError(f"--grid {key}: {value!r} is not allowed; {_HELP}")
    items: list[Any]
    if isinstance(value, str):
        text = value.strip()
        if key != "layer" and ":" in text:
            items = list(_range(text, key))
        else:
            items = [v.strip() for v in text.split(",")]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    if not items or any(isinstance(v, str) and not v for v in items):
        raise FairDeployError(f"--grid {key}: an empty value; {_HELP}")
    out: list[Any] = []
    for item in items:
        if isinstance(item, bool):
            raise FairDeployError(f"--grid {key}: {item!r} is not allowed; {_HELP}")
        if key == "layer":
            v: Any = str(item)
        elif key == "rank":
            number = _number(str(item), key)
            if number != int(number) or number < 1:
                raise FairDeployError(f"--grid rank: {item!r} is not allowed (use integers ≥ 1)")
            v = int(number)
        else:
            v = _number(str(item), key)
            if key in ("sr", "rr") and not 0.0 <= v <= 1.0:
                raise FairDeployError(
                    f"--grid {key}: {item!r} is not allowed (use numbers in [0, 1])"
                )
            if key == "beta" and v < 0:
                raise FairDeployError(f"--grid beta: {item!r} is not allowed (use numbers ≥ 0)")
        if v not in out:
            out.append(v)
    if key == "layer" and "all" in out and len(out) > 1:
        raise FairDeployError("--grid layer: all already names every Linear layer; give it alone")
    return tuple(out)


def parse_grid(items: Iterable[str] | Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """A grid from ``KEY=VALUES`` strings (the command line) or a mapping (the recipe).

    Returns ``{key: values}`` in :data:`GRID_KEYS` order. A key given twice is an error.
    """
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        for item in items:
            key, sep, values = str(item).partition("=")
            if not sep:
                raise FairDeployError(f"--grid {item!r}: {_HELP}")
            pairs.append((key.strip(), values))
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in pairs:
        if key in grid:
            raise FairDeployError(f"--grid {key}: given twice; give each key once")
        grid[key] = parse_grid_values(key, values)
    return {k: grid[k] for k in GRID_KEYS if k in grid}


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
        return layers_in_call_order(model, found)
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
            points.append(
                _point(len(points), method, chosen, base_layers, raw_base, reads, model, repeats)
            )
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
