"""The sweep's plots (PNG): the paper's Figure-4 panels and the accuracy–fairness front.

- ``fig4_<key>.png`` for every grid key with more than one value: Avg. precision, EOpp1
  and EOdd against that key, the other settings held at the reference point (the chosen
  point, else the recipe's own setting), vanilla and truncated SVD at the reference's
  rank drawn as horizontal lines; with several scoring draws the markers are medians
  and the bars span the draws' range.
- ``pareto.png``: Avg. precision against EOdd for every valid point, the Pareto front
  (no other point has both lower EOdd and higher Avg. precision), points the collapse
  guard rejects greyed, vanilla, truncated SVD and the chosen point marked; the view is
  fitted to the points the guard keeps and the references.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fairdeploy._io import atomic_path
from fairdeploy.sweep._run import SweepRow

__all__ = ["pareto_figure", "pareto_front", "plot_figure4", "plot_pareto", "write_plots"]

_PANELS = (("avg_precision", "Avg. precision"), ("eopp1", "EOpp1 ↓"), ("eodd", "EOdd ↓"))
_LABELS = {"sr": "sr", "rr": "rr", "beta": "β", "rank": "rank k", "layer": "layer"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


def _matches(row: SweepRow, ref: Mapping[str, Any], free: str, keys: Sequence[str]) -> bool:
    return all(row.settings.get(k) == ref.get(k) for k in keys if k != free)


def plot_figure4(
    rows: Sequence[SweepRow],
    key: str,
    reference: Mapping[str, Any],
    varying: Sequence[str],
    path: Path,
) -> Path | None:
    """One Figure-4 panel row: the three metrics against ``key``, others at ``reference``.

    Returns None when no method has two points along ``key`` at the reference.
    """
    by_index = {r.index: r for r in rows}
    vanilla = next(r for r in rows if r.kind == "vanilla")
    series: dict[str, list[SweepRow]] = {}
    for r in rows:
        if r.kind == "point" and r.status == "ok" and _matches(r, reference, key, varying):
            series.setdefault(r.method, []).append(r)
    series = {m: pts for m, pts in series.items() if len(pts) > 1}
    if not series:
        return None
    categorical = any(
        not isinstance(r.settings.get(key), int | float) for pts in series.values() for r in pts
    )
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, len(_PANELS))
    ticks: list[str] = []
    for pts in series.values():
        for r in pts:
            label = str(r.settings.get(key))
            if label not in ticks:
                ticks.append(label)
    for ax, (metric, title) in zip(axes, _PANELS, strict=True):
        for method, pts in series.items():
            xs = [
                ticks.index(str(r.settings.get(key))) if categorical else r.settings.get(key)
                for r in pts
            ]
            med = [r.value(metric) for r in pts]
            lo = [m - (r.metrics[metric]["min"] if r.metrics[metric]["min"] is not None else m)
                  if m is not None else 0 for r, m in zip(pts, med, strict=True)]
            hi = [(r.metrics[metric]["max"] if r.metrics[metric]["max"] is not None else m) - m
                  if m is not None else 0 for r, m in zip(pts, med, strict=True)]
            ys = [float("nan") if m is None else m for m in med]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
        v = vanilla.value(metric)
        if v is not None:
            ax.axhline(v, color="black", linestyle="--", linewidth=1, label="vanilla")
        refs = {
            r.reference for pts in series.values() for r in pts if r.reference is not None
        }
        if len(refs) == 1:
            s = by_index[refs.pop()].value(metric)
            if s is not None:
                ax.axhline(s, color="grey", linestyle=":", linewidth=1.5,
                           label="truncated SVD (same rank)")
        ax.set_title(title)
        ax.set_xlabel(_LABELS.get(key, key))
        if categorical:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels(ticks, rotation=20, fontsize=8)
        ax.grid(alpha=0.3)
    held = ", ".join(
        f"{_LABELS.get(k, k)}={reference.get(k):.3g}" if isinstance(reference.get(k), float)
        else f"{_LABELS.get(k, k)}={reference.get(k)}"
        for k in varying if k != key and reference.get(k) is not None
    )
    title = f"Validation split: {_LABELS.get(key, key)} varied"
    fig.suptitle(title + (f" ({held})" if held else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (eodd, avg_precision) no other point dominates (lower or equal
    EOdd and higher or equal precision, one of them strictly), sorted by EOdd."""
    front = []
    for i, (e, p) in enumerate(points):
        dominated = any(
            (e2 <= e and p2 >= p) and (e2 < e or p2 > p)
            for j, (e2, p2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(rows: Sequence[SweepRow], path: Path) -> Path | None:
    """Avg. precision against EOdd with the Pareto front (see the module docstring)."""
    fig = pareto_figure(rows)
    return None if fig is None else _save(fig, path)


def pareto_figure(rows: Sequence[SweepRow]) -> Any:
    """The figure of :func:`plot_pareto` (None without a valid point).

    The view is fitted to the points the collapse guard keeps, vanilla, truncated SVD and
    the chosen point, so a collapsed point far away does not squeeze them into a corner;
    guard-rejected points outside the view are counted in the legend.
    """
    pts = [
        r for r in rows
        if r.kind == "point" and r.status == "ok"
        and r.value("eodd") is not None and r.value("avg_precision") is not None
    ]
    if not pts:
        return None
    fig = _figure(7, 5)
    ax = fig.subplots()
    ok = [r for r in pts if r.guard in ("ok", "off", "")]
    bad = [r for r in pts if r not in ok]
    vanilla = next(r for r in rows if r.kind == "vanilla")
    refs = [r for r in rows if r.kind == "reference" and r.value("eodd") is not None
            and r.value("avg_precision") is not None]
    chosen = [r for r in pts if r.chosen]
    focus = [r for r in (*ok, vanilla, *refs, *chosen) if r.value("eodd") is not None
             and r.value("avg_precision") is not None]
    (x0, x1), (y0, y1) = _view([r.value("eodd") for r in focus]), _view(
        [r.value("avg_precision") for r in focus])
    outside = [r for r in bad
               if not (x0 <= r.value("eodd") <= x1 and y0 <= r.value("avg_precision") <= y1)]
    if bad:
        note = f" ({len(outside)} outside this view)" if outside else ""
        ax.scatter([r.value("eodd") for r in bad], [r.value("avg_precision") for r in bad],
                   marker="x", color="lightgrey", label="rejected by the collapse guard" + note)
    for m in sorted({r.method for r in ok}):
        mine = [r for r in ok if r.method == m]
        ax.scatter([r.value("eodd") for r in mine], [r.value("avg_precision") for r in mine],
                   s=18, alpha=0.8, label=m)
    if ok:
        xy = [(r.value("eodd"), r.value("avg_precision")) for r in ok]
        front = pareto_front(xy)  # type: ignore[arg-type]
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red",
                linewidth=1, drawstyle="steps-post", label="Pareto front")
    if vanilla.value("eodd") is not None and vanilla.value("avg_precision") is not None:
        ax.scatter([vanilla.value("eodd")], [vanilla.value("avg_precision")], marker="*",
                   s=160, color="black", label="vanilla", zorder=5)
    if refs:
        ax.scatter([r.value("eodd") for r in refs], [r.value("avg_precision") for r in refs],
                   marker="D", s=40, facecolors="none", edgecolors="grey",
                   label="truncated SVD", zorder=4)
    if chosen:
        ax.scatter([chosen[0].value("eodd")], [chosen[0].value("avg_precision")], s=200,
                   facecolors="none", edgecolors="tab:red", linewidths=2, label="chosen", zorder=6)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("EOdd ↓ (validation)")
    ax.set_ylabel("Avg. precision (validation)")
    ax.set_title("Accuracy–fairness trade-off of the sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _view(values: Sequence[float]) -> tuple[float, float]:
    """Axis limits around ``values`` with 12 % margins (a small fixed span when they are
    all equal)."""
    lo, hi = min(values), max(values)
    pad = 0.12 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def write_plots(
    directory: Path,
    rows: Sequence[SweepRow],
    grid: Mapping[str, Sequence[Any]],
    reference: Mapping[str, Any],
) -> list[Path]:
    """Every plot of the sweep into ``directory`` (created); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    points = [r for r in rows if r.kind == "point"]
    varying = [k for k in grid if len({str(r.settings.get(k)) for r in points}) > 1]
    written = []
    for key in varying:
        path = plot_figure4(rows, key, reference, varying, directory / f"fig4_{key}.png")
        if path is not None:
            written.append(path)
    path = plot_pareto(rows, directory / "pareto.png")
    if path is not None:
        written.append(path)
    return written
