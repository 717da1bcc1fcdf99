"""``truncated_svd``: every target layer replaced by its rank-k truncated SVD (the paper's
"Truncated SVD" row); nothing sparsified."""

from __future__ import annotations

from typing import ClassVar

from fairdeploy.methods._lrf import LowRankMethod, LowRankPlan
from fairdeploy.methods._registry import register_method

__all__ = ["TruncatedSVD", "TruncatedSVDPlan"]


class TruncatedSVDPlan(LowRankPlan):
    """Target layers and their ranks (sr, rr and β are refused: nothing reads them)."""



@register_method
class TruncatedSVD(LowRankMethod[TruncatedSVDPlan]):
    """Truncated SVD ``Wᵀ ≈ U S V`` of each target layer at rank k."""

    name: ClassVar[str] = "truncated_svd"
    label: ClassVar[str] = "Truncated SVD"
    default_compare: ClassVar[bool] = True
    rank_baseline: ClassVar[bool] = True
    order: ClassVar[int] = 10
