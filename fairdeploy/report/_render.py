"""report.md and the terminal text: renderings of the report dict (report.json).

The report is built from one JSON-serializable dict (``report.json``, with
``schema_version``); ``report.md`` and the terminal text are renderings of it, so
what the terminal shows is what the file says. Every figure names its unit and
convention in the column header or in the notes under the table; every number has a
fixed number of decimals (3 for fractions and ratios); every paired difference says
its direction in words (better, worse, not significant); a method's warnings stand
under the table that shows its numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fairdeploy._io import atomic_write_text
from fairdeploy._text import fixed, markdown_table, plural
from fairdeploy.report._build import collapse_reasons

__all__ = [
    "SCHEMA_VERSION",
    "fairness_table",
    "method_label",
    "render_markdown",
    "runtimes_text",
    "terminal_text",
    "validation_table",
    "write_report",
]

#: Version of report.json's layout; bumped on any incompatible change (keys are only
#: ever added within a version).
SCHEMA_VERSION = 1

#: How each bootstrap metric is named in tables, and whether lower is better.
_METRIC_NAMES = {
    "eopp1": "EOpp1",
    "eopp0": "EOpp0",
    "eodd": "EOdd",
    "avg_accuracy": "Avg. accuracy",
    "avg_precision": "Avg. precision",
    "avg_recall": "Avg. recall",
}
_LOWER_IS_BETTER = ("eopp0", "eopp1", "eodd")
#: Marks a method with warnings in the tables; the warnings follow the table.
WARNING_MARK = "⚠"


def method_label(method: Mapping[str, Any]) -> str:
    """The row label of a method entry: its method's label and settings (``label``)."""
    return str(method.get("label") or method["name"])


def _marked_label(method: Mapping[str, Any]) -> str:
    label = method_label(method)
    return f"{label} {WARNING_MARK}" if method.get("warnings") else label


_f = fixed


def _cr(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}×"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], fmt: str) -> str:
    # Numbers are already strings with fixed decimals: tabulate must not re-parse them
    # (it would print 0.850 as 0.85 and 1.000 as 1).
    if fmt == "github":
        return markdown_table(rows, header)
    return tabulate(rows, header, tablefmt=fmt, disable_numparse=True)


def _best_fairness(report: Mapping[str, Any], digits: int = 3) -> dict[str, str | None]:
    """Per fairness metric, the lowest value as displayed (None with fewer than 2 rows)."""
    if len(report["methods"]) < 2:
        return {}
    out: dict[str, str | None] = {}
    for key in ("eopp1", "eopp0", "eodd"):
        values = [m["metrics"]["fairness"][key] for m in report["methods"]]
        values = [v for v in values if v is not None and not math.isnan(v)]
        out[key] = _f(min(values), digits) if values else None
    return out


