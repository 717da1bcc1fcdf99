"""The trade-off plot of a compare run: Avg. precision against EOpp1 and against EOdd.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global backend
state is touched and it works without a display).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fairdeploy._io import atomic_write_bytes

__all__ = ["tradeoff_points", "write_tradeoff_plot"]


def tradeoff_points(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per method of the report: its label and test-split Avg. precision, EOpp1, EOdd
    (None where undefined)."""
    out = []
    for method in report["methods"]:
        m = method["metrics"]
        out.append(
            {
                "name": method["name"],
                "label": method.get("label") or method["name"],
                "avg_precision": m["precision"]["avg"],
                "eopp1": m["fairness"]["eopp1"],
                "eodd": m["fairness"]["eodd"],
            }
        )
    return out


def write_tradeoff_plot(report: Mapping[str, Any], path: str | Path) -> str:
    """Write a PNG with two panels, Avg. precision (y) against EOpp1 and against EOdd (x),
    one labelled point per method (lower x is fairer, higher y more accurate).

    Returns the file's name (for ``report.json``/``report.md``, which sit beside it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = tradeoff_points(report)
    fig = Figure(figsize=(11, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    markers = "osD^v<>ph*X"
    for ax, key, title in zip(
        fig.subplots(1, 2), ("eopp1", "eodd"), ("EOpp1 (mean |ΔTPR|)", "EOdd (mean, halved)"),
        strict=True,
    ):
        at: dict[tuple[float, float], list[str]] = {}
        for i, p in enumerate(points):
            if p[key] is None or p["avg_precision"] is None:
                continue
            ax.scatter(p[key], p["avg_precision"], marker=markers[i % len(markers)], s=60,
                       label=p["label"], zorder=3)
            at.setdefault((round(p[key], 6), round(p["avg_precision"], 6)), []).append(p["name"])
        # Rows with the same numbers (e.g. an SVD that changed no prediction) share a label.
        for (x, y), names in at.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.margins(0.15)
        ax.set_xlabel(f"{title} ↓ (test split)")
        ax.set_ylabel("Avg. precision ↑ (macro, mean of the groups)")
        ax.grid(True, alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize=8)
    fig.suptitle("Accuracy against fairness, per method")
    buf = io.BytesIO()
    # No software/date metadata: the same report gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path).name
