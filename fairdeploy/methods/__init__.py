"""Compression methods as plug-ins: one module per method, one registry.

Built in (the paper's rows, in its order): ``vanilla``, ``truncated_svd``, ``slr_w``,
``slr_a``, ``fairprune``, ``fairquantize``, ``fairlrf``. Each module defines the method's
plan (its recipe keys), label, what it does (:meth:`Method.apply`) and its compression
accounting. Add your own by subclassing :class:`Method` and decorating it with
:func:`register_method`, or name it in a recipe as ``package.module:Class``.
"""

from fairdeploy.methods._base import Method, Processed, count_parameters
from fairdeploy.methods._registry import get_method, list_methods, register_method

__all__ = [
    "Method",
    "Processed",
    "count_parameters",
    "get_method",
    "list_methods",
    "register_method",
]
