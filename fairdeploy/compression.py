"""Compression accounting from shapes alone: the paper's theoretical compression rate.

Only parameter shapes are read, so a model built on the meta device
(``with torch.device("meta"): build_model(...)``) works and nothing is allocated. Each
method owns its accounting (:mod:`fairdeploy.methods`); these functions ask the plan's
method. The paper's (DESIGN §4): parameters (or, for quantization, bits) of the vanilla
model over those of the processed one; a factorized layer counts ``Din·k + k·k + k·Dout``
(S as a k×k matrix) plus its bias, minus every entry the sparse SVD zeroes; FairQuantize
32 / (32 − 24q); FairPrune stores dense, 1.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fairdeploy.lrf import break_even_rank
from fairdeploy.methods import count_parameters
from fairdeploy.plan import Plan

__all__ = ["break_even_rank", "count_parameters", "layer_table", "theoretical_cr"]


def layer_table(model: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    """Per layer the plan changes: shapes, what is sparsified and parameter counts.

    Parameters
    ----------
    model : nn.Module
        The vanilla model (any device, meta included).
    plan : Plan
        The plan; methods that change no layer's shape give an empty table.

    Returns
    -------
    list of dict
        For low-rank methods one dict per target layer with keys ``name``, ``din``,
        ``dout``, ``k``, ``rows_sparsified`` (⌊sr·Din⌋), ``cols_sparsified``
        (⌊sr·Dout⌋), ``keep`` (⌊rr·k⌋, entries a sparsified row/column keeps),
        ``params_before`` (dense weight + bias), ``params_after`` (paper accounting, S as
        k×k) and ``params_stored`` (S as k values, what an exported graph holds).
    """
    return plan.implementation.layer_table(plan, model)


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
    return float(plan.implementation.theoretical_cr(plan, model))
