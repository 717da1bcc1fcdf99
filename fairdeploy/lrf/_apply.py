"""Apply factorization to a whole model: find Linear layers, swap modules, follow a Plan."""

from __future__ import annotations

import copy

from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf._svd import factorize
from fairdeploy.plan import Plan

__all__ = ["factorize_model", "linear_layers", "replace_module"]


def linear_layers(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules of a model, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def functional_linears(model: nn.Module) -> dict[str, str]:
    """The ``nn.Linear`` modules whose owner uses their weights functionally instead of
    calling them, each with the reason: ``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward``. Neither a cut nor a
    forward hook can reach such a layer."""
    return {
        f"{name}.out_proj": (
            f"nn.MultiheadAttention {name!r} uses the weights of its out_proj functionally "
            "(F.multi_head_attention_forward) instead of calling the module"
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Linear)
    }


def _linear_or_error(model: nn.Module, name: str) -> nn.Linear:
    module = dict(model.named_modules()).get(name) if name else None
    if not isinstance(module, nn.Linear):
        found = "no such module" if module is None else f"a {type(module).__name__}"
        raise FairDeployError(
            f"layer {name!r} is {found}, not an nn.Linear: the model's Linear layers are "
            f"{', '.join(linear_layers(model)) or '(none)'}"
        )
    return module


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with the submodule ``name`` replaced by ``new_module``.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    name : str
        Qualified name of an existing submodule (``classifier.3``).
    new_module : nn.Module
        Placed into the copy as is (not copied).
    """
    if not name or name not in dict(model.named_modules()):
        raise FairDeployError(
            f"module {name!r} does not exist in the model: give a qualified name such as "
            f"{', '.join(linear_layers(model)[:3]) or 'features.0'}"
        )
    # Copy everything except the module being replaced (its weights may be large).
    old = model.get_submodule(name)
    out = copy.deepcopy(model, memo={id(old): new_module})
    out.set_submodule(name, new_module)
    return out


def factorize_model(
    model: nn.Module, plan: Plan, *, solver: str = "auto", seed: int = 0
) -> nn.Module:
    """A copy of ``model`` with every layer of an LRF ``plan`` replaced by its truncated SVD.

    Each planned layer must be an ``nn.Linear``; it becomes
    ``factorize(layer, plan_layer.rank, solver=solver, seed=seed)``. No rows or columns
    are sparsified here: the sparse-SVD methods select them from scores the pipeline
    computes on the factorized model (see :func:`select_rows_cols`, :func:`sparsify`).

    Parameters
    ----------
    model : nn.Module
        The vanilla model (not modified).
    plan : Plan
        An LRF plan (``truncated_svd``, ``slr_w``, ``slr_a`` or ``fairlrf``).
    solver : {"auto", "full", "propack", "arpack"}
        SVD solver, see :func:`truncated_svd`.
    seed : int
        Seed of the iterative solvers' random start.
    """
    if not plan.factorizes:
        raise FairDeployError(
            f"factorize_model needs a low-rank plan, got method {plan.method!r}: use a "
            "method that factorizes layers (truncated_svd, slr_w, slr_a, fairlrf)"
        )
    factorized = {}
    for lp in plan.layers:
        linear = _linear_or_error(model, lp.layer)
        try:
            factorized[lp.layer] = factorize(linear, lp.rank, solver=solver, seed=seed)
        except FairDeployError as exc:
            raise FairDeployError(f"layer {lp.layer!r}: {exc}") from None
    old_modules = {id(model.get_submodule(n)): m for n, m in factorized.items()}
    out = copy.deepcopy(model, memo=old_modules)
    for name, module in factorized.items():
        out.set_submodule(name, module)
    return out