def fairness_table(
    report: Mapping[str, Any], *, bold: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper-style table (Tables 1–2 of the paper), with accuracy.

    One block per method: the unprivileged group, the privileged group, ``Avg.`` (mean
    of the two), ``Diff.`` (absolute difference) and ``All`` (accuracy over every test
    sample, unknown group included); fairness and compression figures stand on the
    block's first row. A method with warnings is marked ⚠. With ``bold`` (report.md), the
    best (lowest) EOpp1, EOpp0 and EOdd as displayed are in bold, as in the paper's
    tables (every row that reaches it, vanilla included).
    """
    best = _best_fairness(report) if bold else {}
    header = [
        "Method",
        "Group",
        "Accuracy",
        "Precision",
        "Recall",
        "F1",
        "EOpp1 ↓",
        "EOpp0 ↓",
        "EOdd ↓",
        "C.R. theory",
        "C.R. measured",
    ]
    rows: list[list[str]] = []
    for method in report["methods"]:
        block = _group_rows(method)
        block[0][0] = _marked_label(method)
        block[0] += _fairness_cells(method, best)
        for row in block[1:]:
            row += [""] * 5
        rows += block
    return header, rows


def _group_rows(method: Mapping[str, Any]) -> list[list[str]]:
    """A method's block without its label and fairness cells: per group (unprivileged
    first) accuracy, precision, recall and F1, then ``Avg.``, ``Diff.`` and ``All``."""
    m = method["metrics"]
    groups = m["groups"]
    order = [g for g in groups if not g["privileged"]] + [g for g in groups if g["privileged"]]
    acc = (method.get("accuracy") or {}).get("test") or {}
    block = []
    for g in order:
        tag = "priv." if g["privileged"] else "unpriv."
        block.append(
            [
                "",
                f"{g['name']} ({tag})",
                _f(g.get("accuracy")),
                _f(g["precision"]),
                _f(g["recall"]),
                _f(g["f1"]),
            ]
        )
    block.append(
        [
            "",
            "Avg.",
            _f(acc.get("avg")) if acc else "",
            _f(m["precision"]["avg"]),
            _f(m["recall"]["avg"]),
            _f(m["f1"]["avg"]),
        ]
    )
    block.append(
        [
            "",
            "Diff. ↓",
            _f(acc.get("diff")) if acc else "",
            _f(m["precision"]["diff"]),
            _f(m["recall"]["diff"]),
            _f(m["f1"]["diff"]),
        ]
    )
    if acc:
        block.append(["", f"All ({acc['samples']:,})", _f(acc.get("overall")), "", "", ""])
    return block


def _fairness_cells(method: Mapping[str, Any], best: Mapping[str, str | None]) -> list[str]:
    """EOpp1, EOpp0, EOdd (the best, as displayed, in bold) and C.R. theory / measured."""
    fairness = method["metrics"]["fairness"]
    comp = method.get("compression", {})
    measured = (comp.get("measured") or {}).get("initializer_cr")

    def fair(key: str) -> str:
        text = _f(fairness[key])
        return f"**{text}**" if best.get(key) is not None and text == best[key] else text

    return [
        fair("eopp1"),
        fair("eopp0"),
        fair("eodd"),
        _cr(comp.get("theoretical_cr")),
        _cr(measured),
    ]


def validation_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the validation-split table (``compare``): one row per method,
    the figures to choose a method and its settings on. Empty rows when absent."""
    header = [
        "Method",
        "Accuracy",
        "Avg. precision",
        "Avg. recall",
        "EOpp1 ↓",
        "EOpp0 ↓",
        "EOdd ↓",
        "C.R. theory",
    ]
    rows = []
    for m in report["methods"]:
        val = m.get("metrics_val")
        if not val:
            continue
        acc = ((m.get("accuracy") or {}).get("val") or {}).get("overall")
        rows.append(
            [
                _marked_label(m),
                _f(acc),
                _f(val["precision"]["avg"]),
                _f(val["recall"]["avg"]),
                _f(val["fairness"]["eopp1"]),
                _f(val["fairness"]["eopp0"]),
                _f(val["fairness"]["eodd"]),
                _cr(m.get("compression", {}).get("theoretical_cr")),
            ]
        )
    return header, rows


def _direction(metric: str, d: Mapping[str, Any]) -> str:
    """``better`` / ``worse`` / ``not significant`` (also for reports written before the
    direction was stored)."""
    if "direction" in d:
        return str(d["direction"])
    low, high = d.get("low"), d.get("high")
    if not d.get("significant") or low is None or high is None:
        return "not significant"
    return "better" if (high < 0) == (metric in _LOWER_IS_BETTER) else "worse"


def _delta(value: float | None, spec: str = ".3g") -> str:
    """A verification's largest error; ``None`` is what JSON holds for an error that is
    not finite (the model's outputs were not)."""
    return "not finite" if value is None else format(value, spec)


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _difference_text(metric: str, d: Mapping[str, Any]) -> str:
    if d.get("value") is None or d.get("low") is None:
        return "n/a"
    return f"{_signed(d['value'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _boot_metrics(boot: Mapping[str, Any]) -> list[str]:
    present = {
        m
        for part in ("intervals", "differences")
        for per in (boot.get(part) or {}).values()
        for m in per
    }
    return [m for m in _METRIC_NAMES if m in present]


def _interval_rows(report: Mapping[str, Any]) -> list[list[str]]:
    boot = report.get("bootstrap")
    if not boot:
        return []
    rows = []
    for method in report["methods"]:
        name = method["name"]
        per = boot["intervals"].get(name, {})
        diffs = boot["differences"].get(name, {})
        for metric in _boot_metrics(boot):
            ci = per.get(metric)
            if ci is None:
                continue
            better = "lower is better" if metric in _LOWER_IS_BETTER else "higher is better"
            row = [
                method_label(method),
                f"{_METRIC_NAMES[metric]} ({better})",
                f"{_f(ci['value'])} [{_f(ci['low'])}, {_f(ci['high'])}]",
            ]
            d = diffs.get(metric)
            row += ["—", "—"] if d is None else [_difference_text(metric, d), _direction(metric, d)]
            rows.append(row)
    return rows


