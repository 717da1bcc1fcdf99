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
        model = _import_factory(arch)(num_classes=num_classes, **kwargs)
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


def _import_factory(arch: str) -> Callable[..., nn.Module]:
    """The factory named by ``package.module:factory``, or one line saying what failed."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise FairDeployError(
            f"model.arch {arch!r} is not allowed: write 'package.module:factory' (a module "
            "and, after the colon, a function that returns an nn.Module)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise FairDeployError(
                f"model.arch {arch!r}: the module {module_name!r} is not importable: it must be "
                "an installed package or a module on the Python path — run with its folder on "
                "PYTHONPATH (PYTHONPATH=/path/to/folder fairdeploy ...) or pip install it; the "
                "fairdeploy command does not search the current folder"
            ) from None
        raise FairDeployError(
            f"model.arch {arch!r}: importing {module_name!r} failed because it imports "
            f"{missing!r}, which is not installed: install it"
        ) from None
    except ImportError as exc:
        raise FairDeployError(
            f"model.arch {arch!r}: importing {module_name!r} failed ({exc})"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise FairDeployError(
            f"model.arch {arch!r}: module {module_name!r} has no function {attr!r} (it has "
            f"{', '.join(public[:8]) or 'none'}): give 'package.module:factory' of a function "
            "that returns an nn.Module"
        )
    return factory


from fairdeploy.models import _zoo  # noqa: E402, F401  (registers the built-in models)
