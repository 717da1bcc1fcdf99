"""FairQuantize (Guo et al. 2024): quantize to int8 the weights whose rounding costs the
unprivileged group least relative to the privileged one.

Every weight θ of the chosen ``nn.Linear``/``nn.Conv2d`` layers gets the score
``½ Δθ² (h0 − β h1)``, Δθ = Q(θ) − θ the change int8 rounding makes (the Taylor
estimate of ΔE₀ − β ΔE₁ of that change; ``h_c`` the Hessian diagonal of the mean CE on
group c's scoring set, :mod:`fairdeploy.weight_hessian`), and the ``quantize_ratio``
fraction with the lowest score is replaced by its de-quantized int8 value, in ``steps``
increments with Hessians recomputed before each and optional fine-tuning of the
still-float weights after each.

The quantizer (:func:`quantize_per_channel`): symmetric int8 per output channel (axis 0
of the PyTorch weight), zero point 0, ``scale_o = max|W_o| / 127`` over the whole
channel of the ORIGINAL weight (1.0 for an all-zero channel), ``q = clamp(round(w /
scale), −127, 127)`` with round-half-to-even, de-quantized ``q · scale`` in float32 —
exactly what ONNX ``DequantizeLinear`` computes from (int8 values, scales, axis 0). The
scales are fixed once, before the first step: fine-tuning may move a float weight past
``127 · scale``; if such a weight is chosen later it is clamped, and its Δθ (clamping
included) makes it unlikely to be chosen.

Decisions, and where they differ from the public code (guoyb17/FairQuantize;
``DESIGN.md`` §2 is followed):

* Quantizer: the reference rounds weights to signed powers of two
  (``2**round(log2|θ|) · sign θ``, INQ-style), not int8; the FairLRF paper's tables
  count 8 of 32 bits per quantized weight, and DESIGN asks for int8 per output channel,
  which ONNX Runtime can store and run.
* Fraction: the reference takes ``round(target · n_l)`` (+1, an off-by-one of its
  ``rank <= kth`` test) of every layer ("weight" parameters of the whole model), and its
  ``torch.where(argsort(scores) <= kth)`` marks the positions whose *argsort value* is
  small rather than the lowest scores — a bug we do not copy. Here ``scope="layer"``
  (default, as the reference) takes ``⌊q · n_l⌋`` of each chosen layer, ``"global"``
  ``⌊q · N⌋`` of all chosen weights; selected entries are exactly the lowest scores
  (ties by position).
* Steps: as the reference, step s quantizes up to the cumulative fraction
  ``(s / steps) · q`` (entries chosen earlier stay quantized), after recomputing the
  Hessians on the current model; the reference uses 20 steps of 5 % with 20 epochs of
  fine-tuning after each (SGD lr 1e-3, no momentum, no weight decay, StepLR 4 / 0.57,
  on balanced group batches, keeping the best-validation checkpoint). Here fine-tuning
  (``finetune_epochs`` > 0, after every step, the last included) reuses
  :func:`fairdeploy.train.train_model` on the given training set with those optimizer
  defaults; quantized weights are put back to their values after every optimizer step,
  so only float weights (and biases) change. No checkpoint selection on validation.
* Score: the reference weights the groups' Hessians by two integers (9 and −5 for
  β = 5/9) and drops the ½; the ranking is the same.
* Compression: with Nq weights quantized out of P parameters of the whole model,
  C.R. = 32·P / (32·P − 24·Nq) (:func:`fairquantize_cr`); with every weight chosen
  that is the paper's 32 / (32 − 24q) up to the biases (vgg11_paper: 1.081 at 10 %,
  1.176 at 20 %).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fairdeploy._text import plural
from fairdeploy.errors import FairDeployError
from fairdeploy.progress import phase
from fairdeploy.scoring import entry_scores
from fairdeploy.weight_hessian import group_pair, group_weight_hessians, resolve_layers
from fairdeploy.weight_selection import (
    SelectionCounts,
    check_beta,
    check_fraction,
    check_scope,
    lowest_entries,
    selection_counts,
)

__all__ = [
    "FINETUNE_DEFAULTS",
    "QMAX",
    "QuantizeResult",
    "channel_scales",
    "dequantize_per_channel",
    "fairquantize",
    "fairquantize_cr",
    "planned_quantized_count",
    "quantization_change",
    "quantize_per_channel",
]

#: Largest int8 magnitude of the symmetric quantizer (values in [−127, 127]).
QMAX = 127

#: Fine-tuning optimizer settings (the reference's defaults; override with ``finetune``).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "step_epochs": 4,
    "gamma": 0.57,
    "batch_size": 128,
}


# --------------------------------------------------------------------------- quantizer


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales per output channel: ``max|W_o| / 127`` (axis 0).

    Parameters
    ----------
    weight : torch.Tensor
        A Linear (Dout, Din) or Conv2d (Dout, Din/groups, kh, kw) weight, floating.

    Returns
    -------
    torch.Tensor
        float32, shape (Dout,); 1.0 for an all-zero channel (its values quantize to 0
        whatever the scale, and a zero scale cannot be divided by).

    Raises
    ------
    FairDeployError
        A weight with NaN or inf, or with fewer than one dimension.
    """
    if weight.ndim < 1 or not weight.is_floating_point():
        raise FairDeployError(
            f"weight has dtype {weight.dtype} and shape {tuple(weight.shape)}; allowed: a "
            "floating tensor with the output channels on axis 0"
        )
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise FairDeployError("weight contains NaN or inf; it cannot be quantized")
    amax = w.abs().reshape(w.shape[0], -1).amax(1) if w.numel() else w.new_zeros(w.shape[0])
    scales = amax / QMAX
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_per_channel(
    weight: torch.Tensor, scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization.

    ``q = clamp(round(w / scale_o), −127, 127)``, round half to even, zero point 0.

    Parameters
    ----------
    weight : torch.Tensor
        Floating weight, output channels on axis 0.
    scales : torch.Tensor, optional
        (Dout,) positive scales; by default :func:`channel_scales` of ``weight``.

    Returns
    -------
    values : torch.Tensor
        int8, the weight's shape.
    scales : torch.Tensor
        float32, (Dout,).
    """
    if scales is None:
        scales = channel_scales(weight)
    scales = scales.detach().float()
    if scales.shape != (weight.shape[0],) or not (scales > 0).all() or not scales.isfinite().all():
        raise FairDeployError(
            f"scales has shape {tuple(scales.shape)}; allowed: ({weight.shape[0]},) positive "
            "finite values, one per output channel"
        )
    w = weight.detach().float()
    q = torch.round(w / _per_channel(scales.to(w.device), w)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scales


def dequantize_per_channel(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``values · scale_o`` in float32 (ONNX ``DequantizeLinear`` with axis 0, zero point 0)."""
    return values.float() * _per_channel(scales.float().to(values.device), values)


def quantization_change(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Δθ = Q(θ) − θ: de-quantized int8 value minus the weight, float32, weight's shape."""
    values, scales = quantize_per_channel(weight, scales)
    return dequantize_per_channel(values, scales) - weight.detach().float()


# --------------------------------------------------------------------------- compression


def fairquantize_cr(model: nn.Module, quantized: int) -> float:
    """The paper's C.R. with ``quantized`` weights stored in 8 of 32 bits.

    ``32·P / (32·P − 24·quantized)``, P the parameter count (weights and biases) of
    ``model`` — pass the WHOLE model, not a head, for the figure a report shows.
    Shapes only: a model on the meta device works.
    """
    total = sum(p.numel() for p in model.parameters())
    if not 0 <= quantized <= total:
        raise FairDeployError(f"quantized={quantized} is outside [0, {total}] for this model")
    return 32.0 * total / (32.0 * total - 24.0 * quantized)


def planned_quantized_count(
    model: nn.Module,
    quantize_ratio: float,
    *,
    layers: str | Sequence[str] = "all",
    scope: str = "layer",
) -> int:
    """How many weights :func:`fairquantize` quantizes, from shapes alone.

    ``Σ_l ⌊q · n_l⌋`` for ``scope="layer"``, ``⌊q · Σ_l n_l⌋`` for ``"global"``: with
    :func:`fairquantize_cr` the theoretical C.R. of a plan before any data is read.
    """
    ratio = check_fraction("quantize_ratio", quantize_ratio)
    sizes = {n: model.get_submodule(n).weight.numel() for n in resolve_layers(model, layers)}
    counts = selection_counts(sizes, ratio, scope)
    return sum(counts.values()) if isinstance(counts, dict) else counts


# --------------------------------------------------------------------------- method


@dataclass(frozen=True, eq=False)
class QuantizeResult(SelectionCounts):
    """The outcome of :func:`fairquantize`.

    The storage contract (for an ONNX writer): per chosen layer, ``masks[l]`` (bool,
    the weight's shape) marks the int8 entries, ``values[l]`` (int8, the weight's shape,
    0 where not quantized) holds them, ``scales[l]`` (float32, (Dout,), axis 0 of the
    PyTorch weight) de-quantizes them, and the float remainder is
    ``model.<l>.weight[~masks[l]]``. ``model.<l>.weight[masks[l]]`` equals
    ``(values[l] · scales[l])[masks[l]]`` bit for bit.

    Attributes
    ----------
    model, masks, counts, sizes, beta, scope
        As :class:`~fairdeploy.weight_selection.SelectionCounts`: the de-quantized copy
        (float weights, quantized entries at ``q · scale``), in eval mode; ``masks`` True
        at the int8 entries.
    values, scales : dict[str, torch.Tensor]
        As above, per layer (module name).
    quantize_ratio : float
    steps, finetune_epochs : int
    history : list of dict
        Per step: ``step``, ``fraction`` (cumulative target), ``new`` (entries
        quantized in this step), ``quantized`` (total after it) and, when fine-tuned,
        ``finetune`` (train_model's per-epoch history).
    """

    values: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    quantize_ratio: float
    steps: int
    finetune_epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)

    #: Weights quantized over all chosen layers.
    total_quantized = SelectionCounts.selected_total
    #: Quantized weights over all weights of the chosen layers.
    quantized_fraction = SelectionCounts.selected_fraction


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FairDeployError(f"{name}={value!r} is invalid; allowed: an integer ≥ {minimum}")
    return value


def fairquantize(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor | Sequence[int],
    *,
    quantize_ratio: float,
    beta: float,
    layers: str | Sequence[str] = "all",
    scope: str = "layer",
    steps: int = 1,
    finetune_epochs: int = 0,
    train_set: Any | None = None,
    finetune: Mapping[str, Any] | None = None,
    estimator: str = "exact",
    batch_size: int = 64,
    mc_samples: int = 1,
    seed: int = 0,
    group_ids: Sequence[int] = (0, 1),
    hessians: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize the ``quantize_ratio`` fraction of weights with the lowest FairQuantize score.

    Parameters
    ----------
    model : nn.Module
        The vanilla model, or a head fed cached features when every chosen layer is in
        it. Not modified.
    inputs, targets, groups : torch.Tensor
        The scoring sets (model inputs, labels, group ids; ids not in ``group_ids`` are
        ignored), balanced by the caller (:func:`~fairdeploy.scoring.scoring_indices`).
    quantize_ratio : float
        Fraction q in [0, 1] of the chosen weights to quantize.
    beta : float
        Trade-off β in ``½ Δθ² (h0 − β h1)``.
    layers : "all" or sequence of str
        ``"all"`` (default): every ``nn.Linear`` and ``nn.Conv2d`` weight; or module
        names. Biases stay float.
    scope : {"layer", "global"}
        ``"layer"``: ``⌊q · n_l⌋`` of each layer (as the reference); ``"global"``:
        ``⌊q · N⌋`` of all chosen weights together.
    steps : int
        Increments (default 1): step s quantizes up to the cumulative fraction
        ``(s / steps) · q``, with Hessians recomputed on the current model.
    finetune_epochs : int
        Epochs of fine-tuning after every step (default 0: none); needs ``train_set``.
        Quantized weights are held at their values; every other parameter trains.
    train_set : Dataset, optional
        Map-style dataset of ``(x, y, group)`` triples for fine-tuning (the training
        split, as the model's input: images, or cached features for a head).
    finetune : mapping, optional
        Keyword arguments for :func:`fairdeploy.train.train_model` over
        :data:`FINETUNE_DEFAULTS` (``lr``, ``momentum``, ``weight_decay``,
        ``step_epochs``, ``gamma``, ``batch_size``, ``device``, ``progress``, …).
    estimator, batch_size, mc_samples, seed
        Hessian settings, as in :func:`~fairdeploy.weight_hessian.weight_hessian_diag`;
        ``seed`` also seeds fine-tuning (``seed + step``).
    group_ids : (int, int)
        The ids in ``groups`` of the unprivileged and the privileged group, in that
        order (h0 and h1 of the score); default (0, 1).
    hessians : mapping, optional
        Hessian diagonals of the chosen weights for the first step (e.g. cached), keyed
        by role: ``{0: unprivileged, 1: privileged}``; later steps always recompute them.
    progress : bool
        Show the progress of each Hessian computation (every step's but a first step given
        ``hessians``), as ``FairQuantize step s/S: Hessians …`` (default False).

    Returns
    -------
    QuantizeResult

    Raises
    ------
    FairDeployError
        Bad settings or layer names, fine-tuning without a training set, Hessians
        missing or not finite, and the errors of the Hessian computation.
    """
    quantize_ratio = check_fraction("quantize_ratio", quantize_ratio)
    beta = check_beta(beta)
    scope = check_scope(scope)
    steps = _check_int("steps", steps, 1)
    finetune_epochs = _check_int("finetune_epochs", finetune_epochs, 0)
    options = _finetune_options(finetune, finetune_epochs, train_set)

    net = copy.deepcopy(model).eval()
    names = resolve_layers(net, layers)
    entries = _QuantizedEntries(net, names)
    unpriv, priv = (int(g) for g in group_ids)
    if unpriv == priv:
        raise FairDeployError(f"group_ids={tuple(group_ids)!r} must name two different groups")

    history: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        h = (
            hessians if step == 1 and hessians is not None
            else _role_hessians(
                net, names, inputs, targets, groups, group_ids=(unpriv, priv),
                estimator=estimator, batch_size=batch_size, mc_samples=mc_samples, seed=seed,
                progress=progress, step=(step, steps),
            )
        )
        fraction = quantize_ratio if step == steps else quantize_ratio * step / steps
        chosen = lowest_entries(entries.scores(net, h, beta), fraction, scope=scope)
        new = entries.add(net, chosen)
        record: dict[str, Any] = {
            "step": step,
            "fraction": fraction,
            "new": new,
            "quantized": sum(int(m.sum()) for m in entries.masks.values()),
        }
        if finetune_epochs:
            net, record["finetune"] = _finetune(
                net, train_set, entries, epochs=finetune_epochs, seed=seed + step,
                options=options,
            )
        history.append(record)

    net.eval()
    return QuantizeResult(
        model=net,
        masks=entries.masks,
        values=entries.values,
        scales=entries.scales,
        counts={n: int(m.sum()) for n, m in entries.masks.items()},
        sizes={n: m.numel() for n, m in entries.masks.items()},
        quantize_ratio=quantize_ratio,
        beta=beta,
        scope=scope,
        steps=steps,
        finetune_epochs=finetune_epochs,
        history=history,
    )


def _finetune_options(
    finetune: Mapping[str, Any] | None, finetune_epochs: int, train_set: Any | None
) -> dict[str, Any]:
    """train_model's keyword arguments for fine-tuning: :data:`FINETUNE_DEFAULTS`
    overridden by ``finetune``; refused without a training set, or when they set what
    fairquantize sets itself."""
    if finetune_epochs and train_set is None:
        raise FairDeployError(
            f"finetune_epochs={finetune_epochs} needs a train_set to fine-tune on; give the "
            "training split or set finetune_epochs=0"
        )
    options = {**FINETUNE_DEFAULTS, "progress": False, **dict(finetune or {})}
    reserved = {"epochs", "seed", "after_step", "checkpoint_path", "val_set"} & options.keys()
    if reserved:
        raise FairDeployError(
            f"finetune may not set {sorted(reserved)}: use finetune_epochs and seed"
        )
    return options


def _role_hessians(
    net: nn.Module, names: Sequence[str], inputs: torch.Tensor, targets: torch.Tensor,
    groups: torch.Tensor | Sequence[int], *, group_ids: tuple[int, int], estimator: str,
    batch_size: int, mc_samples: int, seed: int, progress: bool, step: tuple[int, int],
) -> dict[int, Mapping[str, torch.Tensor]]:
    """The chosen weights' Hessian diagonals of the current model, keyed by role in the
    score: 0 the unprivileged group (``group_ids[0]``), 1 the privileged; with
    ``progress``, shown as step ``step[0]`` of ``step[1]``."""
    unpriv, priv = group_ids
    n = int(np.isin(np.asarray(groups), group_ids).sum())
    with phase(f"FairQuantize step {step[0]}/{step[1]}: Hessians of "
               f"{plural(len(names), 'weight tensor')}",
               total=n, unit="sample", enabled=progress) as bar:
        by_id = group_weight_hessians(
            net, [f"{n}.weight" for n in names], inputs, targets, groups,
            group_ids=(unpriv, priv), estimator=estimator, batch_size=batch_size,
            mc_samples=mc_samples, seed=seed, on_chunk=bar.advance,
        )
    return {0: by_id[unpriv], 1: by_id[priv]}


class _QuantizedEntries:
    """The int8 entries chosen so far, per layer: scales fixed once from the original
    weights, the mask of quantized entries and their int8 values (0 elsewhere)."""

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        weights = {n: net.get_submodule(n).weight for n in self.names}
        self.scales = {n: channel_scales(w) for n, w in weights.items()}
        self.masks = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in weights.items()}
        self.values = {n: torch.zeros_like(w, dtype=torch.int8) for n, w in weights.items()}
        # Per (layer, device): the mask and de-quantized values in the weight's dtype.
        self._held: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def scores(self, net: nn.Module, h: Mapping[int, Mapping[str, torch.Tensor]],
               beta: float) -> dict[str, torch.Tensor]:
        """Per layer, every entry's ``½ Δθ² (h0 − β h1)``; entries quantized earlier score
        −inf, so the cumulative target keeps them."""
        scores = {}
        for n in self.names:
            w = net.get_submodule(n).weight
            h0, h1 = group_pair(h, f"{n}.weight", w)
            delta = quantization_change(w, self.scales[n]).to(h0.device, torch.float64)
            s = entry_scores(delta, h0, h1, beta)
            scores[n] = s.masked_fill(self.masks[n].to(s.device), float("-inf"))
        return scores

    def add(self, net: nn.Module, chosen: Mapping[str, torch.Tensor]) -> int:
        """Quantize the ``chosen`` entries of ``net`` (a superset of those quantized
        before) in place; return how many are new."""
        new = 0
        with torch.no_grad():
            for n in self.names:
                w = net.get_submodule(n).weight
                c = chosen[n].to(self.masks[n].device)
                assert bool((c | ~self.masks[n]).all()), "an earlier quantized entry was dropped"
                fresh = c & ~self.masks[n]
                new += int(fresh.sum())
                q, _ = quantize_per_channel(w, self.scales[n])
                self.values[n] = torch.where(fresh, q.to(self.values[n].device), self.values[n])
                self.masks[n] = c
            self._held.clear()
            self.hold(net)
        return new

    def hold(self, m: nn.Module) -> None:
        """Put the quantized entries of ``m`` (back) to their int8 values: after
        quantizing, and after every optimizer step of the fine-tuning."""
        for n in self.names:
            w = m.get_submodule(n).weight
            key = (n, w.device)
            if key not in self._held:
                dq = dequantize_per_channel(self.values[n], self.scales[n])
                self._held[key] = (self.masks[n].to(w.device), dq.to(w.device, w.dtype))
            mask, dq = self._held[key]
            w.copy_(torch.where(mask, dq, w))


def _finetune(
    net: nn.Module, train_set: Any, entries: _QuantizedEntries, *, epochs: int, seed: int,
    options: Mapping[str, Any],
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune the float weights of ``net`` (quantized entries held); return the
    trained copy in eval mode and train_model's per-epoch history."""
    from fairdeploy.train import train_model

    result = train_model(
        net, train_set, None, epochs=epochs, seed=seed, after_step=entries.hold, **options,
    )
    return result.model.eval(), result.history
