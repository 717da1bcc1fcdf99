"""A decorator registry of architectures, plus torchvision names and import strings."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from fairdeploy.errors import FairDeployError

__all__ = ["build_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an architecture factory ``f(num_classes=..., **kwargs) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names of the registered architectures (torchvision names work too)."""
    return sorted(_REGISTRY)


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an untrained model by name.

    Parameters
    ----------
    arch : str
        A registered name (``vgg11_paper``, ``mlp``), a torchvision classification
        model name (``resnet18``), or ``package.module:factory``.
    num_classes : int
        Number of output classes.
    **kwargs
        Passed to the factory (e.g. ``widths`` for ``mlp``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FairDeployError(f"num_classes={num_classes!r} is not allowed: use an integer ≥ 2")
    if arch in _REGISTRY:
        return _REGISTRY[arch](num_classes=num_classes, **kwargs)
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise FairDeployError(
                f"model.arch {arch!r} cannot be imported ({exc}): give 'package.module:factory' "
                "of a function that returns an nn.Module"
            ) from None
        model = factory(num_classes=num_classes, **kwargs)
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(
                arch, weights=None, num_classes=num_classes, **kwargs
            )
        except ValueError:
            raise FairDeployError(
                f"model.arch {arch!r} is unknown: use one of {', '.join(list_models())}, a "
                "torchvision classification model name, or 'package.module:factory'"
            ) from None
    if not isinstance(model, nn.Module):
        raise FairDeployError(
            f"model.arch {arch!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


from fairdeploy.models import _zoo  # noqa: E402, F401  (registers the built-in models)
