"""Per-group diagonal Hessians of the loss w.r.t. the factors of a ``FactorizedLinear``.

FairLRF scores every entry θ of ``U`` and ``V`` by ``½ θ² (h0 − β h1)``, where ``h_c``
is the diagonal of the Hessian of the mean cross-entropy over group c's scoring set
(``paper/FairLRF-paper.txt`` §2.3, ``DESIGN.md`` §2). This module computes those
diagonals on a *head*: the part of the model from cached features to the logits.

Why the closed form is exact. The layer computes ``o = ((x U) * S) V + b``, linear in
``U`` with ``V`` fixed and linear in ``V`` with ``U`` fixed. When everything after the
layer is linear or piecewise linear (Linear, ReLU, max-pool, dropout in eval), the
logits are, almost everywhere, locally linear in ``o``, so the second derivative of the
logits w.r.t. the entries of ``U`` (or of ``V``) is zero and that block of the Hessian
of the loss equals the Gauss–Newton matrix ``Gᵀ Λ G`` (``G``: Jacobian of the logits
w.r.t. the entries, ``Λ = diag(p) − p pᵀ``, ``p`` = softmax). Its diagonal has
per-sample closed forms:

* ``diag H[V_jl] = mean_n (z_nj S_j)² · (J_nᵀ Λ_n J_n)_ll``, ``z_n = x_n U``,
* ``diag H[U_ij] = mean_n x_ni² · (A_nᵀ Λ_n A_n)_jj``, ``A_n = J_n Vᵀ diag(S)``,

with ``J_n`` the (C × Dout) Jacobian of the logits w.r.t. the layer output ``o_n``.

What follows the layer (is it piecewise linear? is it elementwise operations and one
Linear, for the fast closed form?) is read from the head's traced graph by
:mod:`fairdeploy.structure`, the analysis the feature cut, the export and ``slr_a`` share.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fairdeploy import curvature
from fairdeploy.curvature import ESTIMATORS
from fairdeploy.errors import FairDeployError
from fairdeploy.features import takes_packed_values
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.structure import ModelStructure, Step, analyze_structure

__all__ = [
    "ESTIMATORS",
    "HessianApproximationWarning",
    "entry_scores",
    "group_hessians",
    "hessian_diag",
    "scoring_indices",
]

class HessianApproximationWarning(UserWarning):
    """The head after the layer is not piecewise linear: ``exact`` gives the
    Gauss–Newton diagonal (positive semi-definite), not the true Hessian diagonal."""


# --------------------------------------------------------------------------- internals


class _Tap(nn.Module):
    """Stands in for the target layer inside a private copy of the head.

    It runs the real layer without a graph, records what the estimators need from the
    layer's input (``x²`` and ``(x U) * S``, computed now, so later in-place ops cannot
    change them), and hands the rest of the head a copy of a fresh leaf ``o``: the head
    after the tap is then the function ``o ↦ logits`` whose Jacobian the estimators
    need, and an in-place activation after the layer writes into the copy, not into
    ``o``.
    """

    def __init__(self, layer: FactorizedLinear) -> None:
        super().__init__()
        # Not registered as a child: the tap is the only module standing for the layer.
        object.__setattr__(self, "layer", layer)
        self.calls = 0
        self.input_shape: tuple[int, ...] | None = None
        self.x_sq: torch.Tensor | None = None
        self.zs: torch.Tensor | None = None
        self.o: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.input_shape is None:
            self.input_shape = tuple(x.shape)
        layer = self.layer
        with torch.no_grad():
            out = layer(x)
            if x.ndim == 2:
                self.x_sq = x * x
                self.zs = (x @ layer.U) * layer.S
            elif x.ndim > 2:
                # Token tensors (batch × tokens × features): the per-sample gradient
                # sums over the tokens, so the inputs are kept, not squared.
                tokens = x.reshape(x.shape[0], -1, x.shape[-1])
                self.x_sq = tokens.clone()
                self.zs = (tokens @ layer.U) * layer.S
        self.o = out.detach().requires_grad_(torch.is_grad_enabled())
        return self.o.clone()


@dataclass
class _Head:
    """A private eval-mode copy of the head with the layer replaced by a tap."""

    module: nn.Module
    tap: _Tap
    layer: FactorizedLinear
    num_classes: int
    # Fast path: None, or (elementwise steps, final Linear or None when J = diag(m)).
    # Never for token tensors (the chain's closed form is per row).
    chain: tuple[tuple[Step, ...], nn.Module | None] | None
    # Operations after the layer that are not piecewise linear; None: unknown (untraced).
    non_pl: list[str] | None
    untraced: str = ""

    def run(
        self, feats: torch.Tensor, *, graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward of a chunk: ``x²`` (n × Din), ``(x U) * S`` (n × k), the layer
        output ``o`` (n × Dout; a leaf that the logits' graph starts from when ``graph``)
        and the logits (n × C)."""
        tap = self.tap
        with torch.set_grad_enabled(graph):
            logits = self.module(feats)
        x_sq, zs, o = tap.x_sq, tap.zs, tap.o
        tap.x_sq = tap.zs = tap.o = None
        assert x_sq is not None and zs is not None and o is not None
        return x_sq, zs, o, logits


