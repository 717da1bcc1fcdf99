"""The factorized linear layer: ``y = ((x U) * S) V + b``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FactorizedLinear"]


class FactorizedLinear(nn.Module):
    """A linear layer stored as truncated-SVD factors of its transposed weight.

    ``nn.Linear`` computes ``x Wᵀ + b`` with ``W`` of shape (Dout, Din). This layer
    stores ``Wᵀ ≈ U diag(S) V`` with ``U`` (Din × k), ``S`` (k,) and ``V`` (k × Dout)
    as separate parameters, so per-entry scores of ``U`` and ``V`` can be computed
    with ``S`` held apart, and computes ``((x U) * S) V + b``.

    Structured sparsity (sparse SVD) is recorded next to the factors: the rows of
    ``U`` listed in ``sparse_rows`` and the columns of ``V`` listed in ``sparse_cols``
    keep only their first ``keep`` entries (the components with the largest singular
    values); the rest of those rows/columns are zero. Export uses this record to emit
    real smaller blocks instead of stored zeros.

    Parameters
    ----------
    U, S, V : torch.Tensor
        The factors, shapes (Din, k), (k,), (k, Dout).
    bias : torch.Tensor or None
        The bias, shape (Dout,), or None.
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if U.ndim != 2 or S.ndim != 1 or V.ndim != 2:
            raise ValueError("U, S, V must be 2-D, 1-D and 2-D")
        if U.shape[1] != S.shape[0] or V.shape[0] != S.shape[0]:
            raise ValueError(
                f"inconsistent factor shapes U{tuple(U.shape)} S{tuple(S.shape)} "
                f"V{tuple(V.shape)}"
            )
        self.U = nn.Parameter(U.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        self.V = nn.Parameter(V.detach().clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("sparse_rows", torch.zeros(0, dtype=torch.long))
        self.register_buffer("sparse_cols", torch.zeros(0, dtype=torch.long))
        self.keep = int(S.shape[0])

    @property
    def in_features(self) -> int:
        """Din, the number of input features."""
        return int(self.U.shape[0])

    @property
    def out_features(self) -> int:
        """Dout, the number of output features."""
        return int(self.V.shape[1])

    @property
    def rank(self) -> int:
        """k, the number of kept singular components."""
        return int(self.S.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``((x U) * S) V + b``."""
        y = ((x @ self.U) * self.S) @ self.V
        if self.bias is not None:
            y = y + self.bias
        return y

    def dense_weight(self) -> torch.Tensor:
        """The (Dout, Din) weight this layer computes, as ``nn.Linear`` would store it."""
        return ((self.U * self.S) @ self.V).T

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
        if self.sparse_rows.numel() or self.sparse_cols.numel():
            s += (
                f", sparse_rows={self.sparse_rows.numel()}, "
                f"sparse_cols={self.sparse_cols.numel()}, keep={self.keep}"
            )
        return s

    # ``keep`` is a plain int attribute: carry it through state_dict so that a saved
    # model (weights_only) restores its sparsity record.
    def get_extra_state(self) -> dict[str, int]:
        return {"keep": self.keep}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.keep = int(state["keep"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The sparsity record's length varies with sr: resize before loading.
        for name in ("sparse_rows", "sparse_cols"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
