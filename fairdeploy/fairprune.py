"""FairPrune (Wu et al. 2022): prune the weights whose removal costs the unprivileged
group least relative to the privileged one.

Every weight θ of the chosen ``nn.Linear``/``nn.Conv2d`` layers gets the saliency
``½ θ² (h0 − β h1)`` — the second-order Taylor estimate of ΔE₀ − β ΔE₁ when θ is set to
zero, with ``h_c`` the diagonal of the Hessian of the mean cross-entropy on group c's
scoring set (group 0 unprivileged, 1 privileged; :mod:`fairdeploy.weight_hessian`) —
and the ``prune_ratio`` fraction with the lowest saliency is set to zero. No
fine-tuning. Pruned weights are stored dense, so the paper's C.R. is 1.000.

Decisions, and where they differ from the public code (``DESIGN.md`` §2 is followed):

* Scope: ``"layer"`` (default, DESIGN: "per layer over the chosen layers") prunes
  ``⌊ratio · n_l⌋`` weights of every chosen layer; ``"global"`` prunes ``⌊ratio · N⌋``
  of all chosen weights together. The public re-implementation
  (johanlaursen/open-fairprune) ranks globally over *all* parameters, biases included,
  with ``k = ⌊ratio · #params⌋``.
* Biases are not pruned. open-fairprune includes them in the global ranking but does
  not write them back (and, because it skips the bias slices of its flat vector while
  writing weights back, later layers receive shifted values — a bug we do not copy).
* Hessian: the exact diagonal of the mean CE per group (open-fairprune: BackPACK's
  ``DiagHessian`` on one full batch per group, the same quantity for a piecewise-linear
  network); groups balanced by the caller (``scoring_indices``), as for FairLRF.
* Ties are broken by position (row-major index; for ``"global"`` the earlier layer in
  the order of ``layers``), so the same inputs always prune the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.scoring import entry_scores
from fairdeploy.weight_hessian import group_pair, resolve_layers
from fairdeploy.weight_selection import (
    SelectionCounts,
    check_beta,
    check_fraction,
    check_scope,
    lowest_entries,
)

__all__ = ["PruneResult", "apply_prune_masks", "fairprune", "fairprune_saliency"]


@dataclass(frozen=True, eq=False)
class PruneResult(SelectionCounts):
    """The outcome of :func:`fairprune`.

    Attributes
    ----------
    model, masks, counts, sizes, beta, scope
        As :class:`~fairdeploy.weight_selection.SelectionCounts`: the pruned copy, in
        eval mode; ``masks`` True where the weight was set to zero.
    prune_ratio : float
        The setting used.
    theoretical_cr : float
        1.0: pruned weights are stored dense (the paper's accounting).
    """

    prune_ratio: float
    theoretical_cr: float = 1.0

    #: Weights pruned over all chosen layers.
    total_pruned = SelectionCounts.selected_total
    #: Pruned weights over all weights of the chosen layers.
    pruned_fraction = SelectionCounts.selected_fraction


def fairprune_saliency(
    model: nn.Module,
    hessians: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    beta: float,
    layers: str | Sequence[str] = "all",
) -> dict[str, torch.Tensor]:
    """FairPrune saliency ``½ θ² (h0 − β h1)`` of every weight of the chosen layers.

    Parameters
    ----------
    model : nn.Module
        The model whose weights θ are scored.
    hessians : mapping
        ``{0: {param name: h0}, 1: {param name: h1}}``: Hessian diagonals on the
        unprivileged (0) and privileged (1) scoring sets, as
        :func:`~fairdeploy.weight_hessian.group_weight_hessians` returns them, with an
        entry ``"<layer>.weight"`` for every chosen layer.
    beta : float
        Trade-off β (finite; the paper uses 3/7 and 1/3 for FairPrune).
    layers : "all" or sequence of str
        Module names (:func:`~fairdeploy.weight_hessian.resolve_layers`).

    Returns
    -------
    dict[str, torch.Tensor]
        ``{layer: saliency}``, float64, the weight's shape, in layer order.
    """
    beta = check_beta(beta)
    out = {}
    for name in resolve_layers(model, layers):
        w = model.get_submodule(name).weight.detach()
        h0, h1 = group_pair(hessians, f"{name}.weight", w)
        out[name] = entry_scores(w.to(h0.device, torch.float64), h0, h1, beta)
    return out


def apply_prune_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``weight[mask] = 0`` in every masked layer.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    masks : mapping of str to torch.Tensor
        Module name → bool tensor of the weight's shape (True = prune).

    Returns
    -------
    nn.Module
        The pruned copy, in the model's mode.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            w = out.get_submodule(name).weight
            if tuple(mask.shape) != tuple(w.shape) or mask.dtype != torch.bool:
                raise FairDeployError(
                    f"mask of {name!r} is {mask.dtype} {tuple(mask.shape)}; allowed: "
                    f"torch.bool of the weight's shape {tuple(w.shape)}"
                )
            w.masked_fill_(mask.to(w.device), 0.0)
    return out


def fairprune(
    model: nn.Module,
    hessians: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    prune_ratio: float,
    beta: float,
    layers: str | Sequence[str] = "all",
    scope: str = "layer",
) -> PruneResult:
    """Prune the ``prune_ratio`` fraction of weights with the lowest FairPrune saliency.

    Parameters
    ----------
    model : nn.Module
        The vanilla model, or a head fed cached features when every chosen layer is in
        it (then evaluate the returned head on the cached features). Not modified.
    hessians : mapping
        ``{0: {...}, 1: {...}}`` Hessian diagonals of the chosen weights, from
        :func:`~fairdeploy.weight_hessian.group_weight_hessians` on balanced scoring
        sets, keyed by role: 0 the unprivileged, 1 the privileged group (re-key when the
        data's ids differ: ``{0: h[unpriv_id], 1: h[priv_id]}``).
    prune_ratio : float
        Fraction in [0, 1] of the chosen weights to prune.
    beta : float
        Trade-off β in ``½ θ² (h0 − β h1)``.
    layers : "all" or sequence of str
        ``"all"``: every ``nn.Linear`` and ``nn.Conv2d`` (DESIGN's default); or module
        names. Biases are never pruned.
    scope : {"layer", "global"}
        ``"layer"``: ``⌊prune_ratio · n_l⌋`` weights of each layer; ``"global"``:
        ``⌊prune_ratio · N⌋`` of all chosen weights ranked together.

    Returns
    -------
    PruneResult
        The pruned copy, masks and per-layer counts.

    Raises
    ------
    FairDeployError
        Bad ratio, β, scope or layer names; Hessians missing, misshapen or not finite.
    """
    prune_ratio = check_fraction("prune_ratio", prune_ratio)
    scope = check_scope(scope)
    saliency = fairprune_saliency(model, hessians, beta=beta, layers=layers)
    masks = lowest_entries(saliency, prune_ratio, scope=scope)
    pruned = apply_prune_masks(model, masks).eval()
    return PruneResult(
        model=pruned,
        masks=masks,
        counts={n: int(m.sum()) for n, m in masks.items()},
        sizes={n: m.numel() for n, m in masks.items()},
        prune_ratio=prune_ratio,
        beta=float(beta),
        scope=scope,
    )