def _difference_lines(report: Mapping[str, Any], key: str = "bootstrap") -> list[str]:
    """Per method, its paired differences against the baseline, in words: one line for
    the fairness gaps, one for accuracy, precision and recall. ``key="bootstrap_rank"``:
    against truncated SVD at the same ranks (compare)."""
    boot = report.get(key)
    if not boot or not boot.get("differences"):
        return []
    pct = round(100 * boot["confidence"])
    labels = {m["name"]: method_label(m) for m in report["methods"]}
    against = (
        "truncated SVD at the same layers and ranks"
        if key == "bootstrap_rank"
        else boot["baseline"]
    )
    lines = [
        f"Change against {against} on the test split (paired bootstrap, {pct} % "
        "intervals; fairness gaps are better lower, accuracy, precision and recall higher):"
    ]
    metrics = _boot_metrics(boot)
    for name, per in boot["differences"].items():
        pair = (boot.get("pairs") or {}).get(name)
        vs = ""
        if pair is not None:
            base = labels.get(pair["baseline"], pair["baseline"])
            vs = f" vs {base}" + ("" if pair.get("same_ranks", True) else " (no factorized layer)")
        lines.append(f"  {labels.get(name, name)}{vs}")
        for kind, group in (
            ("fairness", [m for m in metrics if m in _LOWER_IS_BETTER]),
            ("accuracy", [m for m in metrics if m not in _LOWER_IS_BETTER]),
        ):
            parts = [
                f"{_METRIC_NAMES[m]} {_difference_text(m, per[m])} {_direction(m, per[m])}"
                for m in group
                if m in per
            ]
            if parts:
                lines.append(f"    {kind}: " + "; ".join(parts))
    return lines


#: Metrics shown in the spread-over-draws table, in this order.
_DRAW_METRICS = ("avg_precision", "accuracy", "balanced_accuracy", "eopp1", "eodd")


def _spread_cell(sp: Mapping[str, Any] | None) -> str:
    if not sp or sp.get("median") is None:
        return "n/a"
    return f"{sp['median']:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]"


def _draws_terminal_lines(report: Mapping[str, Any]) -> list[str]:
    """Per method with several scoring draws: the median and range of its figures."""
    lines = []
    for method in report.get("methods", []):
        block = method.get("draws")
        if not block:
            continue
        for split, per in block["metrics"].items():
            parts = [
                f"{m} {_spread_cell(per.get(m))}"
                for m in ("eodd", "eopp1", "avg_precision")
                if per.get(m, {}).get("median") is not None
            ]
            lines.append(
                f"{method_label(method)} over {block['draws']} scoring draws ({split} split), "
                "median [min, max]: " + "; ".join(parts)
            )
    return lines


def draws_lines(report: Mapping[str, Any]) -> list[str]:
    """report.md lines of the spread over scoring draws (methods with ``repeats > 1``)."""
    rows, overlap = [], []
    for method in report["methods"]:
        block = method.get("draws")
        if not block:
            continue
        for split, per in block["metrics"].items():
            rows.append(
                [method_label(method), split, str(block["draws"])]
                + [_spread_cell(per.get(m)) for m in _DRAW_METRICS]
            )
        for layer, parts in block.get("selection_overlap", {}).items():
            overlap.append(
                f"- {method_label(method)}, layer `{layer}`: rows {parts['rows']['mean']:.2f} "
                f"(lowest pair {parts['rows']['min']:.2f}), columns {parts['cols']['mean']:.2f} "
                f"(lowest pair {parts['cols']['min']:.2f})"
            )
    if not rows:
        return []
    out = [
        "",
        "## Spread over scoring draws",
        "",
        "Median [min, max] over independent draws of the scoring sets (seeds `seed`, "
        "`seed + 1`, …). The model in the table above uses the first draw; this spread is "
        "what choosing other training samples for the scoring sets would change, which the "
        "bootstrap intervals over test samples do not show.",
        "",
        tabulate(
            rows,
            ["Method", "Split", "Draws", *(f"{m} median [min, max]" for m in _DRAW_METRICS)]),
    ]
    if overlap:
        out += [
            "",
            "Overlap of the sparsified rows/columns across draws (Jaccard, mean over pairs of "
            "draws; 1 = every draw chose the same):",
            "",
            *overlap,
        ]
    return out


def _latency_rows(report: Mapping[str, Any]) -> list[list[str]]:
    lat = report.get("latency")
    if not lat:
        return []
    rows = []
    for entry in lat.get("rows", []):
        rows.append(
            [
                entry["scope"],
                entry["model"],
                str(entry["batch"]),
                f"{entry['median_ms']:.3f}",
                f"{entry['p90_ms']:.3f}",
                str(entry.get("iters", "")),
                "" if entry.get("speedup") is None else f"{entry['speedup']:.2f}×",
            ]
        )
    return rows


