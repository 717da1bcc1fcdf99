"""Group accuracy and fairness metrics, with bootstrap confidence intervals.

``_group``: per-group accuracy, precision, recall, F1 and the fairness gaps (DESIGN §3).
``_bootstrap``: paired bootstrap intervals of the gaps and of their changes between methods.
``_summary``: overall and balanced accuracy and per-group class rates (what a selection
constrains). ``_draws``: spread over scoring draws and overlap of their selections.
"""

from fairdeploy.metrics._bootstrap import (
    BOOTSTRAP_METRICS,
    LOWER_IS_BETTER,
    BootstrapMetrics,
    ConfidenceInterval,
    PairedDifference,
    bootstrap_metrics,
)
from fairdeploy.metrics._draws import jaccard, selection_overlap, spread
from fairdeploy.metrics._group import UNKNOWN_GROUP, GroupMetrics, group_metrics, privileged_group
from fairdeploy.metrics._summary import SUMMARY_METRICS, predicted_class_rates, summary_metrics

__all__ = [
    "BOOTSTRAP_METRICS",
    "LOWER_IS_BETTER",
    "SUMMARY_METRICS",
    "UNKNOWN_GROUP",
    "BootstrapMetrics",
    "ConfidenceInterval",
    "GroupMetrics",
    "PairedDifference",
    "bootstrap_metrics",
    "group_metrics",
    "jaccard",
    "predicted_class_rates",
    "privileged_group",
    "selection_overlap",
    "spread",
    "summary_metrics",
]
