"""Low-rank factorization: FactorizedLinear, truncated SVD, sparse SVD, selection."""

from fairdeploy.lrf._factorized import FactorizedLinear

__all__ = ["FactorizedLinear"]
