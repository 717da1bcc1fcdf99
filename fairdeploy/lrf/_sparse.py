"""Sparse SVD: zero the trailing entries of selected rows of U and columns of V."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from fairdeploy.errors import FairDeployError
from fairdeploy.fraction import kept_entries, num_selected
from fairdeploy.lrf._factorized import FactorizedLinear

__all__ = ["sparsify"]


def _as_index(
    values: Sequence[int] | torch.Tensor, what: str, dim: int, expected: int
) -> torch.Tensor:
    idx = torch.as_tensor(values)
    if idx.ndim != 1 or (idx.numel() and (idx.dtype.is_floating_point or idx.dtype == torch.bool)):
        raise FairDeployError(
            f"{what} must be a 1-D sequence of integer indices, got shape {tuple(idx.shape)} "
            f"dtype {idx.dtype}"
        )
    idx = idx.to(torch.long).cpu()
    if idx.numel() != expected:
        raise FairDeployError(
            f"{what} has {idx.numel()} indices, but sr selects ⌊sr·{dim}⌋ = {expected}: "
            f"pass exactly {expected}"
        )
    if idx.numel():
        bad = idx[(idx < 0) | (idx >= dim)]
        if bad.numel():
            raise FairDeployError(
                f"{what} contains index {int(bad[0])}, outside [0, {dim - 1}]"
            )
        if torch.unique(idx).numel() != idx.numel():
            raise FairDeployError(f"{what} contains repeated indices: each may appear once")
    return torch.sort(idx).values


def sparsify(
    factorized: FactorizedLinear,
    sr: float,
    rr: float,
    rows: Sequence[int] | torch.Tensor,
    cols: Sequence[int] | torch.Tensor,
) -> FactorizedLinear:
    """Sparse SVD of a factorized layer: a new layer with selected rows/columns trimmed.

    The selected rows of ``U`` (input nodes) and columns of ``V`` (output nodes) keep
    their first ``⌊rr·k⌋`` entries (the components with the largest singular values)
    and the rest are set to zero; ``rr = 0`` zeroes them entirely. This follows the
    reference SLR code (``U[rows, ⌊rr·k⌋:] = 0``), so ``rr`` is the fraction KEPT.

    Parameters
    ----------
    factorized : FactorizedLinear
        A layer from :func:`factorize`, not yet sparsified; it is not modified.
    sr : float
        Sparsity rate in [0, 1]: ``rows`` must hold ``⌊sr·Din⌋`` and ``cols``
        ``⌊sr·Dout⌋`` indices.
    rr : float
        Fraction in [0, 1] of the k entries a selected row/column keeps.
    rows, cols : sequence of int or LongTensor
        Unique indices of the rows of U (in ``[0, Din)``) and columns of V (in
        ``[0, Dout)``), e.g. from :func:`select_rows_cols`.

    Returns
    -------
    FactorizedLinear
        A copy with the entries zeroed and ``sparse_rows``/``sparse_cols`` (sorted) and
        ``keep = ⌊rr·k⌋`` recorded for export.
    """
    if not isinstance(factorized, FactorizedLinear):
        raise FairDeployError(
            f"sparsify needs a FactorizedLinear (from factorize), got {type(factorized).__name__}"
        )
    if factorized.sparse_rows.numel() or factorized.sparse_cols.numel():
        raise FairDeployError(
            "sparsify got a layer that is already sparsified: sparsify the layer that "
            "factorize returned"
        )
    din, dout, k = factorized.in_features, factorized.out_features, factorized.rank
    # num_selected / kept_entries check that sr and rr lie in [0, 1].
    row_idx = _as_index(rows, "rows", din, num_selected(sr, din))
    col_idx = _as_index(cols, "cols", dout, num_selected(sr, dout))
    keep = kept_entries(rr, k)

    out = copy.deepcopy(factorized)
    with torch.no_grad():
        out.U[row_idx.to(out.U.device), keep:] = 0
        out.V[keep:, col_idx.to(out.V.device)] = 0
    out.sparse_rows = row_idx.to(out.sparse_rows.device)
    out.sparse_cols = col_idx.to(out.sparse_cols.device)
    out.keep = keep
    return out
