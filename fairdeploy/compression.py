"""Compression accounting from shapes alone: the paper's theoretical compression rate.

Only parameter shapes are read, so a model built on the meta device
(``with torch.device("meta"): build_model(...)``) works and nothing is allocated.

Accounting (DESIGN §4, the paper's):

- vanilla, ``fairprune`` (pruned weights are stored dense): C.R. 1.
- ``fairquantize``: a quantized weight costs 8 of 32 bits, so with a fraction q of all
  weights quantized C.R. = 32 / (32 − 24q).
- LRF methods: total parameter count (weights and biases) of the vanilla model over
  that of the processed one. A factorized layer counts ``Din·k + k·k + k·Dout`` (S as a
  k×k matrix, as the paper does) plus its bias, minus every entry the sparse SVD zeroes:
  ``(⌊sr·Din⌋ + ⌊sr·Dout⌋) · (k − ⌊rr·k⌋)``. Only ``slr_w``, ``slr_a`` and ``fairlrf``
  sparsify; ``truncated_svd`` ignores sr/rr.

:func:`layer_table` also gives ``params_stored``, which counts S as the k values an
exported graph holds; measured (byte) compression should match that count.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf._apply import _linear_or_error
from fairdeploy.lrf._svd import break_even_rank
from fairdeploy.plan import LayerPlan, Plan, kept_entries, num_selected

__all__ = ["SPARSE_METHODS", "break_even_rank", "layer_table", "theoretical_cr"]

#: LRF methods that sparsify the factors (sparse SVD) after the truncated SVD.
SPARSE_METHODS = ("slr_w", "slr_a", "fairlrf")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_row(model: nn.Module, plan: Plan, lp: LayerPlan) -> dict[str, Any]:
    linear = _linear_or_error(model, lp.layer)
    din, dout, k = linear.in_features, linear.out_features, lp.rank
    if k > min(din, dout):
        raise FairDeployError(
            f"rank={k} for layer {lp.layer!r} (Linear({din}, {dout})) is not allowed: use an "
            f"integer in [1, {min(din, dout)}]"
        )
    bias = 0 if linear.bias is None else linear.bias.numel()
    if plan.method in SPARSE_METHODS:
        rows, cols = num_selected(lp.sr, din), num_selected(lp.sr, dout)
        keep = kept_entries(lp.rr, k)
    else:
        rows, cols, keep = 0, 0, k
    zeroed = (rows + cols) * (k - keep)
    factors = din * k + k * dout + bias - zeroed
    return {
        "name": lp.layer,
        "din": din,
        "dout": dout,
        "k": k,
        "rows_sparsified": rows,
        "cols_sparsified": cols,
        "keep": keep,
        "params_before": din * dout + bias,
        "params_after": factors + k * k,
        "params_stored": factors + k,
    }


def layer_table(model: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    """Per planned layer: shapes, sparsification and parameter counts.

    Parameters
    ----------
    model : nn.Module
        The vanilla model (any device, meta included).
    plan : Plan
        The plan; non-LRF methods give an empty table.

    Returns
    -------
    list of dict
        One dict per layer of ``plan`` with keys ``name``, ``din``, ``dout``, ``k``,
        ``rows_sparsified`` (⌊sr·Din⌋), ``cols_sparsified`` (⌊sr·Dout⌋), ``keep``
        (⌊rr·k⌋, entries a sparsified row/column keeps), ``params_before`` (dense weight
        + bias), ``params_after`` (paper accounting, S as k×k) and ``params_stored``
        (S as k values, what an exported graph holds).
    """
    if not plan.is_lrf:
        return []
    return [_layer_row(model, plan, lp) for lp in plan.layers]


def theoretical_cr(model: nn.Module, plan: Plan) -> float:
    """The paper's theoretical compression rate of applying ``plan`` to ``model``.

    Parameters
    ----------
    model : nn.Module
        The vanilla model; only shapes are read (the meta device works).
    plan : Plan
        The method and its settings.

    Returns
    -------
    float
        Parameters (or, for ``fairquantize``, bits) of the vanilla model over those of
        the processed model; 1.0 for ``vanilla`` and ``fairprune``.
    """
    if plan.method == "fairquantize":
        return 32.0 / (32.0 - 24.0 * plan.quantize_ratio)
    if not plan.is_lrf:
        return 1.0
    total = _count(model)
    rows = layer_table(model, plan)
    processed = total - sum(r["params_before"] - r["params_after"] for r in rows)
    return total / processed
