"""Low-rank factorization: FactorizedLinear, truncated SVD, sparse SVD, selection."""

from fairdeploy.lrf._apply import (
    factorize_model,
    functional_linears,
    linear_layers,
    replace_module,
)
from fairdeploy.lrf._factorized import FactorizedLinear
from fairdeploy.lrf._selection import (
    ROW_SCORES,
    SelectionInputs,
    activation_abs_sums,
    following_activation,
    list_strategies,
    register_strategy,
    select_rows_cols,
    strategy_scores,
)
from fairdeploy.lrf._sparse import sparsify
from fairdeploy.lrf._svd import (
    SOLVERS,
    FactorizationWarning,
    SVDResult,
    break_even_rank,
    factorize,
    truncated_svd,
)

__all__ = [
    "ROW_SCORES",
    "SOLVERS",
    "FactorizationWarning",
    "FactorizedLinear",
    "SVDResult",
    "SelectionInputs",
    "activation_abs_sums",
    "break_even_rank",
    "factorize",
    "factorize_model",
    "following_activation",
    "functional_linears",
    "linear_layers",
    "list_strategies",
    "register_strategy",
    "replace_module",
    "select_rows_cols",
    "sparsify",
    "strategy_scores",
    "truncated_svd",
]
