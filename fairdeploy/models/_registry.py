"""A decorator registry of architectures, plus torchvision names and import strings."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fairdeploy._registry import register_in
from fairdeploy._trust import check_import_allowed
from fairdeploy.errors import FairDeployError, first_line

__all__ = ["build_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an architecture factory ``f(num_classes=..., **kwargs) -> nn.Module``."""
    return register_in(_REGISTRY, name, "model")


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

    Raises
    ------
    FairDeployError
        An unknown or unimportable ``arch``; a factory that raises (an unknown keyword,
        a negative width, ...) or returns something other than an ``nn.Module``; a
        model larger than this machine's memory (checked on the meta device first, so
        nothing is allocated).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FairDeployError(f"num_classes={num_classes!r} is not allowed: use an integer ≥ 2")
    factory = _factory(arch)
    if torch.empty(()).device.type != "meta":
        _check_fits_in_memory(arch, factory, num_classes, kwargs)
    return _call(arch, factory, num_classes, kwargs)


def _factory(arch: str) -> Callable[..., Any]:
    if not isinstance(arch, str) or not arch:
        raise FairDeployError(f"model.arch {arch!r} is not allowed: give an architecture name")
    if arch in _REGISTRY:
        return _REGISTRY[arch]
    if ":" in arch:
        check_import_allowed(arch, "model.arch")  # before anything is imported
        return _import_factory(arch)
    import torchvision

    if arch not in torchvision.models.list_models():
        raise FairDeployError(
            f"model.arch {arch!r} is unknown: use one of {', '.join(list_models())}, a "
            "torchvision classification model name, or 'package.module:factory'"
        )

    def tv_factory(num_classes: int, **kwargs: Any) -> nn.Module:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)

    return tv_factory


def _call(
    arch: str, factory: Callable[..., Any], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except FairDeployError:
        raise
    except Exception as exc:  # TypeError (unknown kwarg), RuntimeError (negative width), ...
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())[:200] or "none"
        raise FairDeployError(
            f"model.arch {arch!r} cannot be built with num_classes={num_classes} and "
            f"model.kwargs ({shown}): {type(exc).__name__}: {first_line(exc)}; check "
            "model.kwargs and model.num_classes"
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
    if factory is not None and not callable(factory):
        raise FairDeployError(
            f"model.arch {arch!r} is a {type(factory).__name__}, not a function: give "
            "'package.module:factory' of a function that returns an nn.Module"
        )
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise FairDeployError(
            f"model.arch {arch!r}: module {module_name!r} has no function {attr!r} (it has "
            f"{', '.join(public[:8]) or 'none'}): give 'package.module:factory' of a function "
            "that returns an nn.Module"
        )
    return factory


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits_in_memory(
    arch: str, factory: Callable[..., Any], num_classes: int, kwargs: dict[str, Any]
) -> None:
    """Refuse a model larger than the machine's memory before allocating it (a huge
    ``num_classes`` or width would otherwise exhaust memory, or take minutes to fail)."""
    limit = _memory_bytes()
    if limit is None:
        return
    try:
        with torch.device("meta"):
            model = factory(num_classes=num_classes, **kwargs)
        size = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
    except Exception:
        return  # factories that compute on real tensors: built for real, errors said there
    if size > limit:
        raise FairDeployError(
            f"model.arch {arch!r} with num_classes={num_classes} and these model.kwargs needs "
            f"{size / 2**30:,.1f} GiB for its weights, more than this machine's memory "
            f"({limit / 2**30:,.1f} GiB): check model.num_classes and model.kwargs"
        )


