"""The sweep's files: sweep.csv (one row per point), sweep.json (every number) and
sweep.md (the tables a reader wants: all points, the per-layer table, the choice).

Rows are written in the table's fixed order (vanilla, the truncated-SVD references, the
grid points in grid order) with fixed number formats, so the same sweep gives the same
bytes however often it was interrupted and resumed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fairdeploy._io import atomic_write_text
from fairdeploy._text import markdown_table
from fairdeploy.metrics import LOWER_IS_BETTER
from fairdeploy.sweep._run import ROW_METRICS, SweepRow, describe_settings

__all__ = [
    "CSV_COLUMNS",
    "SCHEMA_VERSION",
    "difference_words",
    "reference_settings",
    "render_sweep_markdown",
    "row_dict",
    "sweep_csv",
    "write_sweep_files",
]

#: Version of sweep.json's layout.
SCHEMA_VERSION = 1
_SETTING_KEYS = ("layer", "rank", "sr", "rr", "beta")

#: sweep.csv's columns, in order: settings, status, every metric's median over draws with
#: its range, the overlap of the draws' selections, the difference from truncated SVD at
#: the same rank, the guard's and the rule's verdicts.
CSV_COLUMNS: tuple[str, ...] = (
    "row",
    "kind",
    "method",
    *_SETTING_KEYS,
    "samples_per_group",
    "draws",
    "status",
    *(c for m in ROW_METRICS for c in (m, f"{m}_min", f"{m}_max")),
    "jaccard_rows",
    "jaccard_cols",
    "eodd_vs_svd",
    "avg_precision_vs_svd",
    "guard",
    "constraint",
    "chosen",
)


def _num(value: Any, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _setting(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _overlap_mean(row: SweepRow, part: str) -> float | None:
    values = [parts[part]["mean"] for parts in row.overlap.values()]
    return sum(values) / len(values) if values else None


def _vs_svd(row: SweepRow, by_index: Mapping[int, SweepRow], metric: str) -> float | None:
    if row.reference is None:
        return None
    a, b = row.value(metric), by_index[row.reference].value(metric)
    return None if a is None or b is None else a - b


def sweep_csv(rows: Sequence[SweepRow]) -> str:
    """sweep.csv's text: :data:`CSV_COLUMNS`, one line per row."""
    by_index = {r.index: r for r in rows}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        line: dict[str, str] = {
            "row": str(r.index),
            "kind": r.kind,
            "method": r.method,
            **{k: _setting(r.settings.get(k)) for k in _SETTING_KEYS},
            "samples_per_group": _setting((r.scoring or {}).get("samples_per_group")),
            "draws": str(len(r.draws)) if r.draws else "",
            "status": r.status,
            "jaccard_rows": _num(_overlap_mean(r, "rows"), 4),
            "jaccard_cols": _num(_overlap_mean(r, "cols"), 4),
            "eodd_vs_svd": _num(_vs_svd(r, by_index, "eodd")),
            "avg_precision_vs_svd": _num(_vs_svd(r, by_index, "avg_precision")),
            "guard": r.guard,
            "constraint": r.constraint,
            "chosen": "yes" if r.chosen else "",
        }
        for m in ROW_METRICS:
            sp = r.metrics.get(m) or {}
            digits = 4 if m == "cr" else 6
            line[m] = _num(sp.get("median"), digits)
            line[f"{m}_min"] = _num(sp.get("min"), digits)
            line[f"{m}_max"] = _num(sp.get("max"), digits)
        writer.writerow([line[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def row_dict(row: SweepRow) -> dict[str, Any]:
    """One row of sweep.json: settings, plan, per-draw values and their spread, verdicts."""
    return {
        "row": row.index,
        "kind": row.kind,
        "method": row.method,
        "settings": dict(row.settings),
        "status": row.status,
        "plan": row.plan.to_dict() if row.plan is not None else None,
        "scoring": row.scoring,
        "seeds": list(row.seeds),
        "metrics": row.metrics,
        "draws": list(row.draws),
        "selection_overlap": row.overlap,
        "reference_row": row.reference,
        "guard": row.guard,
        "constraint": row.constraint,
        "chosen": row.chosen,
    }


def reference_settings(
    rows: Sequence[SweepRow], grid: Mapping[str, Sequence[Any]], base: Mapping[str, Any]
) -> dict[str, Any]:
    """The point the Figure-4 panels and the per-layer table hold the other settings at:
    the chosen point, else the recipe's own setting with each grid key snapped to the
    nearest grid value."""
    chosen = next((r for r in rows if r.chosen), None)
    if chosen is not None:
        return {**{k: chosen.settings.get(k) for k in _SETTING_KEYS}, "method": chosen.method}
    out: dict[str, Any] = {k: base.get(k) for k in _SETTING_KEYS}
    out["method"] = base.get("method")
    for key, values in grid.items():
        values = [v for v in values if v != "all"]
        if not values:
            points = [r for r in rows if r.kind == "point"]
            values = list(dict.fromkeys(r.settings.get(key) for r in points))
        current = out.get(key)
        if current in values:
            continue
        if isinstance(current, int | float) and all(isinstance(v, int | float) for v in values):
            out[key] = min(values, key=lambda v: (abs(v - current), v))
        else:
            out[key] = values[0]
    return out


def _md_cell(row: SweepRow, metric: str) -> str:
    sp = row.metrics.get(metric)
    if not sp or sp.get("median") is None:
        return "n/a"
    digits = 3
    if len(row.draws) > 1 and metric != "cr":
        return f"{sp['median']:.{digits}f} [{sp['min']:.{digits}f}, {sp['max']:.{digits}f}]"
    return f"{sp['median']:.{digits}f}"


def _label(row: SweepRow) -> str:
    if row.kind == "vanilla":
        return "Vanilla"
    if row.kind == "reference":
        return f"Truncated SVD ({describe_settings(row.settings)})"
    return f"{row.method} ({describe_settings(row.settings)})"


_MD_METRICS = ("avg_precision", "accuracy", "balanced_accuracy", "eopp1", "eodd", "cr")
_MD_HEADER = ["Row", "Setting", "Avg. precision", "Accuracy", "Macro recall", "EOpp1 ↓",
              "EOdd ↓", "C.R."]


def _md_rows(rows: Sequence[SweepRow]) -> list[list[str]]:
    out = []
    for r in rows:
        cells = [str(r.index), _label(r)]
        if r.status != "ok":
            cells += ["—"] * len(_MD_METRICS) + [r.status, "", ""]
        else:
            cells += [_md_cell(r, m) for m in _MD_METRICS]
            guard = r.guard if r.guard in ("ok", "off", "n/a", "") else "rejected: " + r.guard
            cells += [guard, r.constraint, "**chosen**" if r.chosen else ""]
        out.append(cells)
    return out


def _per_layer_rows(rows: Sequence[SweepRow], ref: Mapping[str, Any]) -> list[SweepRow]:
    """Table 3: per layer, the point with every other setting at the reference."""
    keys = [k for k in ("rank", "sr", "rr", "beta") if ref.get(k) is not None]
    picked: list[SweepRow] = []
    seen: set[str] = set()
    for r in rows:
        if r.kind != "point" or r.method != ref.get("method"):
            continue
        layer = str(r.settings.get("layer"))
        if layer in seen:
            continue
        ranks_vary = len({p.settings.get("rank") for p in rows if p.kind == "point"}) > 1
        if all(
            r.settings.get(k) == ref.get(k) for k in keys if k != "rank" or ranks_vary
        ):
            picked.append(r)
            seen.add(layer)
    return picked


def render_sweep_markdown(summary: Mapping[str, Any], rows: Sequence[SweepRow]) -> str:
    """sweep.md: the setup, every row (median [min, max] over draws), the per-layer table,
    the choice and its test-split comparison."""
    sel = summary.get("selection")
    grid = "; ".join(
        f"{k} = {', '.join(_setting(v) for v in vs)}" for k, vs in summary["grid"].items()
    )
    out = [
        "# fairdeploy sweep",
        "",
        f"- checkpoint sha256 {summary['identity']['checkpoint_sha256'][:12]}…, recipe "
        f"`{summary['recipe']}`",
        f"- grid: {grid}; methods: {', '.join(summary['methods'])}",
        f"- every row evaluated on the **{summary['split']}** split "
        f"({summary['samples']} samples); the test split is read only for the chosen point",
        f"- scoring sets: {summary['scoring']}",
        f"- collapse guard: {summary['guard']['text']}",
    ]
    if sel:
        out.append(f"- rule: `{sel['rule']}`")
    multi = any(len(r.draws) > 1 for r in rows)
    out += [
        "",
        "## All rows",
        "",
        ("Values are medians over the scoring draws with [min, max]; " if multi else "")
        + "C.R. is the paper's theoretical compression rate. Rows the collapse guard "
        "rejects are marked with the reason.",
        "",
        markdown_table(_md_rows(rows), [*_MD_HEADER, "Guard", "Constraint", ""]),
    ]
    if multi:
        out += _overlap_lines(rows)
    out += _per_layer_lines(rows, summary["reference_point"])
    out += ["", "## Selection", ""]
    if not sel:
        out.append("No rule given (`--select`): nothing was chosen.")
    else:
        out.append(summary["message"] + ".")
        test = summary.get("test")
        if test:
            out += ["", *test_lines(test)]
    plots = summary.get("plots") or []
    if plots:
        out += ["", "## Plots", "", *(f"- `{p}`" for p in plots)]
    return "\n".join(out) + "\n"


def difference_words(
    diffs: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ()
) -> str:
    """``eodd -0.0123 [-0.0300, -0.0010] (better); …``: the paired differences of EOdd,
    EOpp1, Avg. precision and of the rule's other metrics, each with its direction in
    words (fairness gaps better lower, the others better higher; ``not significant`` when
    the interval contains 0)."""
    parts = []
    for metric in dict.fromkeys(["eodd", "eopp1", "avg_precision", *metrics]):
        d = diffs.get(metric)
        if not d or d.get("low") is None or d.get("value") is None:
            continue
        if not d["significant"]:
            word = "not significant"
        else:
            word = "better" if (d["high"] < 0) == (metric in LOWER_IS_BETTER) else "worse"
        parts.append(f"{metric} {d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({word})")
    return "; ".join(parts)


def _overlap_lines(rows: Sequence[SweepRow]) -> list[str]:
    """How alike the draws' selections are (mean Jaccard per layer), when any row has them."""
    overlap = [
        f"- row {r.index} ({_label(r)}), `{layer}`: rows {p['rows']['mean']:.2f}, "
        f"columns {p['cols']['mean']:.2f}"
        for r in rows
        for layer, p in r.overlap.items()
        if r.kind == "point"
    ]
    if not overlap:
        return []
    return [
        "",
        "Overlap (Jaccard, mean over pairs of draws) of the sparsified rows/columns:",
        "",
        *overlap,
    ]


def _per_layer_lines(rows: Sequence[SweepRow], reference_point: Mapping[str, Any]) -> list[str]:
    """The paper's Table 3 (one setting on each layer in turn, beside truncated SVD of
    that layer), when the sweep covers more than one layer."""
    layer_rows = _per_layer_rows(rows, reference_point)
    if len({str(r.settings.get("layer")) for r in layer_rows}) <= 1:
        return []
    by_index = {r.index: r for r in rows}
    table = []
    for r in layer_rows:
        table.append(_md_rows([r])[0][:8])
        if r.reference is not None:
            table.append(_md_rows([by_index[r.reference]])[0][:8])
    return [
        "",
        "## Per layer (the paper's Table 3)",
        "",
        "The same setting applied to each layer in turn, next to truncated SVD of that "
        "layer at the same rank.",
        "",
        markdown_table(table, _MD_HEADER),
    ]


def test_lines(test: Mapping[str, Any]) -> list[str]:
    """The chosen point's test-split comparison, as markdown lines."""
    rows = []
    for name, m in test["metrics"].items():
        f = m["fairness"]
        rows.append([
            test["labels"][name], f"{m['precision']['avg']:.4f}", f"{f['eopp1']:.4f}",
            f"{f['eodd']:.4f}",
        ])
    out = [
        "### The chosen point on the test split (read once)",
        "",
        markdown_table(rows, ["Model", "Avg. precision", "EOpp1 ↓", "EOdd ↓"]),
        "",
    ]
    rule_metrics = [m["metric"] for m in test["verdict"].get("moves", ())]
    for against, key in (("vanilla", "vs_vanilla"), ("truncated SVD", "vs_svd")):
        out.append(f"- chosen − {against}, 95 % paired bootstrap: "
                   + difference_words(test[key], rule_metrics))
    out += ["", f"**{test['verdict']['text'][0].upper()}{test['verdict']['text'][1:]}.**"]
    return out


def write_sweep_files(
    directory: Path, summary: Mapping[str, Any], rows: Sequence[SweepRow]
) -> dict[str, Path]:
    """Write sweep.csv, sweep.json and sweep.md into ``directory`` (atomically)."""
    paths = {
        "csv": directory / "sweep.csv",
        "json": directory / "sweep.json",
        "md": directory / "sweep.md",
    }
    data = {"schema_version": SCHEMA_VERSION, **summary, "rows": [row_dict(r) for r in rows]}
    atomic_write_text(paths["csv"], sweep_csv(rows))
    atomic_write_text(paths["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["md"], render_sweep_markdown(summary, rows))
    return paths
