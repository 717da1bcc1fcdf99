"""Group accuracy and fairness metrics, with bootstrap confidence intervals.

``_group``: per-group accuracy, precision, recall, F1 and the fairness gaps (DESIGN §3).
``_bootstrap``: paired bootstrap intervals of the gaps and of their changes between methods.
"""

from fairdeploy.metrics._bootstrap import (
    BOOTSTRAP_METRICS,
    LOWER_IS_BETTER,
    BootstrapMetrics,
    ConfidenceInterval,
    PairedDifference,
    bootstrap_metrics,
)
from fairdeploy.metrics._group import UNKNOWN_GROUP, GroupMetrics, group_metrics, privileged_group

__all__ = [
    "BOOTSTRAP_METRICS",
    "LOWER_IS_BETTER",
    "UNKNOWN_GROUP",
    "BootstrapMetrics",
    "ConfidenceInterval",
    "GroupMetrics",
    "PairedDifference",
    "bootstrap_metrics",
    "group_metrics",
    "privileged_group",
]
