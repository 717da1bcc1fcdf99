"""Evaluating plans into rows: apply each plan to the model, measure it, keep its notes.

``optimize`` and ``compare`` both turn their plans into :class:`_Rows` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.commands._common import Echo, _seed, warnings_as_notes
from fairdeploy.experiment import Experiment
from fairdeploy.methods import Processed
from fairdeploy.metrics import GroupMetrics
from fairdeploy.plan import Plan
from fairdeploy.report import (
    base_report,
    bootstrap_block,
    draws_block,
    method_entry,
    plan_notes,
    rank_bootstrap_block,
    single_class_note,
)


@dataclass
class _Rows:
    """Every plan applied and evaluated, vanilla first, and the report's method table."""

    names: list[str]
    processed: list[Processed]
    metrics: dict[str, GroupMetrics]
    metrics_val: dict[str, GroupMetrics]
    report: dict[str, Any]


def _evaluate_plans(
    exp: Experiment,
    recipe_path: Path,
    main: Plan,
    plans: list[Plan],
    echo: Echo,
    *,
    validation: bool = False,
    notes: list[str] | None = None,
) -> _Rows:
    """Apply every plan after vanilla and build the report's method table.

    Every method's warnings (from its plan's shapes, its scoring sets, what it did, the
    Python warnings it raised, a single predicted class) go into its own entry and into
    the run's ``notes``. A plan with ``scoring.repeats > 1`` is also applied with every
    other scoring draw, and its entry gets the spread over draws (the table's model is
    the first draw).
    """
    report = base_report(exp, recipe_path, main)
    report["notes"] += notes or []
    rows: dict[str, Processed] = {"vanilla": exp.apply(Plan("vanilla"))}
    method_notes: dict[str, list[str]] = {"vanilla": []}
    draws: dict[str, list[Plan]] = {}
    for plan in plans:
        if plan.method == "vanilla":
            continue
        name, i = plan.method, 2
        while name in rows:
            name, i = f"{plan.method}-{i}", i + 1
        if len(plans) > 1:
            echo(f"running {name} ...")
        static = plan_notes(exp, [plan])
        with warnings_as_notes(covered=static, run_notes=report["notes"]) as caught:
            draws[name] = exp.draws(plan)  # before apply: all draws' scoring sets in one pass
            rows[name] = exp.apply(plan)
        method_notes[name] = _unique([*static, *rows[name].notes, *caught])
    splits = ("test", "val") if validation else ("test",)
    preds = {
        name: {split: exp.predictions(p, split) for split in splits} for name, p in rows.items()
    }
    metrics = {name: exp.evaluate(p, "test") for name, p in rows.items()}
    metrics_val = {name: exp.evaluate(p, "val") for name, p in rows.items()} if validation else {}
    class_names = exp.context.class_names
    for name in rows:
        single = single_class_note(name, preds[name]["test"], class_names)
        if single is not None:
            method_notes[name].append(single)
    report["methods"] = [
        method_entry(
            exp, name, p.plan, metrics[name], metrics_val=metrics_val.get(name),
            predictions=preds[name], warnings=method_notes[name],
        )
        for name, p in rows.items()
    ]
    for entry in report["methods"]:
        others = draws.get(entry["name"], [])[1:]
        if others:
            echo(f"{entry['name']}: {len(others)} more scoring draws, for the spread ...")
            runs = [rows[entry["name"]], *(exp.apply(d) for d in others)]
            entry["draws"] = draws_block(exp, runs, splits=("val", "test") if validation
                                         else ("test",))
    report["bootstrap"] = bootstrap_block(
        exp, {name: pr["test"] for name, pr in preds.items()}, seed=_seed(main)
    )
    rank = rank_bootstrap_block(
        exp, {name: pr["test"] for name, pr in preds.items()},
        {n: p.plan for n, p in rows.items()}, seed=_seed(main),
    )
    if rank is not None:
        report["bootstrap_rank"] = rank
    several = len(rows) > 2
    for entry in report["methods"]:
        for text in entry["warnings"]:
            report["notes"].append(f"{entry['label']}: {text}" if several else text)
    report["notes"] = _unique(report["notes"])
    return _Rows(list(rows), list(rows.values()), metrics, metrics_val, report)


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))
