"""Assembling the report dict (report.json) from an experiment's results.

Every block is built from values (the :class:`~fairdeploy.experiment.Experiment`, plans,
metrics, predictions); ``report.md`` and the terminal render the same dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy import __version__
from fairdeploy._json import json_float
from fairdeploy._text import plural
from fairdeploy.export._sizes import size_ratios
from fairdeploy.metrics import (
    LOWER_IS_BETTER,
    SUMMARY_METRICS,
    GroupMetrics,
    bootstrap_metrics,
    selection_overlap,
    spread,
    summary_metrics,
)
from fairdeploy.plan import Plan

__all__ = [
    "accuracy_summary",
    "base_report",
    "bootstrap_block",
    "change_direction",
    "collapse_reasons",
    "draws_block",
    "latency_block",
    "method_entry",
    "packing_block",
    "plan_notes",
    "prediction_notes",
    "rank_bootstrap_block",
    "rank_pairs",
    "single_class_note",
    "size_ratios",
    "skipped_in_words",
    "verify_summary",
]

# Below this many test samples in a group, group rates are too noisy to audit.
_FEW_SAMPLES = 30


def accuracy_summary(
    metrics: GroupMetrics, y_true: Any, y_pred: Any
) -> dict[str, Any]:
    """Accuracy beside the group metrics: over every sample of the split (``overall``,
    unknown-group samples included), and the mean (``avg``) and absolute difference
    (``diff``) of the two groups' accuracies, like precision/recall/F1."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    a0, a1 = metrics.accuracy
    return {
        "overall": json_float(np.mean(y_true == y_pred)) if len(y_true) else None,
        "samples": len(y_true),
        "avg": json_float((a0 + a1) / 2),
        "diff": json_float(abs(a0 - a1)),
    }


