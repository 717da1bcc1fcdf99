"""Per-group diagonal Hessians of the loss w.r.t. dense ``Linear`` and ``Conv2d`` weights.

FairPrune and FairQuantize score every weight θ of the chosen layers by
``½ θ² (h0 − β h1)`` (or ``½ Δθ² (h0 − β h1)``), where ``h_c`` is the diagonal of the
Hessian of the mean cross-entropy over group c's scoring set (``DESIGN.md`` §2). This
module computes those diagonals for dense layers anywhere in a model: in the trunk (the
model fed images) or in a head fed cached features.

The estimators share the curvature engine of :mod:`fairdeploy.curvature`
(``curvature_vjps``): per chunk of samples, one forward pass, then VJPs of the logits
at every chosen layer's output with cotangents whose outer products add up to the
curvature of cross-entropy in the logits. Writing ``q_nb`` for the VJP of cotangent b
at a layer's output for sample n, the per-sample gradient of the layer's weight is
linear in ``q_nb``, and

* ``Linear`` with one input row per sample (x_n of shape (Din,)): the per-sample
  gradient is the outer product ``q_nb x_nᵀ``, so the diagonal has the closed form
  ``diag H[W_ij] = mean_n (Σ_b q_nbi²) · x_nj²`` — with the exact estimator,
  ``Σ_b q_nbi² = (J_nᵀ Λ_n J_n)_ii`` (J_n: Jacobian of the logits w.r.t. the layer
  output, Λ_n = diag(p_n) − p_n p_nᵀ) — one GEMM per chunk; the bias gets
  ``mean_n (J_nᵀ Λ_n J_n)_ii``;
* ``Conv2d`` (and a ``Linear`` applied to more than one row per sample, e.g. tokens):
  the weight is shared across positions, so the per-sample gradient
  ``G_nb = Σ_l q_nb[:, l] ⊗ patch_n[:, l]`` is formed explicitly (unfolded input
  patches, a batched GEMM per chunk of samples) and squared. This is the exact
  Gauss–Newton diagonal, the quantity BackPACK's ``DiagGGNExact`` computes, at the cost
  of one backward pass per class (C passes per chunk).

Why exact is exact: a weight enters its layer linearly; when every module after the
layer is linear or piecewise linear in eval mode (Linear, Conv, ReLU-family, max/avg
pooling, dropout, batch norm, flatten), the logits are locally linear in the weight, the
second-derivative term of the Hessian vanishes and the Gauss–Newton diagonal equals the
true Hessian diagonal (tested against ``torch.autograd.functional.hessian``). Otherwise a
:class:`~fairdeploy.scoring.HessianApproximationWarning` names the modules.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy import curvature
from fairdeploy.curvature import ESTIMATORS
from fairdeploy.errors import FairDeployError
from fairdeploy.features import takes_packed_values
from fairdeploy.scoring import HessianApproximationWarning
from fairdeploy.structure import analyze_structure

__all__ = [
    "DENSE_LAYER_TYPES",
    "ESTIMATORS",
    "dense_layers",
    "group_pair",
    "group_weight_hessians",
    "resolve_layers",
    "weight_hessian_diag",
]

#: Module types whose ``weight`` (and ``bias``) this module can score.
DENSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

_PARAM_KINDS = ("weight", "bias")


# --------------------------------------------------------------------------- layers


def dense_layers(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` and ``nn.Conv2d`` of ``model``, in
    definition order (``model.named_modules()``)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, DENSE_LAYER_TYPES)]


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> tuple[str, ...]:
    """The module names a ``layers`` setting chooses.

    Parameters
    ----------
    model : nn.Module
        The model the names refer to.
    layers : "all" or sequence of str
        ``"all"``: every ``nn.Linear`` and ``nn.Conv2d`` (:func:`dense_layers`), in
        definition order. Otherwise qualified module names (``"classifier.0"``), each an
        ``nn.Linear`` or ``nn.Conv2d``, each at most once; the given order is kept (it
        is the tie-break order of a global selection).

    Returns
    -------
    tuple of str

    Raises
    ------
    FairDeployError
        An unknown name, a module of another type, a repeated name, an empty list, or a
        model with no dense layer.
    """
    allowed = dense_layers(model)
    if isinstance(layers, str):
        if layers != "all":
            raise FairDeployError(
                f"layers={layers!r} is not allowed; use 'all' or a list of module names "
                f"(the model's Linear/Conv2d layers: {_preview(allowed)})"
            )
        if not allowed:
            raise FairDeployError("layers='all': the model has no nn.Linear or nn.Conv2d layer")
        return tuple(allowed)
    names = list(layers)
    if not names:
        raise FairDeployError(
            f"layers is an empty list; use 'all' or module names ({_preview(allowed)})"
        )
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for name in names:
        mod = modules.get(name) if isinstance(name, str) and name else None
        if not isinstance(mod, DENSE_LAYER_TYPES):
            found = "not found" if mod is None else f"a {type(mod).__name__}"
            raise FairDeployError(
                f"layer {name!r} is {found} in the model; allowed: the qualified name of "
                f"an nn.Linear or nn.Conv2d ({_preview(allowed)})"
            )
        if name in seen:
            raise FairDeployError(f"layers lists {name!r} twice; name each layer once")
        seen.add(name)
    return tuple(names)


def _preview(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "the model has none"
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


@dataclass
class _Target:
    """A chosen layer and which of its parameters to accumulate."""

    name: str
    module: nn.Module
    kinds: dict[str, str] = field(default_factory=dict)  # "weight"/"bias" -> param name


def _resolve_params(model: nn.Module, names: list[str]) -> list[_Target]:
    if not names:
        raise FairDeployError(
            "param_names is empty; give qualified parameter names such as "
            "'classifier.0.weight'"
        )
    modules = dict(model.named_modules())
    targets: dict[str, _Target] = {}
    for pname in names:
        owner, _, kind = pname.rpartition(".") if isinstance(pname, str) else ("", "", "")
        mod = modules.get(owner) if owner else None
        ok = (
            isinstance(mod, DENSE_LAYER_TYPES)
            and kind in _PARAM_KINDS
            and isinstance(getattr(mod, kind, None), nn.Parameter)
        )
        if not ok:
            example = [f"{n}.weight" for n in dense_layers(model)]
            raise FairDeployError(
                f"parameter {pname!r} is not the weight or bias of an nn.Linear or "
                f"nn.Conv2d of the model; allowed: {_preview(example)} (or their .bias)"
            )
        t = targets.setdefault(owner, _Target(owner, mod))
        if kind in t.kinds:
            raise FairDeployError(f"param_names lists {pname!r} twice; name each once")
        t.kinds[kind] = pname
    return list(targets.values())


# --------------------------------------------------------------------------- internals


class _Recorder:
    """Forward hooks on the chosen layers of a private copy of the model.

    Each hook keeps what the estimators need from the layer's input (``x²`` for a
    Linear with one row per sample, a copy of the input otherwise: computed or copied
    now, so a later in-place op cannot change it) and the layer's output, and hands the
    rest of the model a copy of the output, so an in-place activation after the layer
    writes into the copy and the VJP at the recorded output is the one of the layer.
    """

    def __init__(self, targets: list[_Target]) -> None:
        self.calls = {t.name: 0 for t in targets}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.rowwise: dict[str, bool] = {}
        self.handles = [
            t.module.register_forward_hook(self._hook(t.name), with_kwargs=True)
            for t in targets
        ]

    def _hook(self, name: str):  # a hook factory: the name rides in the closure
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
            self.calls[name] += 1
            x = (args[0] if args else kwargs["input"]).detach()
            rowwise = isinstance(mod, nn.Linear) and x.ndim == 2
            self.rowwise[name] = rowwise
            self.inputs[name] = x * x if rowwise else x.clone()
            self.outputs[name] = out
            return out.clone()

        return hook

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        inputs, outputs = self.inputs, self.outputs
        self.inputs, self.outputs = {}, {}
        return inputs, outputs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _not_piecewise_linear_after(
    net: nn.Module, names: Sequence[str], probe: torch.Tensor
) -> dict[str, list[str] | None]:
    """Per layer, the operations after it that are not piecewise linear (``[]``: the
    logits are piecewise linear in the layer's output, so ``exact`` is the true Hessian
    diagonal), or None when that cannot be worked out (the model cannot be traced)."""
    try:
        structure = analyze_structure(net, leaves=list(names), example_input=probe)
    except FairDeployError:
        return {n: None for n in names}
    return {n: structure.not_piecewise_linear_after(n) for n in names}


def _warn_not_exact(non_pl: dict[str, list[str] | None]) -> None:
    for name, ops in non_pl.items():
        if ops is None:
            warnings.warn(
                f"layer {name!r}: what follows it is unknown (the model cannot be traced); "
                "estimator='exact' returns the Gauss-Newton diagonal, the true Hessian "
                "diagonal only if everything after the layer is piecewise linear",
                HessianApproximationWarning,
                stacklevel=3,
            )
        elif ops:
            warnings.warn(
                f"layer {name!r}: operations after it are not piecewise linear "
                f"({', '.join(ops)}); estimator='exact' returns the Gauss-Newton diagonal, "
                "not the true Hessian diagonal",
                HessianApproximationWarning,
                stacklevel=3,
            )


def _probe(net: nn.Module, targets: list[_Target], rec: _Recorder, x: torch.Tensor) -> int:
    """One no-grad forward on a few samples: every chosen layer runs exactly once and
    the model returns (N, C) logits. Returns C."""
    for t in targets:
        rec.calls[t.name] = 0
    with torch.no_grad():
        logits = net(x)
    rec.take()
    for t in targets:
        if rec.calls[t.name] != 1:
            what = "never called" if rec.calls[t.name] == 0 else f"called {rec.calls[t.name]} times"
            raise FairDeployError(
                f"layer {t.name!r} is {what} in one forward of the model; weight Hessians "
                "need a layer the model calls exactly once (no weight sharing)"
            )
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise FairDeployError(f"the model returns {shape}; allowed: logits of shape (N, classes)")
    return int(logits.shape[1])


def _check_rows(
    targets: list[_Target], ins: dict[str, torch.Tensor], outs: dict[str, torch.Tensor], n: int
) -> None:
    """Per-sample gradients need the layer's input and output batched along dim 0."""
    for t in targets:
        x, o = ins[t.name], outs[t.name]
        if not o.requires_grad:
            raise FairDeployError(
                f"layer {t.name!r} runs without autograd (torch.no_grad or inference_mode "
                "in the model's forward, or a caller's inference_mode); weight Hessians need "
                "its output to carry a graph to the logits"
            )
        if x.ndim < 2 or x.shape[0] != n or o.shape[0] != n:
            raise FairDeployError(
                f"layer {t.name!r} receives input of shape {tuple(x.shape)} and returns "
                f"{tuple(o.shape)} for a chunk of {n} samples; weight Hessians need the "
                "samples along the first dimension of both (batch-first)"
            )


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as (n, groups, L, K) patches so that the output at position l of
    group g is ``patches[n, g, l] @ W_gᵀ`` with ``W_g`` the (Dout/groups × K) weight."""
    if isinstance(module, nn.Conv2d):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        xp = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(xp, module.kernel_size, dilation=module.dilation, stride=module.stride)
        g = module.groups
        n, gk, length = cols.shape
        return cols.view(n, g, gk // g, length).transpose(2, 3)
    # Linear on (n, ..., Din): every row of a sample shares the weight.
    return x.reshape(x.shape[0], 1, -1, x.shape[-1])


def _out_rows(module: nn.Module, q: torch.Tensor, groups: int) -> torch.Tensor:
    """VJPs at the layer output, (b, n, …), as (b, n, groups, L, Dout/groups)."""
    b, n = q.shape[:2]
    if isinstance(module, nn.Conv2d):
        dout = q.shape[2]
        return q.reshape(b, n, groups, dout // groups, -1).transpose(3, 4)
    return q.reshape(b, n, 1, -1, q.shape[-1])


def _accumulate_shared(
    module: nn.Module,
    q: torch.Tensor,
    x: torch.Tensor,
    weight: float,
    acc_w: torch.Tensor | None,
    acc_b: torch.Tensor | None,
) -> None:
    """Add ``weight · Σ_b Σ_n G_nb²`` (per-sample weight gradients, formed explicitly)
    and the same for the bias, for a layer whose weight is shared across positions.

    ``q``: VJPs at the layer output (b, n, …); ``x``: the layer input (n, …). Patches
    are unfolded for a few samples at a time, so neither they nor the per-sample
    gradients exceed about ``curvature.TEMP_ELEMENTS`` elements.
    """
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    rows = _out_rows(module, q, groups)  # (b, n, g, L, Do)
    b, n, g, length, do = rows.shape
    if acc_b is not None:
        gb = rows.sum(3).reshape(b, n, g * do)
        acc_b.add_(weight * (gb * gb).sum((0, 1)))
    if acc_w is None:
        return
    k = acc_w[0].numel() if isinstance(module, nn.Conv2d) else acc_w.shape[1]
    m = max(1, curvature.TEMP_ELEMENTS // max(1, g * k * max(do, length)))
    sq = torch.zeros(g, do, k, dtype=q.dtype, device=q.device)
    for n0 in range(0, n, m):
        p = _patches(module, x[n0 : n0 + m])  # (m, g, L, K)
        for bi in range(b):
            grad = torch.matmul(rows[bi, n0 : n0 + m].transpose(-1, -2), p)  # (m, g, Do, K)
            sq += (grad * grad).sum(0)
    acc_w.add_(weight * sq.reshape(acc_w.shape))


# --------------------------------------------------------------------------- public API


def weight_hessian_diag(
    model: nn.Module,
    param_names: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    estimator: str = "exact",
    batch_size: int = 64,
    mc_samples: int = 1,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal of the Hessian of the mean cross-entropy w.r.t. dense weights and biases.

    The loss is ``(1/N) Σ_n CE(model(inputs_n), targets_n)`` over ALL given samples,
    processed in chunks of ``batch_size``; per-chunk sums are added in float64 before
    one division by N. Every other parameter is a constant. The model is copied and run
    in eval mode (dropout off, batch norm with its running statistics); the caller's
    module, its mode and its parameters are unchanged. All chosen parameters are
    computed from the same forward and backward passes.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``inputs`` to logits (N × C): a whole model fed images, or a head fed
        cached features.
    param_names : sequence of str
        Qualified names of ``weight`` and/or ``bias`` parameters of ``nn.Linear`` and
        ``nn.Conv2d`` modules (``"features.0.weight"``, ``"classifier.0.bias"``). Each
        such module must run exactly once per forward.
    inputs : torch.Tensor
        The model's input, first dimension N ≥ 1. Floating inputs are cast to the
        model's dtype and moved to its device chunk by chunk.
    targets : torch.Tensor
        Class indices, shape (N,). ``exact`` and ``ggn_mc`` do not depend on them (the
        curvature of CE in the logits is Λ = diag(p) − p pᵀ whatever the label) but they
        are checked; ``fisher`` uses them.
    estimator : {"exact", "fisher", "ggn_mc"}
        ``exact`` (default): the Gauss–Newton diagonal, which is the true Hessian
        diagonal when everything after each layer is piecewise linear (else a
        ``HessianApproximationWarning``). Linear layers with one input row per sample
        use the closed form ``mean_n x_n² ⊗ diag(J_nᵀ Λ_n J_n)``; Conv2d layers form
        per-sample gradients for each of the C cotangents of Λ_n (cost: C backward
        passes per chunk, the cost of BackPACK's ``DiagGGNExact``).
        ``fisher``: empirical Fisher, the mean squared per-sample gradient of CE with
        the observed labels: one backward per chunk; magnitudes differ from ``exact``.
        ``ggn_mc``: Monte-Carlo Gauss–Newton with ``mc_samples`` labels per sample drawn
        from the model's softmax (seeded): unbiased for ``exact``, ``mc_samples``
        backward passes per chunk, variance falling as 1/``mc_samples``.
    batch_size : int
        Samples per chunk (default 64: about 1 GB of activations for VGG-11 on
        112×112 images). Temporaries beyond the chunk's activations are bounded to
        about 2²⁴ elements (per-sample gradients of a shared weight, VJP blocks).
    mc_samples : int
        Label draws per sample for ``ggn_mc``.
    seed : int
        Seed of the ``ggn_mc`` draws: same inputs, seed and batch_size, same result.
    on_chunk : callable, optional
        Called with the number of samples of each chunk when it is done (progress).

    Returns
    -------
    dict[str, torch.Tensor]
        ``{param name: diagonal}``, each the shape of its parameter, float64, on the
        model's device, in the order of ``param_names``.

    Raises
    ------
    FairDeployError
        A name that is not the weight/bias of a Linear or Conv2d, a layer that does not
        run exactly once or runs without autograd, inputs/outputs not batch-first, a
        model that does not return (N, C) logits, mismatched or empty inputs/targets, a
        target outside [0, C), bad options.
    """
    curvature.check_options(estimator, batch_size, mc_samples)
    names = [param_names] if isinstance(param_names, str) else list(param_names)
    x_all, y_all = curvature.as_inputs(inputs, targets)
    if y_all.min() < 0:
        raise FairDeployError(
            f"targets contains {int(y_all.min())}; allowed: class indices in [0, C)"
        )
    if not isinstance(model, nn.Module):
        raise FairDeployError(f"model is a {type(model).__name__}; allowed: a torch.nn.Module")
    resolved = _resolve_params(model, names)
    device = next(iter(model.parameters())).device
    dtype: torch.dtype | None = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32
    )
    if takes_packed_values(model):  # values of several dtypes, restored by the head
        dtype = None
    net, targets_ = _graph_copy(model, resolved)
    chunk = functools.partial(_chunk, batch_size=batch_size, dtype=dtype, device=device)

    probe = chunk(x_all, 0)[:2]
    non_pl = _not_piecewise_linear_after(net, [t.name for t in targets_], probe)
    rec = _Recorder(targets_)
    try:
        num_classes = _probe(net, targets_, rec, probe)
        if estimator == "exact":
            _warn_not_exact(non_pl)
        if int(y_all.max()) >= num_classes:
            raise FairDeployError(
                f"targets contains {int(y_all.max())}; allowed: class indices in "
                f"[0, {num_classes}) for a model with {num_classes} outputs"
            )
        acc = {
            pname: torch.zeros(getattr(t.module, kind).shape, dtype=torch.float64, device=device)
            for t in targets_
            for kind, pname in t.kinds.items()
        }
        gen = torch.Generator().manual_seed(int(seed))
        n_total = x_all.shape[0]
        for s0 in range(0, n_total, batch_size):
            _accumulate_chunk(
                net, rec, targets_, acc, chunk(x_all, s0),
                chunk(y_all, s0) if estimator == "fisher" else None,
                estimator=estimator, mc_samples=mc_samples, gen=gen,
            )
            if on_chunk is not None:
                on_chunk(min(batch_size, n_total - s0))
    finally:
        rec.remove()
    return {n: acc[n] / n_total for n in names}


