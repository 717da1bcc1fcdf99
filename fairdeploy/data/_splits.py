"""Seeded train/val/test splits and the per-split checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fairdeploy.data_specs import SplitSpec
from fairdeploy.errors import FairDeployError

__all__ = ["SPLITS", "parse_split_values", "seeded_split", "subsample"]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": 0, "training": 0, "0": 0,
    "val": 1, "valid": 1, "validation": 1, "dev": 1, "1": 1,
    "test": 2, "testing": 2, "2": 2,
}  # fmt: skip


def seeded_split(n: int, spec: SplitSpec, *, labels: np.ndarray | None = None) -> np.ndarray:
    """Split ids (0 train, 1 val, 2 test) for ``n`` samples.

    ``random``: one seeded permutation; the first ``round(train·n)`` samples go to
    train, the next ``round(val·n)`` to val, the rest to test. ``stratified``: the same
    within each class of ``labels`` (classes in sorted order, one generator), so every
    split keeps the class proportions. The result depends only on ``n``, the labels,
    the fractions and the seed.
    """
    rng = np.random.default_rng(spec.seed)
    out = np.full(n, 2, dtype=np.int8)
    if spec.mode == "stratified":
        if labels is None:
            raise ValueError("stratified split needs labels")
        labels = np.asarray(labels)
        for cls in np.unique(labels):
            _assign(out, np.flatnonzero(labels == cls), spec, rng)
    else:
        _assign(out, np.arange(n), spec, rng)
    return out


def _assign(out: np.ndarray, idx: np.ndarray, spec: SplitSpec, rng: np.random.Generator) -> None:
    idx = idx[rng.permutation(len(idx))]
    n_train = round(spec.train * len(idx))
    n_val = min(round(spec.val * len(idx)), len(idx) - n_train)
    out[idx[:n_train]] = 0
    out[idx[n_train : n_train + n_val]] = 1


def parse_split_values(values: Sequence[object], *, where: str) -> np.ndarray:
    """Split ids from a split column (``train``/``val``/``test``, ``valid``, 0/1/2)."""
    out = np.empty(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        key = str(v).strip().lower()
        if key.endswith(".0"):
            key = key[:-2]
        sid = _SPLIT_ALIASES.get(key)
        if sid is None:
            raise FairDeployError(
                f"{where}: split value {v!r} (row {i + 1}) is not allowed (use train, val or "
                "test, or 0/1/2)"
            )
        out[i] = sid
    return out


def subsample(n: int, max_samples: int | None, *, seed: int, split: str) -> np.ndarray:
    """Indices of at most ``max_samples`` of ``n`` items, seeded, in increasing order."""
    if max_samples is None or n <= max_samples:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    return np.sort(rng.choice(n, size=max_samples, replace=False)).astype(np.int64)


def check_groups_present(
    groups: np.ndarray, group_names: Sequence[str], *, split: str, attribute: str,
    values: dict[str, list[object]],
) -> None:
    """Raise when a split has no sample of some group (metrics would be undefined)."""
    for gid, name in enumerate(group_names):
        if not (groups == gid).any():
            raise FairDeployError(
                f"split {split!r} has no sample of group {name!r} (sensitive.attribute "
                f"{attribute!r} values {values[name]}): check sensitive.groups, data.split "
                "and data.max_samples"
            )
