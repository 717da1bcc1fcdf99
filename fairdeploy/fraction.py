"""A fraction of a count: ``⌊fraction · n⌋`` and the check that a fraction lies in [0, 1].

The one home of the counting rule that every method shares: how many rows and columns a
sparse SVD selects (``⌊sr · D⌋``), how many entries a selected row keeps (``⌊rr · k⌋``),
how many weights FairPrune prunes or FairQuantize quantizes (``⌊ratio · n⌋``).
"""

from __future__ import annotations

import math
from fractions import Fraction

from fairdeploy.errors import FairDeployError

__all__ = ["check_fraction", "fraction_count", "kept_entries", "num_selected"]


def check_fraction(name: str, value: object, *, allow_zero: bool = True) -> float:
    """``value`` as a float in [0, 1] (or (0, 1]), else a FairDeployError naming ``name``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or math.isnan(value) or not (0.0 <= value <= 1.0) or (value == 0 and not allow_zero):
        allowed = "[0, 1]" if allow_zero else "(0, 1]"
        raise FairDeployError(f"{name}={value!r} is not allowed; use a fraction in {allowed}")
    return float(value)


def fraction_count(fraction: float, n: int) -> int:
    """``⌊fraction · n⌋``, exact for fractions written in decimal or as small ratios.

    The float is read as the nearest fraction with a denominator up to 10⁹ (0.29 is
    29/100, 5/9 is 5/9), so ``0.29 · 100`` is 29 and not 28 through rounding error,
    however large ``n`` is.
    """
    return math.floor(Fraction(fraction).limit_denominator(10**9) * n)


def num_selected(sr: float, dim: int) -> int:
    """Rows (or columns) a sparse SVD selects: ``⌊sr · dim⌋`` (``sr`` checked in [0, 1])."""
    return fraction_count(check_fraction("sr", sr), dim)


def kept_entries(rr: float, rank: int) -> int:
    """Entries a selected row/column keeps: ``⌊rr · k⌋`` (rr = 0 zeroes it whole)."""
    return fraction_count(check_fraction("rr", rr), rank)
