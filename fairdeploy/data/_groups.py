"""Sensitive groups: raw attribute values → group ids 0..G−1, −1 for unknown."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fairdeploy.data_specs import normalize_value

__all__ = ["UNKNOWN_GROUP", "assign_groups"]

#: Group id of samples whose attribute value is in no group (left out of scoring/metrics).
UNKNOWN_GROUP = -1


def assign_groups(values: Iterable[Any], groups: Mapping[str, Sequence[Any]]) -> np.ndarray:
    """Map raw attribute values to group ids.

    Parameters
    ----------
    values : iterable
        One raw value per sample (``"1"``, ``1``, ``1.0`` and ``-1`` all compare by
        :func:`fairdeploy.recipe.normalize_value`).
    groups : mapping
        Group name → raw values, in group-id order.

    Returns
    -------
    numpy.ndarray
        int64 ids: the position of the sample's group in ``groups``, or −1 when the
        value is in no group.
    """
    lookup = {
        normalize_value(v): gid for gid, members in enumerate(groups.values()) for v in members
    }
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Map each distinct value once: tables have ~10^5 rows but a handful of values.
    uniq, inverse = np.unique(arr, return_inverse=True)
    ids = np.array(
        [lookup.get(normalize_value(u), UNKNOWN_GROUP) for u in uniq.tolist()], dtype=np.int64
    )
    return ids[inverse.reshape(-1)]
