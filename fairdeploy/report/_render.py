"""report.md and the terminal table: renderings of the report dict (report.json).

The report is built from one JSON-serializable dict (``report.json``, with
``schema_version``); ``report.md`` and the terminal table are renderings of it, so
what the terminal shows is what the file says. Every figure names its unit and
convention in the column header or in the notes under the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fairdeploy._io import atomic_write_text

__all__ = ["SCHEMA_VERSION", "fairness_table", "render_markdown", "write_report"]

#: Version of report.json's layout; bumped on any incompatible change.
SCHEMA_VERSION = 1

def method_label(method: Mapping[str, Any]) -> str:
    """The row label of a method entry: its method's label and settings (``label``)."""
    return str(method.get("label") or method["name"])


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _cr(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}×"


def fairness_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper-style table (Tables 1–2 of the paper).

    One block of four rows per method: the unprivileged group, the privileged group,
    ``Avg.`` (mean of the two) and ``Diff.`` (absolute difference); fairness and
    compression figures stand on the block's first row.
    """
    header = [
        "Method",
        "Group",
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
        m = method["metrics"]
        groups = m["groups"]
        order = [g for g in groups if not g["privileged"]] + [g for g in groups if g["privileged"]]
        comp = method.get("compression", {})
        measured = (comp.get("measured") or {}).get("initializer_cr")
        fair = m["fairness"]
        block = []
        for g in order:
            tag = "priv." if g["privileged"] else "unpriv."
            block.append(
                ["", f"{g['name']} ({tag})", _f(g["precision"]), _f(g["recall"]), _f(g["f1"])]
            )
        block.append(
            ["", "Avg.", _f(m["precision"]["avg"]), _f(m["recall"]["avg"]), _f(m["f1"]["avg"])]
        )
        block.append(
            [
                "",
                "Diff. ↓",
                _f(m["precision"]["diff"]),
                _f(m["recall"]["diff"]),
                _f(m["f1"]["diff"]),
            ]
        )
        for i, row in enumerate(block):
            if i == 0:
                row[0] = method_label(method)
                row += [
                    _f(fair["eopp1"]),
                    _f(fair["eopp0"]),
                    _f(fair["eodd"]),
                    _cr(comp.get("theoretical_cr")),
                    _cr(measured),
                ]
            else:
                row += [""] * 5
            rows.append(row)
    return header, rows


def _interval_rows(report: Mapping[str, Any]) -> list[list[str]]:
    boot = report.get("bootstrap")
    if not boot:
        return []
    pct = round(100 * boot["confidence"])
    rows = []
    for method in report["methods"]:
        name = method["name"]
        per = boot["intervals"].get(name, {})
        diffs = boot["differences"].get(name, {})
        for metric in ("eopp1", "eopp0", "eodd", "avg_precision"):
            ci = per.get(metric)
            if ci is None:
                continue
            row = [
                method_label(method),
                metric,
                f"{_f(ci['value'])} [{_f(ci['low'])}, {_f(ci['high'])}]",
            ]
            d = diffs.get(metric)
            if d is None:
                row += ["—", "—"]
            else:
                row += [
                    f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                    if d["value"] is not None and d["low"] is not None
                    else "n/a",
                    "yes" if d["significant"] else f"no ({pct} % CI contains 0)",
                ]
            rows.append(row)
    return rows


#: Metrics shown in the spread-over-draws table, in this order.
_DRAW_METRICS = ("avg_precision", "accuracy", "balanced_accuracy", "eopp1", "eodd")


def _spread_cell(sp: Mapping[str, Any] | None) -> str:
    if not sp or sp.get("median") is None:
        return "n/a"
    return f"{sp['median']:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]"


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
            ["Method", "Split", "Draws", *(f"{m} median [min, max]" for m in _DRAW_METRICS)],
            tablefmt="github",
        ),
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


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the fairness table, intervals, per-layer compression, latency, notes."""
    task = report["task"]
    priv = task["privileged"]
    out = [
        "# fairdeploy report",
        "",
        f"- checkpoint: `{report['checkpoint']['path']}` "
        f"(sha256 {report['checkpoint']['sha256'][:12]}…)",
        f"- recipe: `{report['recipe']['path']}` (hash {report['recipe']['hash'][:12]}…)",
        f"- task: {task['num_classes']} classes; sensitive attribute groups "
        f"{', '.join(task['group_names'])}; privileged: **{priv['name']}** ({priv['how']})",
        f"- evaluated on the `{report['evaluation']['split']}` split: "
        f"{report['evaluation']['samples']} samples "
        f"({report['evaluation']['unknown_group']} with unknown group left out of group metrics)",
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
                else f"{scoring['samples_per_group']} samples per group from `{scoring['split']}`"
            )
            + f", seed {scoring['seed']}"
            + (f", {scoring['draws']} draws (seeds from {scoring['seed']})"
               if scoring.get("draws", 1) > 1 else "")
        )
    if report.get("notes"):
        out += ["", "**Warnings:**", ""] + [f"- {n}" for n in report["notes"]]
    out += ["", "## Accuracy and fairness", ""]
    header, rows = fairness_table(report)
    out.append(tabulate(rows, header, tablefmt="github"))
    out += [
        "",
        "Precision, recall and F1 are macro averages over classes within each group (fractions, "
        'not %). EOpp1 (the paper\'s "EOpp") = mean over classes of |ΔTPR|, EOpp0 = mean of '
        "|ΔTNR|, EOdd = mean of |ΔTPR + ΔFPR| / 2 — the convention of the paper's tables "
        "(report.json also has the sum convention of the paper's equations). EOdd's signed sum "
        "can cancel (a model that predicts positive more often for one group can score 0); "
        "EOpp1 is the unsigned TPR gap and EOpp0 the unsigned FPR gap (TNR = 1 − FPR), so read "
        "them beside it. "
        "C.R. theory is the paper's parameter-count ratio (S counted as k×k); "
        "C.R. measured is the ratio of ONNX initializer bytes, vanilla / processed.",
    ]
    val_rows = [
        [
            method_label(m),
            _f(m["metrics_val"]["precision"]["avg"]),
            _f(m["metrics_val"]["fairness"]["eopp1"]),
            _f(m["metrics_val"]["fairness"]["eodd"]),
        ]
        for m in report["methods"]
        if "metrics_val" in m
    ]
    if val_rows:
        out += [
            "",
            "## Validation split (for choosing a method and its settings)",
            "",
            "Choose on these, then read the test-split table above once: tuning sr, rr and β "
            "on the test split would overstate the gain.",
            "",
            tabulate(
                val_rows, ["Method", "Avg. precision", "EOpp1 ↓", "EOdd ↓"], tablefmt="github"
            ),
        ]
    out += draws_lines(report)
    ci_rows = _interval_rows(report)
    if ci_rows:
        boot = report["bootstrap"]
        pct = round(100 * boot["confidence"])
        out += [
            "",
            f"## {pct} % bootstrap confidence intervals",
            "",
            f"{boot['n_resamples']} resamples of the test samples (seed {boot['seed']}), "
            f"percentile intervals; Δ is the paired difference against `{boot['baseline']}` "
            "on the same resamples. A change whose interval contains 0 is not significant.",
            "",
            tabulate(
                ci_rows,
                ["Method", "Metric", "Value [CI]", f"Δ vs {boot['baseline']} [CI]", "Significant"],
                tablefmt="github",
            ),
        ]
    layer_rows = _layer_rows(report)
    if layer_rows:
        out += [
            "",
            "## Factorized layers",
            "",
            tabulate(
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
                tablefmt="github",
            ),
        ]
    sizes = report.get("onnx")
    if sizes:
        out += [
            "",
            "## Deployed artifact",
            "",
            tabulate(
                [
                    [k, f"{v['initializer_bytes']:,}", f"{v['file_bytes']:,}"]
                    for k, v in sizes["models"].items()
                ],
                ["ONNX model", "initializer bytes", "file bytes"],
                tablefmt="github",
            ),
            "",
            f"Measured C.R.: initializers {_cr(sizes.get('initializer_cr'))}, "
            f"files {_cr(sizes.get('file_cr'))}.",
        ]
    verify = report.get("verify")
    if verify:
        out += [
            "",
            f"Verification (ONNX Runtime vs PyTorch on {verify['samples']} real test inputs): "
            f"**{'PASSED' if verify['passed'] else 'FAILED'}**, "
            f"max |Δ| {verify['max_abs_error']:.3g}, "
            f"argmax agreement {100 * verify['argmax_agreement']:.2f} %, "
            f"atol {verify['atol']:g}, rtol {verify['rtol']:g}.",
        ]
    lat_rows = _latency_rows(report)
    if lat_rows:
        lat = report["latency"]
        out += [
            "",
            "## Latency (ONNX Runtime)",
            "",
            f"Provider {lat['provider']}, {lat['threads']} intra-op threads, {lat['note']}.",
            "",
            tabulate(
                lat_rows,
                ["Scope", "Model", "Batch", "Median (ms)", "p90 (ms)", "Speed-up vs vanilla"],
                tablefmt="github",
            ),
        ]
    return "\n".join(out) + "\n"


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
    """The fairness table as plain text for the terminal."""
    header, rows = fairness_table(report)
    return tabulate(rows, header, tablefmt="simple")