def _graph_copy(model: nn.Module, resolved: list[_Target]) -> tuple[nn.Module, list[_Target]]:
    """An eval-mode copy of ``model`` whose only parameters that need gradients are the
    chosen layers' weights, and the chosen layers as modules of that copy."""
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    targets_ = [
        _Target(t.name, net.get_submodule(t.name), dict(t.kinds)) for t in resolved
    ]
    for t in targets_:
        # The outputs of the chosen layers must carry a graph to the logits; gradients
        # are requested at those outputs only, so no weight gradient is ever computed.
        t.module.weight.requires_grad_(True)
    return net, targets_


def _chunk(t: torch.Tensor, s: int, *, batch_size: int, dtype: torch.dtype | None,
           device: torch.device) -> torch.Tensor:
    """Samples ``s .. s + batch_size`` of ``t`` on ``device``, floating ones in ``dtype``
    (None: as they are)."""
    t = t[s : s + batch_size]
    if t.dtype.is_floating_point and dtype is not None:
        t = t.to(dtype)
    return t.to(device)


def _accumulate_chunk(
    net: nn.Module, rec: _Recorder, targets_: list[_Target], acc: dict[str, torch.Tensor],
    x: torch.Tensor, labels: torch.Tensor | None, *, estimator: str, mc_samples: int,
    gen: torch.Generator,
) -> None:
    """Add one chunk's sum of per-sample squared gradients (under ``estimator``'s
    curvature) to ``acc``, the running float64 sums by parameter name."""
    with torch.enable_grad():
        logits = net(x)
    ins, outs = rec.take()
    draws = None
    if estimator == "ggn_mc":
        draws = curvature.draw_labels(torch.softmax(logits.detach(), -1), mc_samples, gen)
    outputs = [outs[t.name] for t in targets_]
    # Row-wise Linear layers: Σ_b q² per sample, then one GEMM with x² per chunk.
    d = {t.name: torch.zeros_like(outs[t.name]) for t in targets_ if rec.rowwise[t.name]}
    _check_rows(targets_, ins, outs, logits.shape[0])
    for qs, w in curvature.curvature_vjps(logits, outputs, labels=labels, draws=draws):
        for t, q in zip(targets_, qs, strict=True):
            if rec.rowwise[t.name]:
                d[t.name].add_((q * q).sum(0), alpha=w)
            else:
                _accumulate_shared(
                    t.module, q, ins[t.name], w,
                    acc.get(t.kinds.get("weight", "")),
                    acc.get(t.kinds.get("bias", "")),
                )
    for t in targets_:
        if not rec.rowwise[t.name]:
            continue
        if "weight" in t.kinds:
            # Sums of non-negative terms: the layer's dtype is accurate enough
            # per chunk; the running sum over chunks is float64.
            acc[t.kinds["weight"]].add_(d[t.name].T @ ins[t.name].to(d[t.name].dtype))
        if "bias" in t.kinds:
            acc[t.kinds["bias"]].add_(d[t.name].sum(0))


