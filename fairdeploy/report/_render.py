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
    """Header and rows of the paper-style table (Tables 1–2 of the paper).

    One block of four rows per method: the unprivileged group, the privileged group,
    ``Avg.`` (mean of the two) and ``Diff.`` (absolute difference); fairness and
    compression figures stand on the block's first row. With ``bold`` (report.md), the
    best (lowest) EOpp1, EOpp0 and EOdd as displayed are in bold, as in the paper's
    tables (every row that reaches it, vanilla included).
    """
    best = _best_fairness(report) if bold else {}

    def fair(key: str, value: Any) -> str:
        text = _f(value)
        return f"**{text}**" if best.get(key) is not None and text == best[key] else text

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
        fairness = m["fairness"]
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
                    fair("eopp1", fairness["eopp1"]),
                    fair("eopp0", fairness["eopp0"]),
                    fair("eodd", fairness["eodd"]),
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
            + f"{scoring['samples_per_group']} samples per group from "
            f"`{scoring['split']}`, seed {scoring['seed']}"
        )
    if report.get("notes"):
        out += ["", "**Warnings:**", ""] + [f"- {n}" for n in report["notes"]]
    out += ["", "## Accuracy and fairness", ""]
    header, rows = fairness_table(report, bold=True)
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
    out += _weight_cr_lines(report)
    if len(report["methods"]) > 1:
        out += ["", "The best (lowest) EOpp1, EOpp0 and EOdd are in bold."]
    if report.get("plot"):
        out += ["", f"![Avg. precision against EOpp1 and EOdd per method]({report['plot']})"]
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
    out += _rank_interval_lines(report)
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
    out += _artifact_lines(report)
    out += _packing_lines(report)
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
        tabulate(rows, ["Method", "Against", "Metric", "Δ [CI]", "Significant"],
                 tablefmt="github"),
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
            f"{'PASSED' if ver['passed'] else 'FAILED'} (max |Δ| {ver['max_abs_error']:.2g})",
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
        tabulate(rows, ["Method", "ONNX model", "initializer bytes", "file bytes",
                        "C.R. theory", "C.R. measured (initializers)", "C.R. measured (file)",
                        "verify"], tablefmt="github"),
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
        tabulate(rows, ["Method", "tensors packed", "bits per weight (packed)",
                        "C.R. paper", "C.R. theory with mask bit", "C.R. measured",
                        "measured / theory"], tablefmt="github"),
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
    """The fairness table as plain text for the terminal."""
    header, rows = fairness_table(report)
    return tabulate(rows, header, tablefmt="simple")