def method_entry(
    exp: Any,
    name: str,
    plan: Plan,
    metrics: GroupMetrics,
    *,
    metrics_val: GroupMetrics | None = None,
    predictions: Mapping[str, np.ndarray] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """One method's block: its plan, label, metrics and theoretical compression.

    ``predictions`` (split → predicted class ids) adds ``accuracy`` (split →
    :func:`accuracy_summary`); ``metrics`` stays ``GroupMetrics.to_dict()``, whose
    groups carry their own accuracy. ``warnings`` are the
    things a reader must know next to this method's numbers (rank above break-even,
    β ≥ 1, a single predicted class, an approximate Hessian).
    """
    model = exp.model
    impl = plan.implementation
    entry: dict[str, Any] = {
        "name": name,
        "method": plan.method,
        "label": impl.describe(plan),
        "plan": plan.to_dict(),
        "metrics": metrics.to_dict(),
        "warnings": list(warnings),
        "compression": {
            "theoretical_cr": impl.theoretical_cr(plan, model),
            # What an exported graph stores (e.g. S as k values, not k×k).
            "theoretical_cr_stored": impl.stored_cr(plan, model),
            "layers": impl.layer_table(plan, model),
        },
    }
    if metrics_val is not None:
        entry["metrics_val"] = metrics_val.to_dict()
    by_split = {"test": metrics, "val": metrics_val}
    if predictions is not None:
        entry["accuracy"] = {
            split: accuracy_summary(m, exp.labels(split)[0], predictions[split])
            for split, m in by_split.items()
            if m is not None and split in predictions
        }
        entry["class_rates"] = {
            split: _class_rates(exp, split, predictions[split], metrics.num_classes)
            for split, m in by_split.items()
            if m is not None and split in predictions
        }
    return entry


def _class_rates(exp: Any, split: str, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """What the collapse guard reads: balanced accuracy over the split and, per group,
    the fraction of its samples predicted as each class."""
    labels, groups = exp.labels(split)
    summary = summary_metrics(labels, y_pred, groups, num_classes=num_classes)
    return {
        "balanced_accuracy": json_float(summary["balanced_accuracy"]),
        "predicted_rates": [[json_float(r) for r in row] for row in summary["predicted_rates"]],
    }


def collapse_reasons(
    report: Mapping[str, Any], split: str = "val", *, tolerance: float | None = None
) -> dict[str, list[str]]:
    """Per method of a compare report (vanilla left out): why it looks collapsed on
    ``split``, empty when it does not.

    A model that predicts one class for every sample of both groups comes first (its
    fairness gaps are 0 and mean nothing); then the sweep's collapse guard against the
    report's vanilla row: accuracy or balanced accuracy more than ``tolerance`` (default
    the guard's 0.01) below vanilla's, or a group predicting a class at under half of
    vanilla's rate. Methods without ``class_rates`` (reports written before them) get
    only the accuracy check.
    """
    from fairdeploy.sweep import DEFAULT_GUARD_TOLERANCE, guard_reasons

    tol = DEFAULT_GUARD_TOLERANCE if tolerance is None else tolerance
    methods = report["methods"]
    vanilla = next((m for m in methods if m["name"] == "vanilla"), None)
    task = report.get("task", {})
    class_names = [str(c) for c in task.get("class_names", [])]
    group_names = [str(g) for g in task.get("group_names", ["0", "1"])]
    if vanilla is None:
        return {}
    out = {}
    for m in methods:
        if m is vanilla:
            continue
        rates = m.get("class_rates", {}).get(split)
        reasons = []
        single = _single_class(rates, class_names)
        if single is not None:
            reasons.append(f"predicts only class {single!r} on the {split} split")
        summary, ref = _guard_inputs(m, split), _guard_inputs(vanilla, split)
        if summary and ref:
            names = class_names or [str(k) for k in range(len(summary["predicted_rates"][0]))]
            reasons += guard_reasons([summary], ref, tolerance=tol, class_names=names,
                                     group_names=group_names)
        out[m["name"]] = reasons
    return out


def _single_class(rates: Mapping[str, Any] | None, class_names: Sequence[str]) -> str | None:
    """The class every sample of every group (with samples) is predicted as, else None."""
    rows = [row for row in (rates or {}).get("predicted_rates") or [] if row and None not in row]
    if not rows:
        return None
    common = set.intersection(*({k for k, r in enumerate(row) if r == 1.0} for row in rows))
    if len(common) != 1:
        return None
    k = common.pop()
    return class_names[k] if k < len(class_names) else str(k)


def _guard_inputs(method: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    acc = method.get("accuracy", {}).get(split)
    if acc is None:
        return None
    rates = method.get("class_rates", {}).get(split, {})
    return {
        "accuracy": acc.get("overall"),
        "balanced_accuracy": rates.get("balanced_accuracy"),
        "predicted_rates": rates.get("predicted_rates"),
    }


def _scoring_block(plan: Plan, ctx: Any) -> dict[str, Any] | None:
    spec = getattr(plan, "scoring", None)
    if spec is None:
        return None
    resolved = ctx.resolve_sampling(spec)
    sizes = ctx.scoring_sizes(spec)  # no trunk pass: a method may never need the features
    per_group = min(sizes)
    every = resolved.samples_per_group == "all"
    if every:
        how = (
            "every training sample of each group"
            + (" (auto: the training inputs are in memory, so this is cheap)"
               if spec.samples_per_group == "auto" else "")
        )
    else:
        how = f"a seeded draw of {per_group} per group" + (
            " (auto: 1024 per group for data read from files)"
            if spec.samples_per_group == "auto" else ""
        )
    return {
        "method": plan.method,
        **spec.model_dump(mode="json"),
        "samples_per_group": "all" if every else per_group,
        "samples_per_group_asked": spec.samples_per_group,
        "group_sizes": list(sizes),
        "draws": len(resolved.draw_seeds),
        "how": how,
        "split": "train",
    }


def base_report(exp: Any, recipe_path: str | Path | None, main: Plan) -> dict[str, Any]:
    """The run's header: versions, inputs, task, split sizes, scoring, cache, notes."""
    from fairdeploy.recipe import recipe_hash

    ctx = exp.context
    test = ctx.features["test"]
    report: dict[str, Any] = {
        "fairdeploy_version": __version__,
        "checkpoint": {
            "path": str(exp.checkpoint) if exp.checkpoint is not None else "(in memory)",
            "sha256": exp.checkpoint_sha256,
        },
        "recipe": {
            "path": str(recipe_path) if recipe_path is not None else "(in memory)",
            "hash": recipe_hash(exp.recipe),
        },
        "task": {
            "num_classes": len(ctx.class_names),
            "class_names": ctx.class_names,
            "group_names": ctx.group_names,
            "privileged": ctx.privileged_info,
        },
        "evaluation": {
            "split": "test",
            "samples": len(test),
            "unknown_group": int((test.groups < 0).sum()),
        },
        "feature_cache": {"hits": ctx.cache_hits, "first_layer": ctx.first_layer},
        "data": {
            name: {
                "samples": len(ds),
                "skipped": dict(getattr(ds, "skipped", {}) or {}),
                "group_counts": {
                    g: int((np.asarray(ds.groups) == i).sum())
                    for i, g in enumerate(ctx.group_names)
                }
                | {"unknown": int((np.asarray(ds.groups) < 0).sum())},
            }
            for name, ds in ctx.splits.items()
        },
        "notes": _notes(ctx),
        "units": {
            "accuracy": "fraction in [0, 1]: right predictions / samples",
            "precision/recall/f1": "fraction in [0, 1], macro over classes within a group",
            "eopp0/eopp1/eodd": "fraction, mean over classes (EOdd halved); see fairness_sum",
            "cr": "ratio vanilla / processed (×)",
            "latency": "milliseconds per batch",
            "bytes": "bytes",
        },
    }
    scoring = _scoring_block(main, ctx)
    if scoring is not None:
        report["scoring"] = scoring
    return report


def plan_notes(exp: Any, plans: Sequence[Plan]) -> list[str]:
    """Warnings the plans' methods raise from shapes (rank above break-even, β ≥ 1) and
    the scoring sets that came out smaller than asked."""
    notes: list[str] = []
    for plan in plans:
        impl = plan.implementation
        for text in impl.warnings(plan, exp.model):
            if text not in notes:
                notes.append(text)
        spec = getattr(plan, "scoring", None)
        asked = None if spec is None else exp.context.resolve_sampling(spec).samples_per_group
        if isinstance(asked, int):
            got = exp.context.scoring_per_group(spec)
            if got < asked:
                text = (
                    f"the scoring sets hold {plural(got, 'sample')} per group, fewer than the "
                    f"{asked:,} asked for (capped by the smaller group in the "
                    "training split): the scores behind the selection are noisier"
                )
                if text not in notes:
                    notes.append(text)
    return notes


def _notes(ctx: Any) -> list[str]:
    """Warnings about the data a reader of the report must see next to the numbers."""
    notes = []
    test = ctx.features["test"]
    for gid, name in enumerate(ctx.group_names):
        n = int((test.groups == gid).sum())
        if n < _FEW_SAMPLES:
            notes.append(
                f"only {plural(n, 'test sample')} in group {name!r}: its rates and the "
                "fairness gaps are dominated by sampling noise"
            )
    for split, ds in ctx.splits.items():
        skipped = dict(getattr(ds, "skipped", {}) or {})
        if sum(skipped.values()):
            notes.append(
                f"{plural(sum(skipped.values()), 'sample')} of the {split} split "
                f"{'was' if sum(skipped.values()) == 1 else 'were'} skipped "
                f"({skipped_in_words(skipped)})"
            )
    if "tie" in ctx.privileged_info["how"]:
        notes.append(f"privileged group: {ctx.privileged_info['how']}")
    return notes


_SKIP_REASONS = {
    "missing_image": ("missing image file", "missing image files"),
    "bad_image": ("unreadable image", "unreadable images"),
}


def skipped_in_words(skipped: Mapping[str, int]) -> str:
    """``{"missing_image": 3, "bad_image": 1}`` → ``3 missing image files, 1 unreadable image``."""
    parts = []
    for key, n in skipped.items():
        if n:
            one, many = _SKIP_REASONS.get(key, (key.replace("_", " "),) * 2)
            parts.append(plural(n, one, many))
    return ", ".join(parts)


def single_class_note(name: str, preds: np.ndarray, class_names: Sequence[str] = ()) -> str | None:
    """The warning for a model that predicts one class on every test sample, else None."""
    values = np.unique(preds)
    if len(values) != 1:
        return None
    k = int(values[0])
    cls = f" ({class_names[k]!r})" if k < len(class_names) else ""
    return (
        f"{name} predicts a single class{cls} on every test sample: its fairness gaps are "
        "not evidence of fairness (a constant prediction has equal rates in both groups)"
    )


def prediction_notes(preds: Mapping[str, np.ndarray]) -> list[str]:
    """A warning for every method that predicts one class on every test sample."""
    return [t for name, p in preds.items() if (t := single_class_note(name, p)) is not None]


def change_direction(metric: str, difference: Mapping[str, Any]) -> str:
    """A paired difference in words: ``better``, ``worse`` or ``not significant``.

    Fairness gaps (EOpp0, EOpp1, EOdd) are better lower; precision, recall and accuracy
    better higher. Significant means the paired interval excludes 0.
    """
    low, high = difference.get("low"), difference.get("high")
    if not difference.get("significant") or low is None or high is None:
        return "not significant"
    went_down = high < 0
    return "better" if went_down == (metric in LOWER_IS_BETTER) else "worse"


def bootstrap_block(exp: Any, preds: Mapping[str, np.ndarray], *, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap intervals of every method's test-split predictions vs vanilla."""
    ctx = exp.context
    test = ctx.features["test"]
    block = bootstrap_metrics(
        test.targets.numpy(),
        dict(preds),
        test.groups.numpy(),
        baseline="vanilla",
        privileged=ctx.privileged,
        num_classes=len(ctx.class_names),
        seed=seed,
    ).to_dict()
    block["lower_is_better"] = sorted(LOWER_IS_BETTER)
    for per in block["differences"].values():
        for metric, diff in per.items():
            diff["direction"] = change_direction(metric, diff)
    return block


def draws_block(
    exp: Any, runs: Sequence[Any], *, splits: Sequence[str] = ("test",)
) -> dict[str, Any]:
    """How much one plan's result depends on its scoring draw.

    ``runs`` are the :class:`~fairdeploy.methods.Processed` of the plan's draws
    (:meth:`~fairdeploy.Experiment.draws`), the applied draw first. Gives, per split,
    the median, minimum and maximum over draws of every summary metric, and the overlap
    (Jaccard) of the rows/columns the draws selected.
    """
    ctx = exp.context
    seeds = [getattr(getattr(r.plan, "scoring", None), "seed", None) for r in runs]
    block: dict[str, Any] = {
        "draws": len(runs),
        "seeds": seeds,
        "applied_seed": seeds[0],
        "note": "the model is applied with the first draw; the others measure how much the "
        "numbers depend on which training samples formed the scoring sets",
        "metrics": {},
        "selection_overlap": selection_overlap([r.selections for r in runs]),
    }
    for split in splits:
        labels, groups = exp.labels(split)
        per = [
            summary_metrics(
                labels,
                exp.predictions(r, split),
                groups,
                privileged=ctx.privileged,
                num_classes=len(ctx.class_names),
            )
            for r in runs
        ]
        block["metrics"][split] = {m: spread([p[m] for p in per]) for m in SUMMARY_METRICS}
    return block


def rank_pairs(plans: Mapping[str, Plan]) -> dict[str, dict[str, Any]]:
    """Which truncated-SVD row (a method with ``rank_baseline``) each row is compared with.

    A row that factorizes layers is paired with the baseline row of exactly the same
    ``(layer, rank)`` list (none if there is no such row); a row that factorizes nothing
    (vanilla, FairPrune, FairQuantize) with the first baseline row.

    Parameters
    ----------
    plans : mapping of str to Plan
        Row name → plan, in table order.

    Returns
    -------
    dict
        ``{row: {"baseline": baseline row name, "same_ranks": bool}}`` for every paired
        row (the baseline rows themselves are not listed); empty without a baseline row.
    """
    bases = {
        name: p.implementation.ranks(p)
        for name, p in plans.items()
        if p.implementation.rank_baseline
    }
    if not bases:
        return {}
    first = next(iter(bases))
    out: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        if name in bases:
            continue
        ranks = plan.implementation.ranks(plan)
        if not ranks:
            out[name] = {"baseline": first, "same_ranks": False}
            continue
        match = [b for b, r in bases.items() if r == ranks]
        if match:
            out[name] = {"baseline": match[0], "same_ranks": True}
    return out


def rank_bootstrap_block(
    exp: Any, preds: Mapping[str, np.ndarray], plans: Mapping[str, Plan], *, seed: int = 0
) -> dict[str, Any] | None:
    """Paired bootstrap differences of every row against truncated SVD at the same ranks.

    Parameters
    ----------
    exp : Experiment
        The prepared experiment (test labels, groups, privileged group).
    preds : mapping of str to ndarray
        Row name → predicted class ids on the test split.
    plans : mapping of str to Plan
        Row name → plan (:func:`rank_pairs` reads them).
    seed : int
        Resampling seed: the same as :func:`bootstrap_block`'s gives the same resamples.

    Returns
    -------
    dict or None
        ``pairs`` (:func:`rank_pairs`), ``differences`` (row → metric → paired difference
        against its baseline row, as in :func:`bootstrap_block`), ``unpaired`` (low-rank
        rows with no truncated SVD at their ranks), ``n_resamples``, ``confidence``,
        ``seed``; None when no row is a truncated SVD.
    """
    pairs = rank_pairs(plans)
    if not pairs:
        return None
    ctx = exp.context
    test = ctx.features["test"]
    unpaired = [
        n for n, p in plans.items() if n not in pairs and not p.implementation.rank_baseline
    ]
    out: dict[str, Any] = {"pairs": pairs, "differences": {}, "unpaired": unpaired}
    for base in dict.fromkeys(p["baseline"] for p in pairs.values()):
        members = [n for n, p in pairs.items() if p["baseline"] == base]
        res = bootstrap_metrics(
            test.targets.numpy(),
            {base: preds[base], **{m: preds[m] for m in members}},
            test.groups.numpy(),
            baseline=base,
            privileged=ctx.privileged,
            num_classes=len(ctx.class_names),
            seed=seed,
        ).to_dict()
        out["differences"].update({m: res["differences"][m] for m in members})
        out.update(
            n_resamples=res["n_resamples"], confidence=res["confidence"], seed=res["seed"]
        )
    for per in out["differences"].values():
        for metric, diff in per.items():
            diff["direction"] = change_direction(metric, diff)
    return out


def packing_block(
    pack: Any, stored_cr: float, measured: Mapping[str, float]
) -> dict[str, Any]:
    """The report's block for a packed export (:class:`~fairdeploy.export.PackReport`):
    per tensor how it is stored, the theoretical C.R. with one mask bit per chosen weight,
    the measured ratios and their fraction of that theory."""
    tensors = [
        {
            k: t[k]
            for k in ("parameter", "stored", "reason", "entries", "zero", "int8", "float",
                      "bits_per_entry")
        }
        for t in pack.to_dict()["tensors"]
    ]
    return {
        "format": "bit mask + compact int8/float values, rebuilt by a constant subgraph "
                  "ONNX Runtime folds when a session loads",
        "tensors": tensors,
        "packed_tensors": sum(t["stored"] == "packed" for t in tensors),
        "theoretical_cr_with_mask": stored_cr,
        "measured_initializer_cr": measured["initializer_cr"],
        "measured_file_cr": measured["file_cr"],
        "fraction_of_theory": measured["initializer_cr"] / stored_cr,
        "initializer_bytes": [pack.initializer_bytes_before, pack.initializer_bytes_after],
        "load_note": (
            "inference runs the dense export's MatMul/Conv on the same weights, but creating "
            "an ONNX Runtime session folds the rebuild: measured 5-14x slower session creation "
            "than the dense model on vgg11_paper (keep the session, or save the folded model "
            "once with optimized_model_filepath)"
        ),
    }


def verify_summary(vres: Any, tolerances: Any, n: int | None = None) -> dict[str, Any]:
    """The report's verification block from a :class:`~fairdeploy.verification.VerifyResult`
    or a :class:`~fairdeploy.verification.RuntimesResult` (several runtimes).

    ``samples`` is the number of inputs really compared (the result's ``n_samples``); when
    ``n`` (the inputs asked for, e.g. ``export.verify_samples``) differs, it is kept as
    ``samples_requested``. ``runtimes`` gives each runtime's verdict, ``verified_in`` those
    that passed; the errors are the worst over every runtime.
    """
    results = getattr(vres, "results", None) or {getattr(vres, "runtime", "onnxruntime"): vres}
    first = next(iter(results.values()))
    outs = [o for r in results.values() for o in r.outputs]
    block = {
        "passed": bool(vres),
        "samples": first.n_samples,
        "atol": tolerances.atol,
        "rtol": tolerances.rtol,
        # A non-finite error (outputs that are not finite) is null, as JSON has no inf.
        "max_abs_error": json_float(max((o.max_abs_error for o in outs), default=0.0)),
        "argmax_agreement": min((o.argmax_agreement for o in outs), default=1.0),
        "verified_in": [rt for rt, r in results.items() if r],
        "runtimes": {
            rt: {
                "passed": bool(r),
                "version": getattr(r, "runtime_version", ""),
                "device": r.provider,
                "max_abs_error": json_float(
                    max((o.max_abs_error for o in r.outputs), default=0.0)
                ),
                "argmax_agreement": min((o.argmax_agreement for o in r.outputs), default=1.0),
            }
            for rt, r in results.items()
        },
        "details": vres.to_dict(),
    }
    if n is not None and n != first.n_samples:
        block["samples_requested"] = n
    return block


def latency_block(results: Sequence[tuple[str, Any]], warmup: int) -> dict[str, Any]:
    """The report's latency rows from ``(scope, LatencyResult)`` pairs timed in one run."""
    rows = []
    for scope, res in results:
        for t in sorted(res.timings, key=lambda t: (t.batch, t.model != "baseline")):
            candidate = t.model == "candidate"
            rows.append(
                {
                    "scope": scope,
                    "model": "processed" if candidate else "vanilla",
                    "batch": t.batch,
                    "median_ms": t.median_ms,
                    "p90_ms": t.p90_ms,
                    "iters": t.iters,
                    "speedup": res.ratios.get(t.batch) if candidate else None,
                }
            )
    first = results[0][1]
    how = (
        "timed interleaved (one run of each in turn, so load changes hit both alike)"
        if first.mode == "interleaved"
        else "each timed alone"
    )
    return {
        "provider": first.provider,
        "threads": first.threads if first.threads is not None else "ONNX Runtime default",
        "note": (
            f"vanilla and processed {how}, worker-thread spinning "
            f"{'on' if first.spinning else 'off'}, after up to {warmup} warm-up runs"
        ),
        "rows": rows,
        "skipped": [
            {"scope": scope, "batch": batch, "why": why}
            for scope, res in results
            for batch, why in getattr(res, "skipped", {}).items()
        ],
    }
