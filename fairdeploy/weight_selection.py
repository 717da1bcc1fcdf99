"""Choose the lowest-scoring fraction of the entries of several weight tensors.

Shared by FairPrune (prune the lowest saliencies) and FairQuantize (quantize the lowest
rounding scores): a fraction of the entries per layer (``scope="layer"``) or of all
chosen layers together (``scope="global"``), ties broken by position, counts floored
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.fraction import check_fraction, fraction_count

__all__ = [
    "SCOPES",
    "SelectionCounts",
    "check_beta",
    "check_fraction",
    "check_scope",
    "fraction_count",
    "lowest_entries",
    "selection_counts",
]

#: Where a fraction is taken: of each layer's weights, or of all chosen weights together.
SCOPES = ("layer", "global")


@dataclass(frozen=True, eq=False)
class SelectionCounts:
    """What the results of FairPrune and FairQuantize share, and what their per-layer
    selection adds up to.

    Attributes
    ----------
    model : nn.Module
        The processed copy (the caller's model is unchanged), in eval mode.
    masks : dict[str, torch.Tensor]
        Per chosen layer (module name), a bool tensor of the weight's shape, True where
        the entry was selected (pruned, quantized).
    counts : dict[str, int]
        Per layer, the number of selected entries (``masks[l].sum()``).
    sizes : dict[str, int]
        Per layer, the number of entries.
    beta : float
    scope : str
        ``"layer"`` or ``"global"``.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    counts: dict[str, int]
    sizes: dict[str, int]
    beta: float
    scope: str

    @property
    def selected_total(self) -> int:
        """Entries selected over all chosen layers."""
        return sum(self.counts.values())

    @property
    def selected_fraction(self) -> float:
        """Entries selected over all entries of the chosen layers."""
        return self.selected_total / max(1, sum(self.sizes.values()))


def check_beta(beta: object) -> float:
    """``beta`` as a float if it is a finite number, else a FairDeployError."""
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
        raise FairDeployError(f"beta={beta!r} is invalid; allowed: a finite number (e.g. 5/9)")
    return float(beta)


def check_scope(scope: object) -> str:
    """``scope`` if it is one of :data:`SCOPES`, else a FairDeployError."""
    if scope not in SCOPES:
        raise FairDeployError(
            f"scope={scope!r} is unknown; allowed: 'layer' (a fraction of each layer's "
            "weights) or 'global' (of all chosen weights together)"
        )
    return str(scope)


def selection_counts(
    sizes: Mapping[str, int], fraction: float, scope: str
) -> dict[str, int] | int:
    """How many entries a selection takes: ``{layer: ⌊fraction·n_l⌋}`` for ``"layer"``,
    one ``⌊fraction·Σ n_l⌋`` for ``"global"``."""
    if check_scope(scope) == "layer":
        return {name: fraction_count(fraction, n) for name, n in sizes.items()}
    return fraction_count(fraction, sum(sizes.values()))


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of a 1-D tensor; among equal scores the lower index
    first. A selection (``kthvalue``) and a scan, not a sort: 45 M VGG-11 weights take
    about a second instead of 13."""
    n = scores.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    kth = torch.kthvalue(scores, k).values
    mask = scores < kth
    need = k - int(mask.sum())
    ties = torch.nonzero(scores == kth).flatten()[:need]  # nonzero is in index order
    mask[ties] = True
    return mask


def lowest_entries(
    scores: Mapping[str, torch.Tensor], fraction: float, *, scope: str = "layer"
) -> dict[str, torch.Tensor]:
    """Boolean masks of the lowest-scoring entries.

    Parameters
    ----------
    scores : mapping of str to torch.Tensor
        Per layer, a score for every entry (any shape). Entries scored ``-inf`` come
        first (FairQuantize marks entries chosen in an earlier step that way).
    fraction : float
        In [0, 1]: ``"layer"`` takes ``⌊fraction · n_l⌋`` entries of each layer,
        ``"global"`` takes ``⌊fraction · N⌋`` of all N entries together
        (:func:`fraction_count`).
    scope : {"layer", "global"}

    Returns
    -------
    dict[str, torch.Tensor]
        Per layer, a bool tensor of the score's shape, True where chosen. Ties are
        broken by position: the lower row-major index first, and for ``"global"`` the
        earlier layer in the order of ``scores`` first.

    Raises
    ------
    FairDeployError
        A NaN or +inf score, a fraction outside [0, 1], an unknown scope.
    """
    fraction = check_fraction("fraction", fraction)
    check_scope(scope)
    flat = {name: s.detach().reshape(-1) for name, s in scores.items()}
    for name, s in flat.items():
        if not bool((s < math.inf).all()):  # one pass: False for NaN and +inf
            raise FairDeployError(
                f"layer {name!r} has NaN or +inf scores: check its weights and Hessian "
                "diagonals for NaN/inf"
            )
    masks = {n: torch.zeros(s.numel(), dtype=torch.bool, device=s.device) for n, s in flat.items()}
    if scope == "layer":
        for name, s in flat.items():
            masks[name] = _lowest_k(s, fraction_count(fraction, s.numel()))
    elif flat:
        names = list(flat)
        device = flat[names[0]].device
        allv = torch.cat([flat[n].to(dtype=torch.float64, device=device) for n in names])
        chosen = _lowest_k(allv, fraction_count(fraction, allv.numel()))
        start = 0
        for n in names:
            size = flat[n].numel()
            masks[n] = chosen[start : start + size].to(flat[n].device)
            start += size
    return {name: masks[name].view(scores[name].shape) for name in scores}
