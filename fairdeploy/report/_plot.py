"""The trade-off plot of a compare run: Avg. precision against EOpp1 and against EOdd, on
the validation split (where settings are chosen) above the test split (read once).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global backend
state is touched and it works without a display). Point labels are placed one by one
where their box overlaps no label placed before (measured with the renderer's text
extents), so rows with close numbers stay legible. A row that looks collapsed on the
panel's split (a single predicted class, or the sweep's collapse guard against vanilla
fails) is ringed in red and its label starts with ⚠: its small fairness gaps are not
evidence of fairness.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fairdeploy._io import atomic_write_bytes
from fairdeploy.report._build import collapse_reasons

__all__ = ["tradeoff_figure", "tradeoff_points", "write_tradeoff_plot"]

_SPLIT_TITLES = {"val": "validation split (choose here)", "test": "test split (read once)"}
_PANELS = (("eopp1", "EOpp1 (mean |ΔTPR|)"), ("eodd", "EOdd (mean, halved)"))
#: Label offsets tried, in points from the marker: near first, then further out.
_OFFSETS = [
    (r * math.cos(a), r * math.sin(a))
    for r in (7, 16, 28, 42, 60)
    for a in (math.radians(d) for d in (30, -30, 150, -150, 90, -90, 0, 180))
]


def tradeoff_points(report: Mapping[str, Any], split: str = "test") -> list[dict[str, Any]]:
    """Per method of the report: its label and Avg. precision, EOpp1, EOdd on ``split``
    (``"test"`` or ``"val"``; None where undefined or where the split was not evaluated),
    and ``flags``: why it looks collapsed there (see :func:`collapse_reasons`)."""
    flags = collapse_reasons(report, split)
    out = []
    for method in report["methods"]:
        m = method["metrics"] if split == "test" else method.get("metrics_val")
        out.append(
            {
                "name": method["name"],
                "label": method.get("label") or method["name"],
                "avg_precision": m["precision"]["avg"] if m else None,
                "eopp1": m["fairness"]["eopp1"] if m else None,
                "eodd": m["fairness"]["eodd"] if m else None,
                "flags": flags.get(method["name"], []),
            }
        )
    return out


def tradeoff_figure(report: Mapping[str, Any]) -> Any:
    """The trade-off figure (a matplotlib ``Figure`` on an Agg canvas, drawn): a row of
    two panels per split the report has, validation first; see :func:`write_tradeoff_plot`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = [s for s in ("val", "test")
              if any(p["avg_precision"] is not None for p in tradeoff_points(report, s))]
    splits = splits or ["test"]
    fig = Figure(figsize=(11, 1.0 + 4.4 * len(splits)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(splits), 2, squeeze=False)
    placements = []
    for row, split in zip(axes, splits, strict=True):
        points = tradeoff_points(report, split)
        for ax, (key, title) in zip(row, _PANELS, strict=True):
            placements.append((ax, _scatter(ax, points, key)))
            ax.set_xlabel(f"{title} ↓ ({_SPLIT_TITLES[split]})")
            ax.set_ylabel("Avg. precision ↑ (macro, mean of the groups)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle("Accuracy against fairness, per method (⚠: collapsed on that split, see "
                 "report.md)")
    fig.canvas.draw()  # the layout is fixed now; labels are placed in its pixels
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax, labelled in placements:
        _place_labels(ax, labelled, renderer)
    return fig


def _scatter(ax: Any, points: list[dict[str, Any]], key: str) -> list[tuple[float, float, str]]:
    """One marker per method, collapsed rows ringed; returns (x, y, label text) per
    distinct position (rows with the same numbers share one label)."""
    markers = "osD^v<>ph*X"
    at: dict[tuple[float, float], list[str]] = {}
    for i, p in enumerate(points):
        x, y = p[key], p["avg_precision"]
        if x is None or y is None:
            continue
        ax.scatter(x, y, marker=markers[i % len(markers)], s=60,
                   label=("⚠ " if p["flags"] else "") + p["label"], zorder=3)
        if p["flags"]:
            ax.scatter(x, y, s=260, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                       zorder=2)
        at.setdefault((round(x, 6), round(y, 6)), []).append(
            ("⚠ " if p["flags"] else "") + p["name"])
    ax.margins(0.2)
    ax.grid(True, alpha=0.3)
    return [(x, y, ", ".join(names)) for (x, y), names in at.items()]


def _place_labels(ax: Any, labelled: list[tuple[float, float, str]], renderer: Any) -> None:
    """Each label at the first offset whose box overlaps no placed label and no marker
    and stays inside the axes; when none does, the offset with the least overlap."""
    from matplotlib.transforms import Bbox

    inside = ax.get_window_extent(renderer)
    # Markers are obstacles too: a label must not hide another row's point.
    r = 6 * ax.figure.dpi / 72
    placed: list[Any] = [
        Bbox.from_extents(px - r, py - r, px + r, py + r)
        for px, py in (ax.transData.transform((x, y)) for x, y, _ in labelled)
    ]
    for x, y, text in labelled:
        best = None
        for dx, dy in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                              fontsize=8, ha="left" if dx >= 0 else "right",
                              va="bottom" if dy >= 0 else "top")
            box = ann.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in placed) + _outside(box, inside)
            if best is not None and cost >= best[0]:
                ann.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (cost, ann, box)
            if cost == 0:
                break
        if best is not None:
            placed.append(best[2])


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box: Any, frame: Any) -> float:
    return box.width * box.height - _overlap(box, frame)


def write_tradeoff_plot(report: Mapping[str, Any], path: str | Path) -> str:
    """Write a PNG of Avg. precision (y) against EOpp1 and against EOdd (x), one labelled
    point per method (lower x is fairer, higher y more accurate): validation split on
    top, test split below; collapsed rows ringed and marked ⚠.

    Returns the file's name (for ``report.json``/``report.md``, which sit beside it).
    """
    fig = tradeoff_figure(report)
    buf = io.BytesIO()
    # No software/date metadata: the same report gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path).name
