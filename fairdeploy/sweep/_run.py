"""The sweep loop: every grid point (and its scoring draws) evaluated on the validation
split through the :class:`~fairdeploy.Experiment`, journaled as it finishes; the rows of
the sweep table; the selection; the chosen point's test-split comparison.

Cost: the trunk runs once per split (features cached), each (layer, rank) is decomposed
once and each (layer, rank, draw) scored once (the Context keeps SVD factors and
Hessians), so a further point costs one selection, one sparsification and one head
evaluation on the cached validation features. Vanilla and truncated SVD at each
(layer, rank) are evaluated once each, as the references of the points.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fairdeploy._json import json_float
from fairdeploy.errors import FairDeployError
from fairdeploy.metrics import (
    BOOTSTRAP_METRICS,
    LOWER_IS_BETTER,
    SUMMARY_METRICS,
    bootstrap_metrics,
    selection_overlap,
    spread,
    summary_metrics,
)
from fairdeploy.plan import Plan
from fairdeploy.sweep._grid import SweepPoint
from fairdeploy.sweep._journal import Journal, record_key
from fairdeploy.sweep._select import Selection, guard_reasons

__all__ = [
    "ROW_METRICS",
    "SweepRow",
    "apply_selection",
    "evaluate_on",
    "run_grid",
    "test_comparison",
]

#: Every metric of a sweep row: the summary metrics and the theoretical C.R.
ROW_METRICS = (*SUMMARY_METRICS, "cr")


@dataclass(frozen=True)
class SweepRow:
    """One row of the sweep table: vanilla, a truncated-SVD reference, or a grid point.

    Attributes
    ----------
    index : int
        Row number in sweep.csv.
    kind : str
        ``vanilla``, ``reference`` (truncated SVD at a point's layers and ranks) or
        ``point``.
    method : str
        Registry name of the row's method.
    settings : dict
        ``layer``, ``rank``, ``sr``, ``rr``, ``beta`` (None where not applicable).
    status : str
        ``ok``, or ``invalid: <why>`` for a combination the model cannot take.
    plan : Plan or None
        The row's plan (its first draw is what ``optimize`` deploys).
    seeds : tuple
        Seeds of the scoring draws evaluated (empty for methods without scoring sets).
    metrics : dict
        Validation metric → ``{"median", "min", "max", "values"}`` over the draws
        (:data:`ROW_METRICS`; ``cr`` is the theoretical compression rate).
    draws : tuple of dict
        Each draw's summary metrics (with ``predicted_rates``).
    overlap : dict
        Jaccard overlap of the draws' selected rows/columns per layer.
    reference : int or None
        Row index of the point's truncated-SVD reference.
    guard : str
        ``ok``, ``off``, ``n/a`` (not a candidate) or why the collapse guard rejects it.
    constraint : str
        ``ok``, ``violated: ...`` or empty when no rule was given.
    chosen : bool
        Whether the selection picked this row.
    scoring : dict or None
        ``samples_per_group`` (``all`` or a number, ``auto`` resolved) and the first
        draw's set ``sizes`` per group, for rows whose method has scoring sets.
    """

    index: int
    kind: str
    method: str
    settings: dict[str, Any]
    status: str
    plan: Plan | None
    seeds: tuple[int | None, ...] = ()
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    draws: tuple[dict[str, Any], ...] = ()
    overlap: dict[str, Any] = field(default_factory=dict)
    reference: int | None = None
    guard: str = ""
    constraint: str = ""
    chosen: bool = False
    scoring: dict[str, Any] | None = None

    def value(self, metric: str) -> float | None:
        """The row's median value of ``metric`` over its draws (None if undefined)."""
        sp = self.metrics.get(metric)
        return None if sp is None else sp.get("median")


def _mask_hex(indices: Sequence[int], size: int) -> str:
    mask = np.zeros(size, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return np.packbits(mask).tobytes().hex()


def _mask_indices(hexed: str, size: int) -> list[int]:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[:size]
    return np.flatnonzero(bits).tolist()


def evaluate_on(exp: Any, plan: Plan, split: str) -> dict[str, Any]:
    """Apply ``plan`` and summarise it on ``split``: what one journal record holds.

    Returns the plan's settings, the :func:`~fairdeploy.metrics.summary_metrics` (NaN as
    None), the per-group predicted-class rates, the selected rows/columns per layer
    (as bit masks) and the scoring-set sizes.
    """
    ctx = exp.context
    t0 = time.perf_counter()
    processed = exp.apply(plan)
    labels, groups = exp.labels(split)
    m = summary_metrics(
        labels,
        exp.predictions(processed, split),
        groups,
        privileged=ctx.privileged,
        num_classes=len(ctx.class_names),
    )
    selections = {}
    for layer, sel in processed.selections.items():
        linear = ctx.model.get_submodule(layer)
        selections[layer] = {
            "rows": _mask_hex(sel.get("rows", []), linear.in_features),
            "cols": _mask_hex(sel.get("cols", []), linear.out_features),
            "din": linear.in_features,
            "dout": linear.out_features,
        }
    spec = getattr(plan, "scoring", None)
    record = {
        "plan": plan.to_dict(),
        "split": split,
        "metrics": {k: json_float(m[k]) for k in SUMMARY_METRICS},
        "predicted_rates": [[json_float(v) for v in row] for row in m["predicted_rates"]],
        "selections": selections,
        "scoring_sizes": list(ctx.scoring_set(spec).sizes) if spec is not None else None,
        "seconds": round(time.perf_counter() - t0, 4),
    }
    return record


def _selections_of(record: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
    return {
        layer: {
            "rows": _mask_indices(sel["rows"], sel["din"]),
            "cols": _mask_indices(sel["cols"], sel["dout"]),
        }
        for layer, sel in record.get("selections", {}).items()
    }


@dataclass
class _Task:
    kind: str
    plan: Plan
    key: str
    row: int


def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not (enabled and console.is_terminal),
    )


def run_grid(
    exp: Any,
    points: Sequence[SweepPoint],
    journal: Journal,
    *,
    split: str = "val",
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    on_evaluation: Callable[[int, int], None] | None = None,
) -> list[SweepRow]:
    """Evaluate vanilla, every point's truncated-SVD reference and every point's draws
    on ``split``, skipping what ``journal`` already holds; return the table's rows.

    Rows come in a fixed order — vanilla, the references in order of first use, the
    points in grid order — whatever was evaluated when, so a resumed sweep gives the
    same table as an uninterrupted one.

    Parameters
    ----------
    exp : Experiment
        Prepared for the points' plans (one cut serving all of them).
    points : sequence of SweepPoint
        :func:`~fairdeploy.sweep.grid_points`'s result.
    journal : Journal
        Where each finished evaluation is appended (and read back on resume).
    split : str
        The split every row is evaluated on (the validation split: choosing on test
        would overstate the gain).
    progress : bool
        A progress bar with ETA on a terminal; else ``echo`` lines every 10 %.
    on_evaluation : callable, optional
        Called with (evaluations done, total) after each one (also for resumed ones).
    """
    rows = _table_rows(exp, points, split)
    tasks = [
        _Task(row["kind"], plan, record_key(plan.to_dict(), split), i)
        for i, row in enumerate(rows)
        for plan in row["draws"]
    ]
    total = len(tasks)
    todo = [t for t in tasks if journal.get(t.key) is None]
    done = total - len(todo)
    if echo is not None:
        echo(
            f"sweep: {len(points)} points, {total} evaluations on the {split} split"
            + (f" ({done} already in {journal.path.name}, resuming)" if done else "")
        )
    _evaluate_tasks(
        exp, rows, todo, journal, split=split, done=done, total=total, progress=progress,
        echo=echo, on_evaluation=on_evaluation,
    )
    return _rows(exp, rows, journal, split)


def _table_rows(exp: Any, points: Sequence[SweepPoint], split: str) -> list[dict[str, Any]]:
    """The table's rows before evaluation: vanilla, each truncated-SVD reference at its
    first use, then the points in grid order, each with the plans of its draws."""
    vanilla_plan = Plan("vanilla")
    rows: list[dict[str, Any]] = [
        {"kind": "vanilla", "method": "vanilla", "plan": vanilla_plan, "settings": {}, "draws": [
            vanilla_plan]}
    ]
    references: dict[str, int] = {}
    point_rows: list[dict[str, Any]] = []
    for point in points:
        if point.plan is None:
            point_rows.append({"kind": "point", "point": point, "plan": None, "draws": []})
            continue
        assert point.reference is not None
        ref_key = record_key(point.reference.to_dict(), split)
        if ref_key not in references:
            references[ref_key] = len(rows)
            lps = point.reference.layers  # type: ignore[attr-defined]
            rows.append({
                "kind": "reference", "method": "truncated_svd", "plan": point.reference,
                "draws": [point.reference],
                "settings": {"layer": point.settings["layer"], "rank": point.settings["rank"],
                             "sr": None, "rr": None, "beta": None, "_layers": len(lps)},
            })
        draw_plans = exp.draws(point.plan, prefetch=False)
        point_rows.append({
            "kind": "point", "point": point, "plan": point.plan, "draws": draw_plans,
            "reference": references[ref_key],
        })
    return rows + point_rows


def _evaluate_tasks(
    exp: Any, rows: Sequence[Mapping[str, Any]], todo: Sequence[_Task], journal: Journal, *,
    split: str, done: int, total: int, progress: bool,
    echo: Callable[[str], None] | None, on_evaluation: Callable[[int, int], None] | None,
) -> None:
    """Evaluate the ``todo`` tasks in order, appending each record to ``journal``; a
    point's missing draws get their scoring sets from one trunk pass. Reports progress
    (a bar, or ``echo`` lines every 10 %) and calls ``on_evaluation``."""
    prefetched: set[int] = set()
    bar = _progress_bar(progress)
    with bar:
        task_id = bar.add_task(f"sweep ({split} split)", total=total, completed=done)
        if on_evaluation is not None and done:
            on_evaluation(done, total)
        step = max(1, total // 10)
        t0 = time.perf_counter()
        for n, task in enumerate(todo, start=1):
            row = rows[task.row]
            if row["kind"] == "point" and task.row not in prefetched:
                # All of this point's missing draws' scoring sets in one trunk pass.
                prefetched.add(task.row)
                missing = [
                    p for p in row["draws"] if journal.get(record_key(p.to_dict(), split)) is None
                ]
                if len(missing) > 1:
                    exp.draws(row["plan"], prefetch=True)
            record = evaluate_on(exp, task.plan, split)
            journal.append({"key": task.key, "kind": task.kind, **record})
            bar.advance(task_id)
            if on_evaluation is not None:
                on_evaluation(done + n, total)
            if echo is not None and bar.disable and (n % step == 0 or n == len(todo)):
                elapsed = time.perf_counter() - t0
                eta = elapsed / n * (len(todo) - n)
                echo(f"  {done + n}/{total} evaluated, {elapsed:.1f} s, ETA {eta:.0f} s")


def _rows(
    exp: Any, rows: Sequence[Mapping[str, Any]], journal: Journal, split: str
) -> list[SweepRow]:
    model = exp.model
    out: list[SweepRow] = []
    for i, row in enumerate(rows):
        point: SweepPoint | None = row.get("point")
        method = point.method if point is not None else row["method"]
        settings = dict(point.settings if point is not None else row["settings"])
        settings.pop("_layers", None)
        if row["plan"] is None:
            assert point is not None
            out.append(SweepRow(i, "point", method, settings, f"invalid: {point.invalid}", None))
            continue
        plan: Plan = row["plan"]
        records = [journal.get(record_key(p.to_dict(), split)) for p in row["draws"]]
        if any(r is None for r in records):
            raise FairDeployError("internal error: a sweep evaluation is missing from the journal")
        draws = tuple(
            {**r["metrics"], "predicted_rates": r["predicted_rates"]}  # type: ignore[index]
            for r in records
        )
        cr = float(plan.implementation.theoretical_cr(plan, model))
        metrics = {k: spread([d[k] for d in draws]) for k in SUMMARY_METRICS}
        metrics["cr"] = spread([cr] * len(draws))
        seeds = tuple(
            getattr(getattr(p, "scoring", None), "seed", None) for p in row["draws"]
        )
        overlap = selection_overlap([_selections_of(r) for r in records])  # type: ignore[arg-type]
        spec = getattr(row["draws"][0], "scoring", None)
        scoring = None if spec is None else {
            "samples_per_group": spec.samples_per_group,
            "sizes": records[0].get("scoring_sizes"),  # type: ignore[union-attr]
        }
        out.append(
            SweepRow(
                index=i,
                kind=row["kind"],
                method=method,
                settings=settings,
                status="ok",
                plan=plan,
                seeds=seeds if any(s is not None for s in seeds) else (),
                metrics=metrics,
                draws=draws,
                overlap=overlap,
                reference=row.get("reference"),
                scoring=scoring,
            )
        )
    return out


# --------------------------------------------------------------------------- selection


def _constraint_status(
    row: SweepRow, selection: Selection, vanilla: SweepRow, by_index: Mapping[int, SweepRow]
) -> str:
    """``ok``, or ``violated: `` and each constraint ``row`` fails with its value and
    bound (references: the vanilla row and the point's truncated-SVD row)."""
    failed = []
    for c in selection.constraints:
        refs = {"vanilla": vanilla.value(c.metric)}
        if row.reference is not None:
            refs["svd"] = by_index[row.reference].value(c.metric)
        value = row.value(c.metric)
        if not c.holds(value, refs):
            shown = "undefined" if value is None else f"{value:.4f}"
            bound = c.bound(refs)
            limit = "undefined" if bound is None else f"{bound:.4f}"
            failed.append(f"{c.text} ({c.metric} {shown}, bound {limit})")
    return "ok" if not failed else "violated: " + "; ".join(failed)


def apply_selection(
    rows: Sequence[SweepRow],
    selection: Selection | None,
    *,
    guard: bool = True,
    tolerance: float | None = None,
    class_names: Sequence[str],
    group_names: Sequence[str],
) -> tuple[list[SweepRow], SweepRow | None, str]:
    """Mark every row's guard and constraint status and pick the selected point.

    The rule reads each metric's median over draws; the collapse guard checks every
    draw (see :mod:`fairdeploy.sweep._select`). Candidates are the valid grid points
    that pass the guard (unless it is off) and every constraint; the chosen one has the
    best objective, ties going to the higher C.R., then to the earlier row.

    Returns
    -------
    rows : list of SweepRow
        With ``guard``, ``constraint`` and ``chosen`` filled in.
    chosen : SweepRow or None
        None when no rule was given or no point qualifies.
    message : str
        What happened, in one sentence (why nothing was chosen, when nothing was).
    """
    by_index = {r.index: r for r in rows}
    vanilla = next(r for r in rows if r.kind == "vanilla")
    tol = tolerance if tolerance is not None else (
        selection.guard_tolerance() if selection is not None else 0.01
    )
    marked: list[SweepRow] = []
    for row in rows:
        if row.status != "ok" or row.kind == "vanilla":
            marked.append(dataclasses.replace(row, guard="n/a"))
            continue
        if not guard:
            status = "off"
        else:
            reasons = guard_reasons(
                row.draws, vanilla.draws[0], tolerance=tol, class_names=class_names,
                group_names=group_names, seeds=row.seeds or None,
            )
            status = "ok" if not reasons else "; ".join(reasons)
        constraint = ""
        if selection is not None and row.kind == "point":
            constraint = _constraint_status(row, selection, vanilla, by_index)
        marked.append(dataclasses.replace(row, guard=status, constraint=constraint))
    if selection is None:
        return marked, None, ""
    points = [r for r in marked if r.kind == "point"]
    valid = [r for r in points if r.status == "ok"]
    guarded = [r for r in valid if r.guard in ("ok", "off")]
    feasible = [
        r for r in guarded if r.constraint == "ok" and r.value(selection.metric) is not None
    ]
    if not feasible:
        meeting = [r for r in guarded if r.constraint == "ok"]
        undefined = len(meeting) - len(feasible)
        message = (
            f"no point satisfies {selection.text!r}: {len(points)} points, "
            f"{len(points) - len(valid)} invalid for this model, "
            f"{len(valid) - len(guarded)} rejected by the collapse guard, "
            f"{len(guarded) - len(meeting)} violating the constraints"
            + (
                f", {undefined} with {selection.metric} undefined on the validation split "
                "(e.g. a group with no sample of some class: a larger validation split, or "
                "another objective)"
                if undefined else ""
            )
            + " (see the guard and constraint columns of sweep.csv)"
        )
        return marked, None, message
    sign = 1.0 if selection.goal == "min" else -1.0
    best = min(
        feasible,
        key=lambda r: (sign * r.value(selection.metric), -(r.value("cr") or 0.0), r.index),  # type: ignore[operator]
    )
    out = [dataclasses.replace(r, chosen=r.index == best.index) for r in marked]
    chosen = out[best.index]
    return out, chosen, (
        f"chosen on the validation split: {chosen.method} {describe_settings(chosen.settings)} "
        f"({selection.goal} {selection.metric} = {chosen.value(selection.metric):.4f} among "
        f"{len(feasible)} qualifying points of {len(points)})"
    )


def describe_settings(settings: Mapping[str, Any]) -> str:
    """``layer=…, k=…, sr=…, rr=…, β=…`` (settings that apply only)."""
    names = {"layer": "layer", "rank": "k", "sr": "sr", "rr": "rr", "beta": "β"}
    parts = []
    for key, label in names.items():
        value = settings.get(key)
        if value is None:
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{label}={text}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- test split


def test_comparison(
    exp: Any, chosen: SweepRow, reference: SweepRow, selection: Selection, *, seed: int = 0
) -> dict[str, Any]:
    """The chosen point evaluated once on the test split, against vanilla and against
    truncated SVD at the same layers and ranks, with paired bootstrap intervals.

    The chosen plan is applied with its first scoring draw (what ``optimize`` of the
    written recipe deploys). Returns the processed models, test metrics and both
    bootstrap comparisons, and a plain verdict on the rule's objective against
    truncated SVD (significant or not).
    """
    ctx = exp.context
    assert chosen.plan is not None and reference.plan is not None
    runs = {
        "vanilla": exp.apply(Plan("vanilla")),
        "truncated_svd": exp.apply(reference.plan),
        "chosen": exp.apply(chosen.plan),
    }
    preds = {name: exp.predictions(p, "test") for name, p in runs.items()}
    labels, groups = exp.labels("test")
    common = {"privileged": ctx.privileged, "num_classes": len(ctx.class_names), "seed": seed}
    vs_vanilla = bootstrap_metrics(labels, preds, groups, baseline="vanilla", **common)
    vs_svd = bootstrap_metrics(
        labels, {k: preds[k] for k in ("truncated_svd", "chosen")}, groups,
        baseline="truncated_svd", **common,
    )
    verdict = _verdict(selection, vs_svd.differences["chosen"], "truncated SVD at the same rank")
    verdict_vanilla = _verdict(selection, vs_vanilla.differences["chosen"], "vanilla")
    return {
        "runs": runs,
        "predictions": preds,
        "metrics": {name: exp.evaluate(p, "test") for name, p in runs.items()},
        "bootstrap_vs_vanilla": vs_vanilla,
        "bootstrap_vs_svd": vs_svd,
        "verdict": verdict,
        "verdict_vs_vanilla": verdict_vanilla,
    }


def _verdict(selection: Selection, diffs: Mapping[str, Any], against: str) -> dict[str, Any]:
    """The rule's objective against ``against`` in a sentence, then how every metric the
    rule constrains moved (``better`` / ``worse`` / ``not significant``): a significant gain
    on the objective may stand beside a significant loss on a constrained metric."""
    metric = selection.metric
    moves = _moves(selection, diffs)
    if metric not in BOOTSTRAP_METRICS:
        return {
            "metric": metric,
            "significant": None,
            "moves": moves,
            "text": f"the objective {metric} has no bootstrap interval (intervals cover "
            f"{', '.join(BOOTSTRAP_METRICS)}): compare the test table with {against} by eye"
            + _moves_text(moves, metric),
        }
    d = diffs[metric]
    better = d.value is not None and (d.value < 0 if selection.goal == "min" else d.value > 0)
    interval = _interval(metric, d)
    if d.significant and better:
        text = f"the chosen point is significantly better than {against} on test ({interval})"
    elif d.significant:
        text = f"the chosen point is significantly WORSE than {against} on test ({interval})"
    else:
        text = (
            f"the chosen point is NOT significantly better than {against} on test "
            f"({interval}: the 95 % interval contains 0)"
        )
    return {
        "metric": metric,
        "difference": d.to_dict(),
        "significant": bool(d.significant),
        "better": bool(better),
        "moves": moves,
        "text": text + _moves_text(moves, metric),
    }


def _interval(metric: str, d: Any) -> str:
    if d.value is not None and d.low is not None and not math.isnan(d.low):
        return f"Δ {metric} {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
    return f"Δ {metric} undefined"


def _moves(selection: Selection, diffs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per metric of the rule (objective first, then each constrained one, once): its
    direction in words, from the paired interval. Fairness gaps are better lower."""
    out = []
    for metric in dict.fromkeys([selection.metric, *(c.metric for c in selection.constraints)]):
        d = diffs.get(metric) if metric in BOOTSTRAP_METRICS else None
        if d is None:
            out.append({"metric": metric, "direction": None,
                        "text": f"{metric}: no bootstrap interval"})
            continue
        if d.significant and d.value is not None:
            went_down = d.high < 0
            direction = "better" if went_down == (metric in LOWER_IS_BETTER) else "worse"
        else:
            direction = "not significant"
        out.append({"metric": metric, "direction": direction,
                    "text": f"{metric} {direction} ({_interval(metric, d)})"})
    return out


def _moves_text(moves: Sequence[Mapping[str, Any]], objective: str) -> str:
    rest = [m["text"] for m in moves if m["metric"] != objective]
    return "; constrained: " + "; ".join(rest) if rest else ""