def _find_layer(head: nn.Module, layer: str) -> FactorizedLinear:
    if not isinstance(head, nn.Module):
        raise FairDeployError(f"head is a {type(head).__name__}; allowed: a torch.nn.Module")
    try:
        # The empty name is the head itself, which cannot be tapped from inside.
        mod = head.get_submodule(layer) if isinstance(layer, str) and layer else None
    except AttributeError:
        mod = None
    if not isinstance(mod, FactorizedLinear):
        names = [n for n, m in head.named_modules() if isinstance(m, FactorizedLinear)]
        found = "not found" if mod is None else f"a {type(mod).__name__}"
        raise FairDeployError(
            f"layer={layer!r} is {found} in the head; allowed: the qualified name of a "
            f"FactorizedLinear ({', '.join(map(repr, names)) or 'the head has none'})"
        )
    return mod


def _check_samples_first(
    module: nn.Module, tap: _Tap, probe: torch.Tensor, x_sq: torch.Tensor | None, layer: str,
    features: int,
) -> None:
    """Refuse a layer whose input does not have the samples on its first axis: checked on
    the probe and again on one sample fewer (a sequence-first (T, N, E) input whose T
    equals the probe's size would pass once)."""
    shape = tap.input_shape
    follows = x_sq is not None and x_sq.shape[0] == probe.shape[0]
    if follows and probe.shape[0] > 1:
        with torch.no_grad():
            module(probe[:-1])
        follows = tap.x_sq is not None and tap.x_sq.shape[0] == probe.shape[0] - 1
        tap.x_sq = tap.zs = tap.o = None
    if not follows:
        raise FairDeployError(
            f"layer={layer!r} receives input of shape {shape}; hessian_diag needs "
            f"(N, {features}) or (N, tokens, {features}) with the samples on the first axis"
        )


def _prepare_head(head: nn.Module, layer: str, probe: torch.Tensor) -> _Head:
    """Copy the head (eval mode, frozen), read its structure, put a tap on the layer."""
    _find_layer(head, layer)  # clear error before paying for the copy
    module = copy.deepcopy(head).eval()
    module.requires_grad_(False)
    real = module.get_submodule(layer)
    assert isinstance(real, FactorizedLinear)
    # What follows the layer, from the one structure analysis (fairdeploy.structure),
    # read on the copy before the tap stands in for the layer.
    structure: ModelStructure | None = None
    untraced = ""
    try:
        structure = analyze_structure(module, leaves=[layer], example_input=probe)
    except FairDeployError as exc:
        untraced = str(exc)
    tap = _Tap(real)
    parent_name, _, child = layer.rpartition(".")
    setattr(module.get_submodule(parent_name), child, tap)

    # One forward on a few samples: is the layer called once, on rows, giving logits?
    tap.calls = 0
    with torch.no_grad():
        logits = module(probe)
    if tap.calls != 1:
        what = "never called" if tap.calls == 0 else f"called {tap.calls} times"
        raise FairDeployError(
            f"layer={layer!r} is {what} in one forward of the head; hessian_diag needs a "
            "layer that the head calls exactly once"
        )
    x_sq = tap.x_sq
    tap.x_sq = tap.zs = tap.o = None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise FairDeployError(f"the head returns {shape}; allowed: logits of shape (N, classes)")
    _check_samples_first(module, tap, probe, x_sq, layer, real.in_features)

    chain = None
    non_pl = None
    tokens = x_sq.ndim == 3
    if structure is not None:
        non_pl = structure.not_piecewise_linear_after(layer)
        found = None if tokens else structure.chain_to_output(layer)
        if found is not None:
            steps, final = found
            chain = (steps, None if final is None else module.get_submodule(final))
    return _Head(
        module=module,
        tap=tap,
        layer=real,
        num_classes=int(logits.shape[1]),
        chain=chain,
        non_pl=non_pl,
        untraced=untraced,
    )