def group_pair(
    hessians: Mapping[int, Mapping[str, torch.Tensor]], pname: str, param: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h0, h1)`` for one parameter from :func:`group_weight_hessians`' result, checked.

    Parameters
    ----------
    hessians : mapping
        ``{0: {param name: diagonal}, 1: {...}}``.
    pname : str
        The parameter's qualified name (``"classifier.0.weight"``).
    param : torch.Tensor
        The parameter, for its shape.

    Returns
    -------
    tuple of torch.Tensor
        The unprivileged (group 0) and privileged (group 1) diagonals, float64.

    Raises
    ------
    FairDeployError
        A missing group or entry, a shape that is not the parameter's, NaN or inf.
    """
    out = []
    for gid in (0, 1):
        if gid not in hessians:
            raise FairDeployError(
                f"hessians has no group {gid} (groups given: {sorted(hessians)}); give "
                "{0: ..., 1: ...} as group_weight_hessians returns"
            )
        h = hessians[gid].get(pname)
        if h is None:
            raise FairDeployError(
                f"hessians[{gid}] has no entry {pname!r}; compute the Hessians of every "
                "chosen layer's weight (group_weight_hessians(model, [f'{layer}.weight', "
                "...], ...))"
            )
        if tuple(h.shape) != tuple(param.shape):
            raise FairDeployError(
                f"hessians[{gid}][{pname!r}] has shape {tuple(h.shape)}; the parameter has "
                f"{tuple(param.shape)}"
            )
        if not torch.isfinite(h).all():
            raise FairDeployError(f"hessians[{gid}][{pname!r}] contains NaN or inf")
        out.append(h.double())
    return out[0], out[1]


def group_weight_hessians(
    model: nn.Module,
    param_names: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor | np.ndarray | Sequence[int],
    *,
    group_ids: Sequence[int] = (0, 1),
    estimator: str = "exact",
    batch_size: int = 64,
    mc_samples: int = 1,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`weight_hessian_diag` on each group's samples.

    Parameters
    ----------
    model, param_names, inputs, targets, estimator, batch_size, mc_samples, seed, on_chunk
        As in :func:`weight_hessian_diag`.
    groups : array-like of int, shape (N,)
        Group id of every sample (−1, or any id not in ``group_ids``, is ignored).
    group_ids : sequence of int
        The groups to compute: by default 0 (unprivileged) and 1 (privileged).

    Returns
    -------
    dict[int, dict[str, torch.Tensor]]
        ``{group id: {param name: diagonal}}``, each the diagonal of the Hessian of the
        mean CE over that group's samples.

    Raises
    ------
    FairDeployError
        A group in ``group_ids`` with no samples, ``groups`` of the wrong length, or any
        error of :func:`weight_hessian_diag`.
    """
    x, y = curvature.as_inputs(inputs, targets)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for gid, idx in curvature.group_samples(groups, group_ids, x.shape[0], "sample of inputs"):
        out[gid] = weight_hessian_diag(
            model, param_names, x[idx], y[idx],
            estimator=estimator, batch_size=batch_size, mc_samples=mc_samples, seed=seed,
            on_chunk=on_chunk,
        )
    return out

