"""Which rows of U and columns of V a sparse SVD trims: a registry of strategies.

A strategy scores every input node (row of U) and output node (column of V) of a
factorized layer; :func:`select_rows_cols` then picks the ``⌊sr·Din⌋`` lowest-scoring
rows and ``⌊sr·Dout⌋`` lowest-scoring columns (ties go to the lower index). Built in:

- ``slr_w``: absolute weight of the ORIGINAL dense layer (SLR, Yang et al.).
- ``slr_a``: absolute activations summed over training samples (SLR).
- ``fairlrf``: the Taylor estimate ``ΔE₀ − β ΔE₁`` of removing exactly the entries the
  sparsification zeroes, from per-group Hessian diagonals (FairLRF).

Add one with ``@register_strategy("name")`` on a function
``f(factorized, *, rr, inputs) -> (row_scores (Din,), col_scores (Dout,))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fairdeploy._registry import register_in
from fairdeploy.errors import FairDeployError
from fairdeploy.fraction import kept_entries, num_selected
from fairdeploy.lrf._apply import _linear_or_error
from fairdeploy.lrf._factorized import FactorizedLinear

__all__ = [
    "ROW_SCORES",
    "SelectionInputs",
    "activation_abs_sums",
    "following_activation",
    "list_strategies",
    "register_strategy",
    "select_rows_cols",
    "strategy_scores",
]

#: How ``fairlrf`` sums entry scores into a row/column score.
ROW_SCORES = ("removed", "full")

ScoreFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_STRATEGIES: dict[str, ScoreFn] = {}


@dataclass(frozen=True)
class SelectionInputs:
    """What the selection strategies read; each strategy needs only some fields.

    Attributes
    ----------
    weight : torch.Tensor, optional
        ``slr_w``: the ORIGINAL dense weight (Dout, Din) of the layer before factorizing.
    input_abs_sum : torch.Tensor, optional
        ``slr_a``: (Din,) sum over training samples of |layer input|.
    output_abs_sum : torch.Tensor, optional
        ``slr_a``: (Dout,) sum over training samples of |layer output after the
        activation that follows the layer| (see :func:`activation_abs_sums`).
    hessians : dict, optional
        ``fairlrf``: ``{0: {"U": (Din, k), "V": (k, Dout)}, 1: {...}}``, the diagonal of
        the Hessian of the mean cross-entropy w.r.t. U and V on group 0 (unprivileged)
        and group 1 (privileged).
    beta : float
        ``fairlrf``: the trade-off β in ``½θ²(h0 − β h1)``.
    row_score : {"removed", "full"}
        ``fairlrf``: sum the entry scores over the entries the sparsification zeroes
        (``"removed"``: columns ⌊rr·k⌋..k−1 of a U row, the whole row when rr = 0; the
        Taylor estimate of exactly that removal) or over the whole row/column
        (``"full"``).
    """

    weight: torch.Tensor | None = None
    input_abs_sum: torch.Tensor | None = None
    output_abs_sum: torch.Tensor | None = None
    hessians: dict[int, dict[str, torch.Tensor]] | None = None
    beta: float = 1.0
    row_score: str = "removed"


def register_strategy(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function ``f(factorized, *, rr, inputs) -> (rows, cols)``.

    The function returns float scores for the Din rows of U and the Dout columns of V;
    the lowest-scoring ones are sparsified.
    """
    return register_in(_STRATEGIES, name, "selection strategy")


def list_strategies() -> list[str]:
    """Names of the registered selection strategies."""
    return sorted(_STRATEGIES)


def _need(value: Any, strategy: str, field: str, what: str) -> Any:
    if value is None:
        raise FairDeployError(
            f"selection strategy {strategy!r} needs SelectionInputs.{field} ({what}), "
            "which is missing"
        )
    return value


def _check_shape(
    t: torch.Tensor, shape: tuple[int, ...], strategy: str, field: str
) -> torch.Tensor:
    t = torch.as_tensor(t)
    if tuple(t.shape) != shape:
        raise FairDeployError(
            f"selection strategy {strategy!r}: SelectionInputs.{field} has shape "
            f"{tuple(t.shape)}, expected {shape} for this layer"
        )
    return t.detach().to(device="cpu", dtype=torch.float64)


