"""The common intermediate every loader returns: one row per sample, all splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Table"]


@dataclass
class Table:
    """Every sample of a dataset, before splitting.

    ``split`` is set by loaders whose data carries a partition (CelebA's official one,
    a split column); otherwise ``load_splits`` makes a seeded split. Exactly one of
    ``paths`` and ``features`` is set.
    """

    where: str  # names the data in messages
    sample_ids: list[str]
    targets: np.ndarray
    group_values: list[Any] | np.ndarray
    class_names: list[str]
    preprocessing: dict[str, Any]
    split: np.ndarray | None = None
    paths: list[Path] | None = None
    features: torch.Tensor | None = None
    missing_counts_as_bad: bool = True
    attribute: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