def _exact_generic(
    o: torch.Tensor, logits: torch.Tensor, vt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(Jᵀ Λ J)_ll`` (n × Dout) and ``(Aᵀ Λ A)_jj`` (n × k) by C VJPs.

    A VJP with cotangent ``r_c`` gives ``q_c = r_cᵀ J_n`` (:func:`curvature_vjps`);
    the diagonals are sums of squares of ``q_c`` and of ``q_c Vᵀ diag(S)``.
    ``logits`` must carry a graph back to the leaf ``o``.
    """
    d = torch.zeros_like(o)
    e = o.new_zeros(o.shape[0], vt.shape[1])
    for (q,), _ in curvature.curvature_vjps(logits, (o,)):  # q: (block, n, Dout)
        d += (q * q).sum(0)
        qa = q @ vt  # (block, n, k)
        e += (qa * qa).sum(0)
    return d, e


def _khatri_rao_blocks(weight: torch.Tensor, vt: torch.Tensor) -> list[torch.Tensor]:
    """``K[l, (c, j)] = W_cl Ṽ_lj`` as (b·k × Dout) blocks of classes, each bounded in size."""
    k, dout = vt.shape[1], vt.shape[0]
    block = max(1, curvature.TEMP_ELEMENTS // max(1, k * dout))
    return [
        (weight[c0 : c0 + block, None, :] * vt.T[None]).reshape(-1, dout)
        for c0 in range(0, weight.shape[0], block)
    ]


def _exact_chain(
    h: _Head,
    o: torch.Tensor,
    logits: torch.Tensor,
    vt: torch.Tensor,
    cache: dict[str, list[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two diagonals when the head after the layer is ``W φ(o) + b`` with an
    elementwise φ (or just ``φ(o)``): ``J_n = W diag(m_n)``, ``m_n =
    φ'(o_n)``, so ``(Jᵀ Λ J)_ll = m_l² (pᵀ(W∘W) − (pᵀW)²)_l`` costs two matrix products
    per chunk (no C-fold VJPs), and ``A_n = W diag(m_n) Vᵀ diag(S)`` for all n is one
    GEMM per chunk.
    """
    assert h.chain is not None
    steps, last = h.chain
    leaf = o.detach().requires_grad_(True)
    with torch.enable_grad():
        y = leaf.clone()  # in-place activations must not write into the leaf
        for step in steps:
            y = step(y)
        # Elementwise maps: the VJP of ones is the Jacobian's diagonal.
        (mask,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    if last is None:
        weight = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    else:
        weight = last.weight if isinstance(last, nn.Linear) else last.dense_weight()
        weight = weight.detach()
    logits = logits.detach()
    p = torch.softmax(logits, dim=-1)
    n, c = p.shape
    # The V part in float64: pᵀW² − (pᵀW)² is a variance; it cancels in float32 when p
    # is peaked, as it is on the training samples of a well-fit model.
    p64, w64 = p.double(), weight.double()
    var = (p64 @ (w64 * w64) - (p64 @ w64) ** 2).clamp_min(0).to(mask.dtype)
    d = mask * mask * var
    # The U part: A_n[c, j] = Σ_l m_nl W_cl Ṽ_lj = (m_n @ K)[c, j] with the Khatri–Rao
    # product K[l, (c, j)] = W_cl Ṽ_lj, so the whole chunk is plain GEMMs
    # (n × Dout) @ (Dout × b·k) over blocks of b classes. K is kept across chunks when
    # it is small enough (C·k·Dout ≤ 2 × 2²⁴ elements), else rebuilt per chunk, which
    # costs 1/n of the GEMM.
    k = vt.shape[1]
    blocks = cache.get("kr") or _khatri_rao_blocks(weight, vt)
    if c * k * vt.shape[0] <= 2 * curvature.TEMP_ELEMENTS:
        cache["kr"] = blocks
    a = o.new_empty(n, c, k)
    c0 = 0
    for kr in blocks:
        b = kr.shape[0] // k
        a[:, c0 : c0 + b] = (mask @ kr.T).view(n, b, k)
        c0 += b
    pp = p[:, :, None]
    abar = (a * pp).sum(1, keepdim=True)
    e = ((a - abar) ** 2 * pp).sum(1)  # centered: no cancellation when p is peaked
    return d, e


def _squared_grads(
    o: torch.Tensor,
    logits: torch.Tensor,
    vt: torch.Tensor,
    labels: torch.Tensor | None,
    mc_samples: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared gradients of CE w.r.t. o (n × Dout) and x U (n × k), averaged
    over label draws.

    With ``labels`` (``fisher``): ∂CE_n/∂o_n = J_nᵀ (p_n − e_{y_n}). Without
    (``ggn_mc``): ``mc_samples`` labels drawn from the model's own p_n, whose squared
    gradients average to the Gauss–Newton diagonal since E[(p − e_y)(p − e_y)ᵀ] = Λ.
    Samples are independent in eval mode, so one backward of the summed loss yields
    every per-sample gradient; draws are batched into one vmapped backward per block.
    """
    draws = None
    if labels is None:
        draws = curvature.draw_labels(torch.softmax(logits.detach(), dim=-1), mc_samples, gen)
    g2 = torch.zeros_like(o)
    gu2 = o.new_zeros(o.shape[0], vt.shape[1])
    for (g,), weight in curvature.curvature_vjps(logits, (o,), labels=labels, draws=draws):
        g2 += weight * (g * g).sum(0)
        gu = g @ vt  # ∂CE_n/∂(x_n U)
        gu2 += weight * (gu * gu).sum(0)
    return g2, gu2


def _token_parts(
    x: torch.Tensor, zs: torch.Tensor, o: torch.Tensor, logits: torch.Tensor,
    vt: torch.Tensor, estimator: str, labels: torch.Tensor, mc_samples: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_token_diags` for ``estimator`` (its label draws for ``ggn_mc``)."""
    if estimator == "exact":
        return _token_diags(x, zs, o, logits, vt)
    if estimator == "fisher":
        return _token_diags(x, zs, o, logits, vt, labels=labels)
    draws = curvature.draw_labels(torch.softmax(logits.detach(), dim=-1), mc_samples, gen)
    return _token_diags(x, zs, o, logits, vt, draws=draws)


def _token_diags(
    x: torch.Tensor,
    zs: torch.Tensor,
    o: torch.Tensor,
    logits: torch.Tensor,
    vt: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    draws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over a chunk of the squared per-sample VJPs w.r.t. U (Din × k) and V
    (k × Dout) for a layer on token tensors.

    ``x`` (n × T × Din) is the layer's input, ``zs = (x U) * S`` (n × T × k), ``o``
    (n × T × Dout, any middle axes) its output. A sample's gradient sums over its tokens:
    for a cotangent with VJP ``q`` (n × T × Dout) at ``o``, ``g[V_kl] = Σ_t zs_tk q_tl``
    and ``g[U_ij] = Σ_t x_ti (q Ṽ)_tj``. Squared and summed over the cotangents of
    :func:`fairdeploy.curvature.curvature_vjps` (exact: the C columns of ``Λ^½``;
    ``fisher``/``ggn_mc``: label draws) this is n times the chunk's curvature diagonal.
    The per-sample products are formed for a few samples at a time so that each
    temporary stays near ``curvature.TEMP_ELEMENTS`` elements.
    """
    n, t = x.shape[0], x.shape[1]
    din, k, dout = x.shape[2], vt.shape[1], vt.shape[0]
    acc_u = x.new_zeros(din, k)
    acc_v = x.new_zeros(k, dout)
    for q, weight in curvature.curvature_vjps(logits, (o,), labels=labels, draws=draws):
        q = q[0].reshape(-1, n, t, dout)  # (block, n, T, Dout)
        qa = q @ vt  # (block, n, T, k)
        step = max(1, curvature.TEMP_ELEMENTS // max(1, q.shape[0] * max(din, dout) * k))
        for s in range(0, n, step):
            sl = slice(s, s + step)
            g_v = torch.einsum("ntk,bntl->bnkl", zs[sl], q[:, sl])
            acc_v += weight * (g_v * g_v).sum((0, 1))
            g_u = torch.einsum("nti,bntj->bnij", x[sl], qa[:, sl])
            acc_u += weight * (g_u * g_u).sum((0, 1))
    return acc_u, acc_v


# --------------------------------------------------------------------------- public API


def hessian_diag(
    head: nn.Module,
    layer: str,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    estimator: str = "exact",
    batch_size: int = 256,
    fast: bool = True,
    mc_samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal of the Hessian of the mean cross-entropy w.r.t. a layer's U and V.

    The loss is ``(1/N) Σ_n CE(head(features_n), targets_n)`` over ALL given samples;
    they are processed in chunks of ``batch_size`` and the per-chunk sums are added
    before one division by N (a true mean, not the last chunk's value). ``S`` and every
    other parameter are constants. The head is copied and run in eval mode (dropout
    off); the caller's module, its mode and its parameters are left unchanged.

    Parameters
    ----------
    head : torch.nn.Module
        Maps ``features`` to logits (N × C). It may start before the layer.
    layer : str
        Qualified name of the :class:`~fairdeploy.lrf.FactorizedLinear` inside ``head``
        (e.g. ``"classifier.3"``); ``head`` must call it exactly once per forward, with
        an input of shape (N, Din) or, for token tensors, (N, T, Din) (any axes between
        the samples and the features count as tokens). On tokens a sample's gradient is
        the sum of its tokens' contributions, so its square has cross-token terms: the
        diagonals come from C per-sample VJPs through the head (no fast path).
    features : torch.Tensor
        The head's input, first dimension N ≥ 1. Floating features are cast to the
        layer's dtype and moved to its device chunk by chunk.
    targets : torch.Tensor
        Class indices, shape (N,). ``exact`` does not depend on them (the curvature of
        cross-entropy in the logits is ``Λ = diag(p) − p pᵀ`` whatever the label), but
        they are checked; ``fisher`` uses them.
    estimator : {"exact", "fisher", "ggn_mc"}
        ``exact`` (default): the Gauss–Newton diagonal in closed form, which equals the
        true Hessian diagonal when every operation after the layer is linear or
        piecewise linear (Linear, Conv, ReLU/LeakyReLU/PReLU/Hardtanh, max/avg pooling,
        dropout and batch norm in eval mode, reshapes, sums with other values);
        otherwise a :class:`HessianApproximationWarning` names the operations and the
        result is the Gauss–Newton diagonal (a positive semi-definite approximation).
        The check reads the head's ``torch.fx`` graph (:mod:`fairdeploy.structure`), so
        functional calls inside ``forward`` (``torch.sigmoid(...)``) count like modules;
        a head that cannot be traced gets the warning too, since nothing can be proved.
        ``fisher``: the empirical Fisher, the mean over samples of the squared
        per-sample gradient of CE; about one backward pass. Its magnitudes differ from
        the exact diagonal (it uses the observed label instead of the expectation over
        the model's p; on a trained VGG-11 FC-2 head the project measured a relative
        error of 0.87) but it ranks rows of U / columns of V almost identically
        (Spearman ≈ 0.99 there).
        ``ggn_mc``: Monte-Carlo Gauss–Newton, squared gradients with ``mc_samples``
        labels per sample drawn from the model's softmax (seeded by ``seed``); an
        unbiased estimate of ``exact`` with variance falling as 1/mc_samples.
    batch_size : int
        Samples per chunk. Beyond the chunk's own activations, temporaries are bounded
        to about 2²⁴ elements each (64 MiB in float32) by splitting over classes; the
        fast path also keeps ``C·k·Dout`` elements when that is at most 2²⁵.
    fast : bool
        For ``exact``: use the closed form ``J_n = W diag(φ'(o_n))`` when the head
        after the layer is a chain of elementwise operations (any in the table of
        :mod:`fairdeploy.structure`, with no fan-out) optionally ending in one Linear
        whose output is the logits, as the traced graph shows. It gives the same
        Gauss–Newton diagonal as the generic path. ``False`` forces the generic path: C
        vector–Jacobian products per chunk through whatever follows the layer.
    mc_samples : int
        Label draws per sample for ``ggn_mc``.
    seed : int
        Seed of the ``ggn_mc`` draws; the same inputs, seed and batch_size give the
        same result.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{"U": (Din, k), "V": (k, Dout)}``, float64 (accumulated in float64 whatever
        the model's dtype; per-chunk products run in the layer's dtype), on the
        layer's device.

    Raises
    ------
    FairDeployError
        Unknown layer or estimator, a layer that is not a FactorizedLinear or is not
        called exactly once, mismatched or empty features/targets, a target outside
        [0, C), a bad batch_size or mc_samples.
    """
    curvature.check_options(estimator, batch_size, mc_samples)
    feats_all, tgt_all = curvature.as_inputs(features, targets)
    if tgt_all.min() < 0:
        raise FairDeployError(
            f"targets contains {int(tgt_all.min())}; allowed: class indices in [0, C)"
        )
    ref = _find_layer(head, layer)
    dtype, device = ref.U.dtype, ref.U.device
    packed = takes_packed_values(head)  # values of several dtypes, restored by the head

    def chunk(t: torch.Tensor, s: int) -> torch.Tensor:
        t = t[s : s + batch_size]
        if t.dtype.is_floating_point and not packed:
            t = t.to(dtype)
        return t.to(device)

    h = _prepare_head(head, layer, chunk(feats_all, 0)[:4])
    if int(tgt_all.max()) >= h.num_classes:
        raise FairDeployError(
            f"targets contains {int(tgt_all.max())}; allowed: class indices in "
            f"[0, {h.num_classes}) for a head with {h.num_classes} outputs"
        )
    if estimator == "exact":
        _warn_if_not_exact(h, layer)

    S, V = h.layer.S.detach(), h.layer.V.detach()
    vt = V.T * S  # Ṽ (Dout × k): o = (x U) Ṽᵀ + b
    acc_u = torch.zeros(h.layer.U.shape, dtype=torch.float64, device=device)
    acc_v = torch.zeros(V.shape, dtype=torch.float64, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    n_total = feats_all.shape[0]
    use_chain = estimator == "exact" and fast and h.chain is not None
    cache: dict[str, list[torch.Tensor]] = {}
    for s0 in range(0, n_total, batch_size):
        feats = chunk(feats_all, s0)
        x_sq, zs, o, logits = h.run(feats, graph=not use_chain)
        if x_sq.ndim == 3:  # token tensors: x_sq holds the inputs themselves
            du, dv = _token_parts(x_sq, zs, o, logits, vt, estimator, chunk(tgt_all, s0),
                                  mc_samples, gen)
            acc_u += du.double()
            acc_v += dv.double()
            continue
        if use_chain:
            d, e = _exact_chain(h, o, logits, vt, cache)
        elif estimator == "exact":
            d, e = _exact_generic(o, logits, vt)
        else:
            labels = chunk(tgt_all, s0) if estimator == "fisher" else None
            d, e = _squared_grads(o, logits, vt, labels, mc_samples, gen)
        # Sums of non-negative terms: the layer's dtype is accurate enough per chunk,
        # the running sum over chunks is float64.
        acc_v += ((zs * zs).T @ d.to(zs.dtype)).double()
        acc_u += (x_sq.T @ e.to(x_sq.dtype)).double()
    return {"U": acc_u / n_total, "V": acc_v / n_total}


def _warn_if_not_exact(h: _Head, layer: str) -> None:
    """A :class:`HessianApproximationWarning` (at the caller of :func:`hessian_diag`) when
    what follows ``layer`` is not piecewise linear, or is unknown: ``exact`` then gives
    the Gauss-Newton diagonal."""
    if h.non_pl:
        warnings.warn(
            f"layer={layer!r}: modules after it are not piecewise linear "
            f"({', '.join(h.non_pl)}); estimator='exact' returns the Gauss-Newton "
            "diagonal, not the true Hessian diagonal",
            HessianApproximationWarning,
            stacklevel=3,
        )
    elif h.non_pl is None:
        warnings.warn(
            f"layer={layer!r}: what follows it is unknown ({h.untraced}); estimator='exact' "
            "returns the Gauss-Newton diagonal, which is the true Hessian diagonal only if "
            "everything after the layer is piecewise linear",
            HessianApproximationWarning,
            stacklevel=3,
        )


def group_hessians(
    head: nn.Module,
    layer: str,
    features: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor | np.ndarray | Sequence[int],
    *,
    group_ids: Sequence[int] = (0, 1),
    estimator: str = "exact",
    batch_size: int = 256,
    fast: bool = True,
    mc_samples: int = 1,
    seed: int = 0,
) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`hessian_diag` on each group's samples.

    Parameters
    ----------
    head, layer, features, targets, estimator, batch_size, fast, mc_samples, seed
        As in :func:`hessian_diag`.
    groups : array-like of int, shape (N,)
        Group id of every sample (−1 or any id not in ``group_ids`` is ignored).
    group_ids : sequence of int
        The groups to compute, by default 0 (unprivileged) and 1 (privileged).

    Returns
    -------
    dict[int, dict[str, torch.Tensor]]
        ``{group id: {"U": ..., "V": ...}}``, each the diagonal of the Hessian of the
        mean CE over that group's samples.

    Raises
    ------
    FairDeployError
        A group in ``group_ids`` with no samples, or ``groups`` of the wrong length.
    """
    feats, _ = curvature.as_inputs(features, targets)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for gid, idx in curvature.group_samples(groups, group_ids, feats.shape[0], "row of features"):
        out[gid] = hessian_diag(
            head,
            layer,
            torch.as_tensor(features)[idx],
            torch.as_tensor(targets)[idx],
            estimator=estimator,
            batch_size=batch_size,
            fast=fast,
            mc_samples=mc_samples,
            seed=seed,
        )
    return out


def scoring_indices(
    groups: torch.Tensor | np.ndarray | Sequence[int],
    *,
    per_group: int = 1024,
    seed: int = 0,
    group_ids: Sequence[int] = (0, 1),
) -> dict[int, np.ndarray]:
    """Balanced, seeded scoring sets: one index array per group.

    Every group gets the same number of samples, ``min(per_group, smallest group
    size)``, drawn without replacement with ``numpy.random.default_rng(seed)`` (groups
    drawn in the order of ``group_ids``). Samples of unknown group (−1) or of any id
    not in ``group_ids`` are left out.

    Parameters
    ----------
    groups : array-like of int, shape (N,)
        Group id of every training sample.
    per_group : int
        Cap on the scoring-set size per group (default 1024).
    seed : int
        Seed of the draw; the same groups and seed give the same indices.
    group_ids : sequence of int
        Groups to draw for, by default 0 (unprivileged) and 1 (privileged).

    Returns
    -------
    dict[int, numpy.ndarray]
        ``{group id: sorted int64 indices into groups}``.

    Raises
    ------
    FairDeployError
        An empty group, ``per_group < 1`` or ``groups`` not one-dimensional.
    """
    if isinstance(per_group, bool) or not isinstance(per_group, int | np.integer) or per_group < 1:
        raise FairDeployError(f"per_group={per_group!r} is invalid; allowed: an integer ≥ 1")
    g = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.ndim != 1:
        raise FairDeployError(f"groups has shape {g.shape}; allowed: one group id per sample (N,)")
    members = {int(gid): np.flatnonzero(g == gid) for gid in group_ids}
    for gid, idx in members.items():
        if idx.size == 0:
            present = sorted({int(v) for v in np.unique(g)})
            raise FairDeployError(
                f"group {gid} has no samples in the scoring split (groups present: {present}); "
                "scoring needs samples of every group"
            )
    size = min(int(per_group), *(idx.size for idx in members.values()))
    rng = np.random.default_rng(seed)
    return {
        gid: np.sort(rng.choice(idx, size=size, replace=False)).astype(np.int64)
        for gid, idx in members.items()
    }


def entry_scores(
    theta: torch.Tensor, h_unpriv: torch.Tensor, h_priv: torch.Tensor, beta: float
) -> torch.Tensor:
    """FairLRF entry scores ``½ θ² (h0 − β h1)``, elementwise.

    The Taylor estimate of ``ΔE₀ − β ΔE₁`` when the entry θ is set to zero (paper
    §2.3): low scores are entries whose removal costs the unprivileged group little
    relative to the privileged one.

    Parameters
    ----------
    theta : torch.Tensor
        The entries (e.g. a layer's U or V).
    h_unpriv, h_priv : torch.Tensor
        Hessian diagonals on the unprivileged (group 0) and privileged (group 1)
        scoring sets, the same shape as ``theta``.
    beta : float
        Trade-off β (finite).

    Returns
    -------
    torch.Tensor
        The scores, shape of ``theta``, in the promoted dtype of the inputs (float64
        for :func:`hessian_diag` results).
    """
    shapes = {tuple(t.shape) for t in (theta, h_unpriv, h_priv)}
    if len(shapes) != 1:
        raise FairDeployError(
            f"theta, h_unpriv, h_priv have shapes {tuple(theta.shape)}, "
            f"{tuple(h_unpriv.shape)}, {tuple(h_priv.shape)}; allowed: one shared shape"
        )
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
        raise FairDeployError(f"beta={beta!r} is invalid; allowed: a finite number")
    return 0.5 * theta * theta * (h_unpriv - beta * h_priv)