def strategy_scores(
    strategy: str, factorized: FactorizedLinear, *, rr: float, inputs: SelectionInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the rows of U and columns of V under a strategy (lower = trimmed first).

    Returns
    -------
    row_scores, col_scores : torch.Tensor
        float64 CPU tensors of shape (Din,) and (Dout,).
    """
    if strategy not in _STRATEGIES:
        raise FairDeployError(
            f"selection strategy {strategy!r} is unknown: use one of "
            f"{', '.join(list_strategies())}"
        )
    if not isinstance(factorized, FactorizedLinear):
        raise FairDeployError(
            f"selection needs a FactorizedLinear (from factorize), got {type(factorized).__name__}"
        )
    kept_entries(rr, 1)  # validates rr ∈ [0, 1] before any strategy reads it
    rows, cols = _STRATEGIES[strategy](factorized, rr=rr, inputs=inputs)
    rows = torch.as_tensor(rows).detach().to(device="cpu", dtype=torch.float64)
    cols = torch.as_tensor(cols).detach().to(device="cpu", dtype=torch.float64)
    if rows.shape != (factorized.in_features,) or cols.shape != (factorized.out_features,):
        raise ValueError(
            f"strategy {strategy!r} returned scores of shapes {tuple(rows.shape)}, "
            f"{tuple(cols.shape)}; expected ({factorized.in_features},), "
            f"({factorized.out_features},)"
        )
    for what, s in (("row", rows), ("column", cols)):
        if not torch.isfinite(s).all():
            raise FairDeployError(
                f"selection strategy {strategy!r} produced non-finite {what} scores: check "
                "the inputs it reads (Hessians, activation sums, weights) for NaN/inf"
            )
    return rows, cols


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    # Stable sort: among equal scores the lower index comes first, so ties are
    # broken deterministically.
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[:n]).values


def select_rows_cols(
    strategy: str,
    factorized: FactorizedLinear,
    *,
    sr: float,
    rr: float,
    inputs: SelectionInputs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of U and columns of V to sparsify: the lowest-scoring ``⌊sr·D⌋`` of each.

    Parameters
    ----------
    strategy : str
        A name from :func:`list_strategies` (``slr_w``, ``slr_a``, ``fairlrf``).
    factorized : FactorizedLinear
        The layer from :func:`factorize` (before sparsification).
    sr, rr : float
        Sparsity rate and kept fraction, as for :func:`sparsify`.
    inputs : SelectionInputs
        What the strategy reads.

    Returns
    -------
    rows, cols : torch.LongTensor
        Sorted indices, ``⌊sr·Din⌋`` rows and ``⌊sr·Dout⌋`` columns.
    """
    row_scores, col_scores = strategy_scores(strategy, factorized, rr=rr, inputs=inputs)
    n_rows = num_selected(sr, factorized.in_features)
    n_cols = num_selected(sr, factorized.out_features)
    return _lowest(row_scores, n_rows), _lowest(col_scores, n_cols)


@register_strategy("slr_w")
def _slr_w(
    factorized: FactorizedLinear, *, rr: float, inputs: SelectionInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    # Input node i is row i of Wᵀ = column i of weight (Dout, Din).
    w = _need(inputs.weight, "slr_w", "weight", "the original dense (Dout, Din) weight")
    w = _check_shape(w, (factorized.out_features, factorized.in_features), "slr_w", "weight")
    a = w.abs()
    return a.sum(dim=0), a.sum(dim=1)


@register_strategy("slr_a")
def _slr_a(
    factorized: FactorizedLinear, *, rr: float, inputs: SelectionInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    din, dout = factorized.in_features, factorized.out_features
    x = _need(inputs.input_abs_sum, "slr_a", "input_abs_sum", f"({din},) Σ|layer input|")
    y = _need(
        inputs.output_abs_sum, "slr_a", "output_abs_sum", f"({dout},) Σ|activated layer output|"
    )
    return (
        _check_shape(x, (din,), "slr_a", "input_abs_sum"),
        _check_shape(y, (dout,), "slr_a", "output_abs_sum"),
    )


@register_strategy("fairlrf")
def _fairlrf(
    factorized: FactorizedLinear, *, rr: float, inputs: SelectionInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    hess = _need(
        inputs.hessians,
        "fairlrf",
        "hessians",
        "{0: {'U', 'V'}, 1: {'U', 'V'}} Hessian diagonals of groups 0 and 1",
    )
    if inputs.row_score not in ROW_SCORES:
        raise FairDeployError(
            f"row_score={inputs.row_score!r} is unknown: use one of {', '.join(ROW_SCORES)}"
        )
    din, dout, k = factorized.in_features, factorized.out_features, factorized.rank
    shapes = {"U": (din, k), "V": (k, dout)}
    h: dict[tuple[int, str], torch.Tensor] = {}
    for group in (0, 1):
        if group not in hess or not all(name in hess[group] for name in shapes):
            raise FairDeployError(
                "selection strategy 'fairlrf' needs SelectionInputs.hessians[0] and [1], "
                f"each with 'U' and 'V'; got groups {sorted(hess)}"
            )
        for name, shape in shapes.items():
            h[group, name] = _check_shape(
                hess[group][name], shape, "fairlrf", f"hessians[{group}][{name!r}]"
            )
    beta = float(inputs.beta)
    U = factorized.U.detach().to(device="cpu", dtype=torch.float64)
    V = factorized.V.detach().to(device="cpu", dtype=torch.float64)
    # Entry score: second-order Taylor estimate of the loss change on group 0 minus β
    # times that on group 1 when the entry θ is set to zero (gradient term ≈ 0 at a
    # trained minimum): ½θ²h0 − β·½θ²h1.
    su = 0.5 * U**2 * (h[0, "U"] - beta * h[1, "U"])
    sv = 0.5 * V**2 * (h[0, "V"] - beta * h[1, "V"])
    start = kept_entries(rr, k) if inputs.row_score == "removed" else 0
    return su[:, start:].sum(dim=1), sv[start:, :].sum(dim=0)


def activation_abs_sums(
    model: nn.Module,
    layer: str,
    batches: Iterable[torch.Tensor | tuple | list],
    *,
    activation: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``slr_a``'s inputs: Σ over samples of |input| and |activated output| of a layer.

    Runs ``model`` in eval mode (restored afterwards) under ``torch.no_grad`` over
    ``batches`` and sums, per feature, the absolute value of the layer's input and of
    the output of the activation that follows it. An activation module called after
    several layers (one ``self.act`` reused) counts only its call on this layer's output.

    Parameters
    ----------
    model : nn.Module
        The vanilla model (not modified).
    layer : str
        Qualified name of the ``nn.Linear`` (e.g. ``classifier.3``).
    batches : iterable
        Model inputs, or tuples/lists whose first element is the model input (as a
        DataLoader yields ``(x, y, ...)``).
    activation : str or None
        Qualified name of the module whose output is "the activated output". ``"auto"``
        (default): the activation module that follows ``layer`` in the traced graph,
        past no-ops such as Dropout (:func:`following_activation`); if there is none,
        the layer's own output is used. ``None``: always the layer's own output.

    Returns
    -------
    input_abs_sum, output_abs_sum : torch.Tensor
        float64 CPU tensors of shape (Din,) and (Dout,).
    """
    target = _linear_or_error(model, layer)
    modules = dict(model.named_modules())
    act_name = following_activation(model, layer) if activation == "auto" else activation
    if act_name is not None and act_name not in modules:
        raise FairDeployError(f"activation {act_name!r} is not a module of the model")
    act_module = target if act_name is None else modules[act_name]

    sums: dict[str, torch.Tensor] = {
        "in": torch.zeros(target.in_features, dtype=torch.float64),
        "out": torch.zeros(target.out_features, dtype=torch.float64),
    }

    def add(key: str, t: torch.Tensor) -> None:
        if t.shape[-1] != sums[key].shape[0]:
            raise FairDeployError(
                f"activation {act_name!r} outputs {t.shape[-1]} features, but layer "
                f"{layer!r} has {sums[key].shape[0]}: name the activation that follows it"
            )
        # Sum over every axis but the feature axis (the last, as nn.Linear sees it).
        sums[key] += t.detach().abs().reshape(-1, t.shape[-1]).sum(0).to("cpu", torch.float64)

    # Summed inside the hooks, before an in-place activation can overwrite the tensor.
    # An activation module may be called after several layers (``self.act`` reused):
    # only its call on this layer's output counts. The output is held until that call
    # (so no later tensor can reuse its memory) and recognised by its storage.
    pending: list[torch.Tensor] = []

    def layer_out(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        if act_module is target:
            add("out", out)
        else:
            pending[:] = [out]

    def act_out(_m: nn.Module, args: Any, out: torch.Tensor) -> None:
        x = args[0] if args else None
        if pending and torch.is_tensor(x) and _same_tensor(x, pending[0]):
            pending.clear()
            add("out", out)

    handles = [
        target.register_forward_pre_hook(lambda _m, args: add("in", args[0])),
        target.register_forward_hook(layer_out),
    ]
    if act_module is not target:
        handles.append(act_module.register_forward_hook(act_out))
    was_training = {name: m.training for name, m in modules.items()}
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x.to(device))
    finally:
        for hnd in handles:
            hnd.remove()
        for name, m in modules.items():
            m.training = was_training[name]
    return sums["in"], sums["out"]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b`` or the same memory seen again (a no-op such as eval-mode Dropout
    may hand the activation its input under a new Python object)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape)


def following_activation(model: nn.Module, layer: str) -> str | None:
    """Qualified name of the activation module that follows ``layer``, if any.

    Read from the model's traced graph (:mod:`fairdeploy.structure`, the analysis the
    feature cut, the scoring and the export share): the first operation after ``layer``
    that is not a no-op in eval mode (Dropout, Identity) when it is an elementwise
    activation module (ReLU, LeakyReLU, PReLU, ELU, SELU, GELU, SiLU, Mish, Tanh, …)
    that receives the layer's output alone. None when the layer's output is the model's
    output or is used more than once, when something else comes first (BatchNorm, a
    reshape), or when the activation is a function call (``F.relu``: there is no module
    whose output could be hooked). This is what ``activation_abs_sums(...,
    activation="auto")`` uses.

    Raises
    ------
    FairDeployError
        If ``layer`` is not a module of the model, or the model cannot be traced
        (pass ``activation=`` explicitly to :func:`activation_abs_sums` then).
    """
    from fairdeploy.structure import analyze_structure  # structure imports lrf

    if not layer or layer not in dict(model.named_modules()):
        raise FairDeployError(
            f"layer {layer!r} is not a module of the model: give a qualified name such as "
            "'classifier.3'"
        )
    return analyze_structure(model, leaves=[layer]).following_activation(layer)
