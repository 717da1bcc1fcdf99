"""``--select``: the rule that picks a sweep point on the validation split, and the
collapse guard every selection applies.

The rule's grammar and parser live in :mod:`fairdeploy.grammar` (below both the recipe
and the sweep; re-exported here): ``min eodd s.t. avg_precision >= vanilla - 0.01``.
Values are validation-split values; with several scoring draws the rule reads each
metric's median over the draws. Ties in the objective go to the higher C.R., then to the
earlier grid point.

**The collapse guard.** A model drifting toward one class can lower every fairness gap
and even raise macro precision (few positive predictions, mostly right), so every
selection also rejects a point whose accuracy or balanced accuracy (macro recall) falls
more than the tolerance below vanilla's, or where any group's rate of predicting any
class falls below half of vanilla's — in ANY draw, not only the median. The tolerance is
the largest ``t`` of the rule's ``METRIC >= vanilla - t`` constraints on accuracy-like
metrics (accuracy, balanced_accuracy, avg_precision, avg_recall, avg_f1; 0.01 when it
has none), unless given; a constraint on a fairness gap or the C.R. never loosens it. A
point whose accuracy, macro recall or a group's class rate is undefined (NaN) where
vanilla's is defined fails the guard. The guard can be switched off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fairdeploy.grammar import (
    ACCURACY_LIKE,
    DEFAULT_GUARD_TOLERANCE,
    GRAMMAR,
    SELECT_METRICS,
    Constraint,
    Selection,
    parse_selection,
)

__all__ = [
    "ACCURACY_LIKE",
    "DEFAULT_GUARD_TOLERANCE",
    "GRAMMAR",
    "SELECT_METRICS",
    "Constraint",
    "Selection",
    "guard_reasons",
    "parse_selection",
]

def guard_reasons(
    draws: Sequence[Mapping[str, Any]],
    vanilla: Mapping[str, Any],
    *,
    tolerance: float,
    class_names: Sequence[str],
    group_names: Sequence[str],
    seeds: Sequence[int | None] | None = None,
) -> list[str]:
    """Why the collapse guard rejects a point (empty: it passes).

    Parameters
    ----------
    draws : sequence of mappings
        The point's metrics per scoring draw (:func:`~fairdeploy.metrics.summary_metrics`
        results: ``accuracy``, ``balanced_accuracy``, ``predicted_rates``).
    vanilla : mapping
        The vanilla model's metrics on the same split.
    tolerance : float
        Allowed drop of accuracy and balanced accuracy below vanilla's.
    class_names, group_names : sequences of str
        For the messages.
    seeds : sequence, optional
        The draws' seeds, named in the messages when there are several draws.

    Returns
    -------
    list of str
        One reason per failed check, for the first draw that fails.
    """
    for d, m in enumerate(draws):
        reasons = []
        for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "macro recall")):
            value, ref = m.get(key), vanilla.get(key)
            if ref is None or math.isnan(ref):
                continue
            if value is None or math.isnan(value):
                reasons.append(f"{label} is undefined (vanilla's is {ref:.4f})")
            elif value < ref - tolerance - 1e-12:
                reasons.append(
                    f"{label} {value:.4f} < vanilla's {ref:.4f} − {tolerance:g}"
                )
        rates, ref_rates = m.get("predicted_rates"), vanilla.get("predicted_rates")
        if rates is not None and ref_rates is not None:
            for g, (row, ref_row) in enumerate(zip(rates, ref_rates, strict=True)):
                for k, (r, ref) in enumerate(zip(row, ref_row, strict=True)):
                    if ref is None or math.isnan(ref) or ref <= 0:
                        continue
                    if r is None or math.isnan(r):
                        reasons.append(
                            f"group {group_names[g]!r}'s rate of predicting class "
                            f"{class_names[k]!r} is undefined (vanilla's is {100 * ref:.1f} %)"
                        )
                    elif r < 0.5 * ref:
                        reasons.append(
                            f"group {group_names[g]!r} predicts class {class_names[k]!r} for "
                            f"{100 * r:.1f} % of its samples, below half of vanilla's "
                            f"{100 * ref:.1f} %"
                        )
        if reasons:
            if seeds is not None and len(draws) > 1:
                reasons = [f"draw seed {seeds[d]}: {reasons[0]}", *reasons[1:]]
            return reasons
    return []