def _layer_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for method in report["methods"]:
        for lt in method.get("compression", {}).get("layers", []):
            rows.append(
                [
                    method_label(method),
                    lt["name"],
                    str(lt["din"]),
                    str(lt["dout"]),
                    str(lt["k"]),
                    f"{lt['rows_sparsified']}/{lt['cols_sparsified']}",
                    str(lt["keep"]),
                    f"{lt['params_before']:,}",
                    f"{lt['params_after']:,}",
                    f"{lt['params_stored']:,}",
                ]
            )
    return rows


def _method_warnings(report: Mapping[str, Any], *, validation: bool = False) -> list[str]:
    """The ⚠ lines under a table: each marked method's warnings."""
    lines = []
    for m in report["methods"]:
        if validation and "metrics_val" not in m:
            continue
        for text in m.get("warnings", []):
            lines.append(f"{WARNING_MARK} {method_label(m)}: {text}")
    return lines


_TABLE_NOTE = (
    "Accuracy is the share of right predictions; precision, recall and F1 are macro "
    "averages over classes within each group (fractions, not %). `All` is the accuracy over "
    "every test sample, those of unknown group included. EOpp1 (the paper's \"EOpp\") = "
    "mean over classes of |ΔTPR|, EOpp0 = mean of |ΔTNR|, EOdd = mean of |ΔTPR + ΔFPR| / 2 — "
    "the convention of the paper's tables (report.json also has the sum convention of the "
    "paper's equations). EOdd's signed sum can cancel (a model that predicts positive more "
    "often for one group can score 0); EOpp1 is the unsigned TPR gap and EOpp0 the unsigned "
    "FPR gap (TNR = 1 − FPR), so read them beside it. C.R. theory is the paper's "
    "parameter-count ratio (S counted as k×k); C.R. measured is the ratio of ONNX "
    "initializer bytes, vanilla / processed."
)


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    task = report["task"]
    priv = task["privileged"]
    ev = report["evaluation"]
    out = [
        f"- checkpoint: `{report['checkpoint']['path']}` "
        f"(sha256 {report['checkpoint']['sha256'][:12]}…)",
        f"- recipe: `{report['recipe']['path']}` (hash {report['recipe']['hash'][:12]}…)",
        f"- task: {plural(task['num_classes'], 'class', 'classes')}; sensitive attribute "
        f"groups {', '.join(task['group_names'])}; privileged: **{priv['name']}** "
        f"({priv['how']})",
        f"- evaluated on the `{ev['split']}` split: {plural(ev['samples'], 'sample')} "
        f"({ev['unknown_group']:,} with unknown group left out of group metrics)",
    ]
    scoring = report.get("scoring")
    if scoring:
        out.append(
            f"- scoring sets of {scoring['method']}: "
            + (f"Hessian estimator `{scoring['estimator']}`, " if "estimator" in scoring else "")
            + (
                f"{scoring['how']} from `{scoring['split']}` ("
                + " + ".join(str(n) for n in scoring["group_sizes"]) + " samples)"
                if "how" in scoring
                else f"{plural(scoring['samples_per_group'], 'sample')} per group from "
                f"`{scoring['split']}`"
            )
            + f", seed {scoring['seed']}"
            + (f", {scoring['draws']} draws (seeds from {scoring['seed']})"
               if scoring.get("draws", 1) > 1 else "")
        )
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: warnings, the validation table (compare), the test table with accuracy,
    intervals and paired differences in words, per-layer compression, the deployed
    artifact, verification, latency."""
    out = ["# fairdeploy report", "", *_header_lines(report)]
    out += _run_warning_lines(report)
    out += _validation_lines(report)
    out += _test_table_lines(report)
    out += draws_lines(report)
    out += _interval_lines(report)
    out += _rank_interval_lines(report)
    out += _factorized_layer_lines(report)
    out += _deployed_artifact_lines(report)
    out += _artifact_lines(report)
    out += _packing_lines(report)
    verify = report.get("verify")
    if verify:
        out += ["", _verify_line(verify, markdown=True)]
    out += int8_lines(report)
    out += _latency_lines(report)
    return "\n".join(out) + "\n"


def _run_warning_lines(report: Mapping[str, Any]) -> list[str]:
    """The run's warnings (``notes``), as a list under a bold heading."""
    if not report.get("notes"):
        return []
    return ["", "**Warnings:**", ""] + [f"- {n}" for n in report["notes"]]


