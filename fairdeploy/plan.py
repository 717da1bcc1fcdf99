"""What a method does to a model, as plain values (no weights).

A :class:`Plan` is the resolved, weight-free description of a compression run: the
method and, per target layer, the rank and sparse-SVD settings. Compression accounting
(:func:`fairdeploy.theoretical_cr`), ``optimize --dry-run``, export metadata and the
report all read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fairdeploy.errors import FairDeployError

__all__ = ["LRF_METHODS", "METHODS", "LayerPlan", "Plan", "kept_entries", "num_selected"]

#: Methods that factorize target layers with truncated SVD.
LRF_METHODS = ("truncated_svd", "slr_w", "slr_a", "fairlrf")
#: Every method name a plan may carry.
METHODS = ("vanilla", *LRF_METHODS, "fairprune", "fairquantize")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= float(value) <= 1.0) or math.isnan(value):
        raise FairDeployError(f"{name}={value!r} is outside [0, 1]: use a fraction such as 0.5")


def num_selected(sr: float, dim: int) -> int:
    """Rows (or columns) a sparse SVD selects: ``⌊sr · dim⌋``."""
    _check_fraction("sr", sr)
    # The small epsilon keeps 0.3 * 10 from flooring to 2 through float error.
    return math.floor(sr * dim + 1e-9)


def kept_entries(rr: float, rank: int) -> int:
    """Entries a selected row/column keeps: ``⌊rr · k⌋`` (rr = 0 zeroes it whole)."""
    _check_fraction("rr", rr)
    return math.floor(rr * rank + 1e-9)


@dataclass(frozen=True)
class LayerPlan:
    """Settings for one target layer.

    Attributes
    ----------
    layer : str
        Qualified module name of an ``nn.Linear`` (e.g. ``classifier.3``).
    rank : int
        Truncated-SVD rank k, ``1 ≤ k ≤ min(Din, Dout)``.
    sr : float
        Fraction of rows of U and of columns of V that are sparsified.
    rr : float
        Fraction of the k entries a sparsified row/column KEEPS (``⌊rr·k⌋``);
        ``rr = 0`` zeroes the selected rows/columns entirely.
    beta : float
        FairLRF trade-off β in ``½θ²(h0 − β h1)``.
    """

    layer: str
    rank: int
    sr: float = 0.0
    rr: float = 0.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise FairDeployError(
                f"rank={self.rank!r} for layer {self.layer!r} is not allowed: "
                "use an integer ≥ 1"
            )
        _check_fraction("sr", self.sr)
        _check_fraction("rr", self.rr)


@dataclass(frozen=True)
class Plan:
    """A method and its per-layer settings.

    Attributes
    ----------
    method : str
        One of :data:`METHODS`.
    layers : tuple of LayerPlan
        Target layers for LRF methods (empty for ``vanilla``).
    prune_ratio : float
        FairPrune: fraction of the chosen weights pruned (stored dense, C.R. 1).
    quantize_ratio : float
        FairQuantize: fraction q of all weights quantized to int8.
    """

    method: str
    layers: tuple[LayerPlan, ...] = field(default_factory=tuple)
    prune_ratio: float = 0.0
    quantize_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FairDeployError(
                f"method {self.method!r} is unknown: use one of {', '.join(METHODS)}"
            )
        object.__setattr__(self, "layers", tuple(self.layers))
        _check_fraction("prune_ratio", self.prune_ratio)
        _check_fraction("quantize_ratio", self.quantize_ratio)
        names = [lp.layer for lp in self.layers]
        if len(set(names)) != len(names):
            raise FairDeployError(f"a layer is listed twice in the plan: {names}")

    @property
    def is_lrf(self) -> bool:
        """Whether the method factorizes layers (truncated SVD and the sparse SVDs)."""
        return self.method in LRF_METHODS
