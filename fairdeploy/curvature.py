"""The curvature engine that :mod:`fairdeploy.scoring` (factor Hessians of a
``FactorizedLinear``) and :mod:`fairdeploy.weight_hessian` (weight Hessians of Linear and
Conv layers) share: checked inputs, samples per group, the estimators' options, and the
vector-Jacobian products whose squares add up to a curvature diagonal (``exact``:
Gauss–Newton, ``fisher``: observed labels, ``ggn_mc``: labels drawn from the model).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fairdeploy.errors import FairDeployError

__all__ = [
    "ESTIMATORS",
    "TEMP_ELEMENTS",
    "as_inputs",
    "check_options",
    "class_block",
    "curvature_vjps",
    "draw_labels",
    "group_samples",
]

#: Hessian-diagonal estimators the curvature engine offers.
ESTIMATORS = ("exact", "fisher", "ggn_mc")

#: Bound on the elements of one temporary (C-fold or k-fold intermediates) so that
#: memory stays near 64 MiB in float32 whatever batch_size is.
TEMP_ELEMENTS = 1 << 24


def as_inputs(features: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``features`` and ``targets`` as tensors (targets as int64 class indices), or a
    FairDeployError naming what is wrong: no samples, one target per row, integer targets."""
    feats = torch.as_tensor(features)
    tgt = torch.as_tensor(targets)
    if feats.ndim < 1 or feats.shape[0] == 0:
        raise FairDeployError(
            f"features has shape {tuple(feats.shape)}; allowed: at least one sample (N ≥ 1)"
        )
    if tgt.ndim != 1 or tgt.shape[0] != feats.shape[0]:
        raise FairDeployError(
            f"targets has shape {tuple(tgt.shape)}; allowed: ({feats.shape[0]},), one class "
            "index per row of features"
        )
    if tgt.dtype.is_floating_point or tgt.dtype.is_complex or tgt.dtype == torch.bool:
        raise FairDeployError(f"targets has dtype {tgt.dtype}; allowed: integer class indices")
    return feats, tgt.long()


def group_samples(
    groups: torch.Tensor | np.ndarray | Sequence[int], group_ids: Sequence[int], n: int,
    per: str,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(group id, indices of its samples)`` for each of ``group_ids``, in that order.

    ``groups`` must hold one id per ``per`` (n of them); a group without samples is
    refused when its turn comes, so the groups before it are computed first.
    """
    g = torch.as_tensor(np.asarray(groups)).reshape(-1)
    if g.shape[0] != n:
        raise FairDeployError(f"groups has {g.shape[0]} entries; allowed: one per {per} ({n})")
    for gid in group_ids:
        idx = torch.nonzero(g == int(gid)).flatten()
        if idx.numel() == 0:
            raise FairDeployError(
                f"group {int(gid)} has no samples (groups present: "
                f"{sorted(set(g.tolist()))}); every group in group_ids needs at least one"
            )
        yield int(gid), idx


def check_options(estimator: str, batch_size: int, mc_samples: int) -> None:
    """A FairDeployError unless ``estimator`` is one of :data:`ESTIMATORS` and
    ``batch_size`` and ``mc_samples`` are integers ≥ 1."""
    if estimator not in ESTIMATORS:
        raise FairDeployError(
            f"estimator={estimator!r} is unknown; allowed: {', '.join(ESTIMATORS)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FairDeployError(f"batch_size={batch_size!r} is invalid; allowed: an integer ≥ 1")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise FairDeployError(f"mc_samples={mc_samples!r} is invalid; allowed: an integer ≥ 1")


def class_block(n: int, width: int, c: int) -> int:
    """Cotangents per vmapped backward so that a (block, n, max(width, C)) temporary
    stays near ``TEMP_ELEMENTS`` elements."""
    return max(1, TEMP_ELEMENTS // max(1, n * max(width, c)))


def curvature_vjps(
    logits: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    draws: torch.Tensor | None = None,
) -> Iterator[tuple[tuple[torch.Tensor, ...], float]]:
    """VJPs of the logits at ``outputs`` whose squares add up to a curvature diagonal.

    The shared engine of every estimator here and in :mod:`fairdeploy.weight_hessian`.
    Yields ``(vjps, weight)`` per block of cotangents, ``vjps[i]`` of shape
    ``(block, n, *outputs[i].shape[1:])``: for a quantity ``g_n`` linear in the VJP
    (a layer output's, or a weight's per-sample gradient),
    ``Σ_blocks weight · Σ_b g_nb²`` is

    * ``exact`` (neither ``labels`` nor ``draws``): the Gauss–Newton diagonal
      ``diag(Gᵀ Λ_n G)``, from the C cotangents ``r_c = √p_c (e_c − p)`` with
      ``Σ_c r_c r_cᵀ = Λ_n = diag(p_n) − p_n p_nᵀ`` (sums of squares: no cancellation
      the way ``pᵀJ² − (pᵀJ)²`` can cancel);
    * ``fisher`` (``labels``, shape (n,)): the squared per-sample gradient of CE with
      the observed label, cotangent ``p_n − e_{y_n}``;
    * ``ggn_mc`` (``draws``, shape (m, n)): the same averaged over m label draws
      (``weight`` = 1/m), an unbiased estimate of ``exact`` since
      ``E[(p − e_y)(p − e_y)ᵀ] = Λ``.

    ``logits`` must carry a graph back to every output. Blocks of more than one
    cotangent run as one vmapped backward; an output the logits do not depend on gets
    zeros.
    """
    p = torch.softmax(logits.detach(), dim=-1)
    n, c = p.shape
    width = sum(math.prod(o.shape[1:]) for o in outputs)
    if labels is not None:
        draws = labels[None]
    exact = draws is None
    total = c if draws is None else draws.shape[0]
    weight = 1.0 if draws is None else 1.0 / draws.shape[0]
    sp = p.sqrt()
    block = class_block(n, width, c)
    for b0 in range(0, total, block):
        b1 = min(total, b0 + block)
        if exact:
            cls = torch.arange(b0, b1, device=p.device)
            cot = -sp.T[cls, :, None] * p[None]  # cot[b, n, :] = √p_nc (e_c − p_n), c = cls[b]
            cot[torch.arange(len(cls)), :, cls] += sp.T[cls]
        else:
            cot = p[None] - F.one_hot(draws[b0:b1], c).to(p.dtype)  # ∂CE_n/∂logits_n
        more = b1 < total
        if b1 - b0 == 1:  # a plain backward, no vmap machinery to load
            grads = torch.autograd.grad(
                logits, outputs, cot[0], retain_graph=more, allow_unused=True
            )
            grads = tuple(None if g is None else g[None] for g in grads)
        else:
            grads = torch.autograd.grad(
                logits, outputs, cot, retain_graph=more, is_grads_batched=True,
                allow_unused=True,
            )
        yield (
            tuple(
                o.new_zeros(b1 - b0, *o.shape) if g is None else g
                for g, o in zip(grads, outputs, strict=True)
            ),
            weight,
        )


def draw_labels(
    p: torch.Tensor, mc_samples: int, gen: torch.Generator
) -> torch.Tensor:
    """``mc_samples`` labels per sample drawn from the model's p, shape (mc, n); drawn on
    the CPU in float64 so the seeded stream is device-independent."""
    idx = torch.multinomial(p.double().cpu(), mc_samples, replacement=True, generator=gen)
    return idx.T.to(p.device)