def _validation_lines(report: Mapping[str, Any]) -> list[str]:
    """compare: the validation-split table to choose on, and its rows' warnings."""
    val_header, val_rows = validation_table(report)
    if not val_rows:
        return []
    out = [
        "",
        "## Validation split: choose here",
        "",
        "Choose a method and its settings (sr, rr, β) on these figures, then read the "
        "test-split table below once: tuning on the test split would overstate the gain.",
        "",
        _table(val_rows, val_header, "github"),
    ]
    warn = _method_warnings(report, validation=True)
    if warn:
        out += ["", *warn]
    labels = {m["name"]: method_label(m) for m in report["methods"]}
    collapsed = {n: r for n, r in collapse_reasons(report, "val").items() if r}
    if collapsed:
        out += ["", "Collapsed on the validation split (ringed and marked ⚠ in the plot; the "
                "sweep's collapse guard against vanilla, tolerance 0.01): their small fairness "
                "gaps are not evidence of fairness.", ""]
        out += [f"- {labels[n]}: {'; '.join(r)}" for n, r in collapsed.items()]
    return out


def _test_table_lines(report: Mapping[str, Any]) -> list[str]:
    """The paper-style test-split table, its rows' warnings, the notes that say what its
    columns mean, and the plot."""
    out = ["", "## Accuracy and fairness (test split)", ""]
    header, rows = fairness_table(report, bold=True)
    out.append(_table(rows, header, "github"))
    warn = _method_warnings(report)
    if warn:
        out += ["", *warn]
    out += ["", _TABLE_NOTE]
    out += _weight_cr_lines(report)
    if len(report["methods"]) > 1:
        out += ["", "The best (lowest) EOpp1, EOpp0 and EOdd are in bold."]
    if report.get("plot"):
        out += ["", f"![Avg. precision against EOpp1 and EOdd per method]({report['plot']})"]
    return out


def _interval_lines(report: Mapping[str, Any]) -> list[str]:
    """The bootstrap confidence intervals and paired differences against the baseline."""
    ci_rows = _interval_rows(report)
    if not ci_rows:
        return []
    boot = report["bootstrap"]
    pct = round(100 * boot["confidence"])
    return [
        "",
        f"## {pct} % bootstrap confidence intervals",
        "",
        f"{boot['n_resamples']:,} resamples of the test samples (seed {boot['seed']}), "
        f"percentile intervals; Δ is the paired difference against `{boot['baseline']}` "
        "on the same resamples. A change whose interval contains 0 is not significant; "
        "otherwise it is better or worse by the metric's direction.",
        "",
        _table(
            ci_rows,
            ["Method", "Metric", "Value [CI]", f"Δ vs {boot['baseline']} [CI]", "Change"],
            "github",
        ),
    ]


def _factorized_layer_lines(report: Mapping[str, Any]) -> list[str]:
    """Per factorized layer of every method: shapes, rank, sparsity and parameter counts."""
    layer_rows = _layer_rows(report)
    if not layer_rows:
        return []
    return [
        "",
        "## Factorized layers",
        "",
        _table(
            layer_rows,
            [
                "Method",
                "Layer",
                "Din",
                "Dout",
                "k",
                "rows/cols sparsified",
                "kept per sparsified row",
                "params before",
                "params after (paper, S as k×k)",
                "params stored (S as k)",
            ],
            "github",
        ),
    ]


def _deployed_artifact_lines(report: Mapping[str, Any]) -> list[str]:
    """optimize: the ONNX files' sizes, measured C.R., and compression three ways."""
    sizes = report.get("onnx")
    if not sizes:
        return []
    names = {"vanilla": sizes.get("baseline_file", "vanilla"), "processed": "model.onnx"}
    out = [
        "",
        "## Deployed artifact",
        "",
        _table(
            [
                [names.get(k, k), f"{v['initializer_bytes']:,}", f"{v['file_bytes']:,}"]
                for k, v in sizes["models"].items()
            ],
            ["ONNX model", "initializer bytes", "file bytes"],
            "github",
        ),
        "",
        f"Measured C.R.: initializers {_cr(sizes.get('initializer_cr'))}, "
        f"files {_cr(sizes.get('file_cr'))}.",
    ]
    deployed = report["methods"][-1].get("compression", {}).get("deployed")
    if deployed:
        theory = report["methods"][-1]["compression"]["theoretical_cr"]
        out += [
            "",
            f"Compression, three ways: the paper's {_cr(theory)} (the factorized layers "
            f"only, S as k×k); deployed {_cr(deployed['cr'])} (whole model, the "
            f"{deployed['parameters']:,} parameters the graph stores: "
            f"{deployed['sparse_layout']} layout, dead neurons "
            f"{'removed' if deployed['eliminate_dead'] else 'kept'}); measured bytes "
            f"{_cr(sizes.get('initializer_cr'))} (initializers).",
        ]
    if "baseline_file" in sizes:
        out += [
            "",
            f"`{sizes['baseline_file']}` beside the model is the vanilla export: "
            "`fairdeploy bench model.onnx` times the model against it.",
        ]
    return out


