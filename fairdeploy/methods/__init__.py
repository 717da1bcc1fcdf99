"""Compression methods as plug-ins: one module per method, one registry.

Built in (the paper's rows, in its order): ``vanilla``, ``truncated_svd``, ``slr_w``,
``slr_a``, ``fairprune``, ``fairquantize``, ``fairlrf``. Each module defines the method's
plan (its recipe keys), label, what it does (:meth:`Method.apply`) and its compression
accounting. Add your own by subclassing :class:`Method` and decorating it with
:func:`register_method`, or name it in a recipe as ``package.module:Class``.

Importing this package registers the built-in methods. :class:`~fairdeploy.plan.Plan` is
re-exported here (and as ``fairdeploy.Plan``) for that reason: ``Plan("fairlrf", ...)``
finds its method in the table this package fills, and :mod:`fairdeploy.plan` does not
import the methods (they import it).
"""

from fairdeploy.methods._base import Method, Processed, count_parameters
from fairdeploy.methods._registry import _load_builtins, get_method, list_methods, register_method
from fairdeploy.plan import Plan

__all__ = [
    "Method",
    "Plan",
    "Processed",
    "count_parameters",
    "get_method",
    "list_methods",
    "register_method",
]

# Last, once the names above are bound (the built-in modules import them): a plan looks
# its method up in a table that this registers, so importing the package registers all.
_load_builtins()
