"""How much a result depends on the scoring draw: spread of a metric over draws, and the
overlap of the rows/columns that different draws selected.

FairLRF's selection is computed from Hessians on sampled scoring sets; two draws of the
same size can select different rows and move the fairness gaps by as much as the
method's whole effect. Bootstrap intervals over test samples cannot see that: these
summaries can.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["jaccard", "selection_overlap", "spread"]


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, minimum and maximum of a metric over draws (undefined values left out).

    Returns
    -------
    dict
        ``{"median", "min", "max", "values"}``; the statistics are None when no value
        is defined. ``values`` keeps every draw's value (None where undefined), in draw
        order.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    out: dict[str, Any] = {"median": None, "min": None, "max": None}
    if kept:
        out = {"median": float(np.median(kept)), "min": min(kept), "max": max(kept)}
    out["values"] = [None if v is None or math.isnan(float(v)) else float(v) for v in values]
    return out


def jaccard(a: Sequence[int] | set[int], b: Sequence[int] | set[int]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two index sets; 1.0 when both are empty."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def selection_overlap(
    selections: Sequence[Mapping[str, Mapping[str, Sequence[int]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Overlap (Jaccard) of the selected rows and columns across draws, per layer.

    Parameters
    ----------
    selections : sequence of mappings
        One ``Processed.selections`` per draw: ``{layer: {"rows": [...], "cols": [...]}}``.

    Returns
    -------
    dict
        ``{layer: {"rows": {"mean", "min"}, "cols": {"mean", "min"}}}``: the mean and the
        smallest Jaccard index over all pairs of draws (1.0 = every draw selected the same
        set). Empty with fewer than two draws.
    """
    if len(selections) < 2:
        return {}
    layers: list[str] = []
    for sel in selections:
        layers += [name for name in sel if name not in layers]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer in layers:
        out[layer] = {}
        for part in ("rows", "cols"):
            sets = [set(sel.get(layer, {}).get(part, ())) for sel in selections]
            pairs = [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]
            out[layer][part] = {"mean": float(np.mean(pairs)), "min": float(min(pairs))}
    return out