def _latency_lines(report: Mapping[str, Any]) -> list[str]:
    """The ONNX Runtime latency table and the batch sizes that were not timed."""
    lat_rows = _latency_rows(report)
    if not lat_rows:
        return []
    lat = report["latency"]
    out = [
        "",
        "## Latency (ONNX Runtime)",
        "",
        f"Provider {lat['provider']}, {lat['threads']} intra-op threads, {lat['note']}."
        + (f" Measurement {lat['mode_note']}." if lat.get("mode_note") else ""),
        "",
        _table(
            lat_rows,
            ["Scope", "Model", "Batch", "Median (ms)", "p90 (ms)", "Runs",
             "Speed-up vs vanilla"],
            "github",
        ),
    ]
    skipped = _latency_skips(lat)
    if skipped:
        out += ["", *skipped]
    return out


def _latency_skips(lat: Mapping[str, Any]) -> list[str]:
    return [f"- {s['scope']}, batch {s['batch']}: not timed ({s['why']})"
            for s in lat.get("skipped", [])]


#: How reports name the runtimes of :mod:`fairdeploy.runtimes`.
_RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO",
                  "reference": "the ONNX reference evaluator"}


def runtimes_text(verify: Mapping[str, Any]) -> str:
    """"ONNX Runtime, OpenVINO": the runtimes a verification block ran in (ONNX Runtime for
    reports written before there was a choice)."""
    names = list(verify.get("runtimes") or ["onnxruntime"])
    return ", ".join(_RUNTIME_NAMES.get(n, n) for n in names)


def _verify_line(verify: Mapping[str, Any], *, markdown: bool = False) -> str:
    passed = "PASSED" if verify["passed"] else "FAILED"
    if not verify["passed"] and verify.get("verified_in"):
        passed += f" (passed in {runtimes_text({'runtimes': verify['verified_in']})} only)"
    if markdown:
        passed = f"**{passed}**"
    ref = verify.get("reference_file") or {}
    stored = f"; {ref['path']} {ref['note']}" if ref.get("note") else ""
    return (
        f"ONNX verification ({runtimes_text(verify)} vs PyTorch on "
        f"{plural(verify['samples'], 'test input')})"
        f": {passed}, max |Δ| {_delta(verify['max_abs_error'])}, argmax agreement "
        f"{100 * verify['argmax_agreement']:.2f} %, atol {verify['atol']:g}, rtol "
        f"{verify['rtol']:g}{stored}."
    )


def _weight_cr_lines(report: Mapping[str, Any]) -> list[str]:
    """What C.R. theory and measured mean for rows with packed (pruned / int8) weights."""
    if not any(m.get("compression", {}).get("packing") for m in report["methods"]):
        return []
    return [
        "",
        "Packed rows: for FairPrune the paper's C.R. is 1.000 (pruned weights stored dense); for "
        "FairQuantize it counts a quantized weight as 8 bits of 32 (32 / (32 − 24q) when every "
        "weight is chosen). The exported files store pruned weights as a bit mask without the "
        "zeros and quantized ones as int8 with a bit mask, so their measured C.R. is above the "
        "paper's for FairPrune and just below it for FairQuantize (the mask costs 1 bit per "
        "weight); inference runs the same dense MatMul/Conv as the vanilla export.",
    ]


def _rank_interval_lines(report: Mapping[str, Any]) -> list[str]:
    rank = report.get("bootstrap_rank")
    if not rank or not rank.get("differences"):
        return []
    labels = {m["name"]: method_label(m) for m in report["methods"]}
    pct = round(100 * rank["confidence"])
    rows = []
    for name, per in rank["differences"].items():
        pair = rank["pairs"][name]
        against = labels.get(pair["baseline"], pair["baseline"])
        if not pair["same_ranks"]:
            against += " (no factorized layer: the table's truncated SVD)"
        for metric in ("eopp1", "eopp0", "eodd", "avg_precision"):
            d = per.get(metric)
            if d is None:
                continue
            value = (
                f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                if d["value"] is not None and d["low"] is not None
                else "n/a"
            )
            sig = "yes" if d["significant"] else f"no ({pct} % CI contains 0)"
            rows.append([labels.get(name, name), against, metric, value, sig])
    out = [
        "",
        "## Paired change against truncated SVD at the same rank",
        "",
        f"The same {rank['n_resamples']} resamples (seed {rank['seed']}) as above; Δ = method − "
        "truncated SVD with the same layers and ranks (the paper's FairLRF gains over it are "
        "about 0.003 EOpp: only a paired interval can tell such a change from noise).",
        "",
        markdown_table(rows, ["Method", "Against", "Metric", "Δ [CI]", "Significant"]),
    ]
    if rank.get("unpaired"):
        out += ["", "No truncated SVD row at the same ranks for: "
                + ", ".join(labels.get(n, n) for n in rank["unpaired"]) + "."]
    return out


def _artifact_lines(report: Mapping[str, Any]) -> list[str]:
    """compare: every row's exported model, sizes, measured C.R. and verification."""
    rows = []
    for m in report["methods"]:
        art = m.get("artifact")
        if not art:
            continue
        comp = m.get("compression", {})
        measured = comp.get("measured") or {}
        ver = art["verify"]
        rows.append([
            method_label(m),
            f"`{art['path']}`",
            f"{art['sizes']['initializer_bytes']:,}",
            f"{art['sizes']['file_bytes']:,}",
            _cr(comp.get("theoretical_cr")),
            _cr(measured.get("initializer_cr")),
            _cr(measured.get("file_cr")),
            f"{'PASSED' if ver['passed'] else 'FAILED'} "
            f"(max |Δ| {_delta(ver['max_abs_error'], '.2g')}, "
            f"{plural(ver['samples'], 'input')}, {runtimes_text(ver)})",
        ])
    if not rows:
        return []
    note = report.get("artifacts", {}).get("note", "")
    return [
        "",
        "## Deployed artifacts (every row)",
        "",
        f"{note[:1].upper() + note[1:]}.",
        "",
        markdown_table(rows, ["Method", "ONNX model", "initializer bytes", "file bytes",
                        "C.R. theory", "C.R. measured (initializers)", "C.R. measured (file)",
                        "verify"]),
    ]


def _packing_lines(report: Mapping[str, Any]) -> list[str]:
    """Rows whose weights are packed: theory with the mask bit against the measured bytes."""
    rows, note = [], None
    for m in report["methods"]:
        pk = m.get("compression", {}).get("packing")
        if not pk:
            continue
        note = pk["load_note"]
        bits = [t["bits_per_entry"] for t in pk["tensors"] if t["stored"] == "packed"]
        rows.append([
            method_label(m),
            f"{pk['packed_tensors']} of {len(pk['tensors'])}",
            f"{min(bits):.2f}–{max(bits):.2f}" if bits else "—",
            _cr(m["compression"].get("theoretical_cr")),
            _cr(pk["theoretical_cr_with_mask"]),
            _cr(pk["measured_initializer_cr"]),
            f"{100 * pk['fraction_of_theory']:.1f} %",
        ])
    if not rows:
        return []
    return [
        "",
        "## Packed weights",
        "",
        "Pruned and int8 weights are stored as a bit mask plus the compact values (int8 with "
        "one float32 scale per output channel; no bytes for zeros), rebuilt into the float "
        "tensor by a constant subgraph that ONNX Runtime folds when the session loads. A "
        "tensor stays dense where packing would not save bytes.",
        "",
        markdown_table(rows, ["Method", "tensors packed", "bits per weight (packed)",
                        "C.R. paper", "C.R. theory with mask bit", "C.R. measured",
                        "measured / theory"]),
        "",
        f"Load time: {note}.",
    ]


def write_report(report: Mapping[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory`` (atomically)."""
    directory = Path(directory)
    data = {"schema_version": SCHEMA_VERSION, **report}
    json_path = directory / "report.json"
    md_path = directory / "report.md"
    atomic_write_text(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, render_markdown(data))
    return json_path, md_path


def terminal_text(report: Mapping[str, Any]) -> str:
    """What the terminal shows after ``optimize``/``compare``: the validation table first
    (``compare``: the one to choose on), the test table with accuracy, each method's
    warnings under it, the paired differences in words, then verification, measured
    compression and latency in one line each."""
    out: list[str] = []
    val_header, val_rows = validation_table(report)
    if val_rows:
        out += [
            "Validation split — choose the method and its settings on these:",
            _table(val_rows, val_header, "simple"),
            "",
            "Test split — read once, after choosing:",
        ]
    header, rows = fairness_table(report)
    out.append(_table(rows, header, "simple"))
    shown = set()
    for line in _method_warnings(report):
        out.append(line)
        shown.add(line.split(": ", 1)[-1])
    for note in report.get("notes", []):
        # Warnings about the run (data, cache) that no method row carries.
        if not any(note.endswith(text) for text in shown):
            out.append(f"warning: {note}")
    out += _difference_lines(report)
    out += _difference_lines(report, "bootstrap_rank")
    out += _draws_terminal_lines(report)
    shipped = [m for m in report["methods"] if m.get("artifact")]
    if shipped:
        passed = sum(m["artifact"]["verify"]["passed"] for m in shipped)
        out.append(
            f"exported and verified: {passed} of {len(shipped)} rows PASSED "
            "(<run folder>/<row>/model.onnx)"
        )
    if report.get("plot"):
        out.append(f"plot: {report['plot']} (Avg. precision against EOpp1 and EOdd)")
    verify = report.get("verify")
    if verify:
        out.append(_verify_line(verify))
    onnx_info = report.get("onnx")
    if onnx_info:
        deployed = report["methods"][-1].get("compression", {}).get("deployed")
        if deployed:
            out.append(f"deployed C.R.: {_cr(deployed['cr'])} (whole model, parameters stored)")
        out.append(
            f"measured C.R.: initializers {_cr(onnx_info.get('initializer_cr'))}, "
            f"files {_cr(onnx_info.get('file_cr'))}"
        )
    out += int8_lines(report, markdown=False)
    lat = report.get("latency")
    if lat:
        ups = [
            f"{r['scope']} batch {r['batch']} {r['speedup']:.2f}×"
            + (" (slower)" if r["speedup"] < 1 else "")
            for r in lat.get("rows", [])
            if r.get("speedup") is not None
        ]
        how = f" ({lat['mode']})" if lat.get("mode") else ""
        out.append(f"latency{how}, speed-up vs vanilla: " + ", ".join(ups) if ups else
                   f"latency{how}: no batch size fit the time budget")
        out += [line.removeprefix("- ") for line in _latency_skips(lat)]
    return "\n".join(out)


def int8_lines(report: Mapping[str, Any], *, markdown: bool = True) -> list[str]:
    """``export.quantize: int8``: the int8 copy's verification, its group fairness next to
    the float export's (paired change in words) and the compression of the combination."""
    block = report.get("int8")
    if not block:
        return []
    ver, fair, comp = block["verify"], block["fairness"], block["compression"]
    made = block["export"]
    passed = "PASSED" if ver["passed"] else "FAILED"
    boot = fair["bootstrap"]
    pct = round(100 * boot["confidence"])
    parts = []
    for metric in ("eopp1", "eopp0", "eodd", "avg_precision"):
        d = boot["differences"]["int8"].get(metric)
        if d is None:
            continue
        before = fair["float"]["fairness"].get(metric) if metric != "avg_precision" else (
            fair["float"]["precision"]["avg"])
        after = fair["int8"]["fairness"].get(metric) if metric != "avg_precision" else (
            fair["int8"]["precision"]["avg"])
        words = _direction(metric, d)
        parts.append(
            f"{_METRIC_NAMES.get(metric, metric)} {_f(before)} → {_f(after)} "
            f"({_difference_text(metric, d)} {words})"
        )
    theory = comp.get("theoretical_cr")
    lines = [
        f"int8 model ({block['path']}, {made['mode']} quantization"
        + (f", calibrated on {made['calibration_samples']:,} training inputs"
           if made["calibration_samples"] else "")
        + f"): verification {passed} in {runtimes_text(ver)} against PyTorch's float "
        f"outputs (atol "
        f"{ver['atol']:.3g} = {ver['atol_basis']}, rtol {ver['rtol']:g}; max |Δ| "
        f"{_delta(ver['max_abs_error'])}, argmax agreement {100 * ver['argmax_agreement']:.2f} %)",
        f"int8 vs float export on the {plural(fair['n_samples'], 'test sample')} ({pct} % "
        f"paired intervals, {plural(fair['changed_predictions'], 'prediction')} changed): "
        + "; ".join(parts),
        f"int8 C.R.: theory {_cr(theory)} (method × 32/(32 − 24q)), measured "
        f"{_cr(comp['measured_initializer_cr'])} (initializers), "
        f"{_cr(comp['measured_file_cr'])} (file) against the vanilla float export",
    ]
    if not markdown:
        return lines
    return ["", "## int8 model", "", *(f"- {line}" for line in lines)]
