"""Architecture registry: ``vgg11_paper``, ``mlp``, torchvision names, import strings."""

from fairdeploy.models import _zoo  # noqa: F401  (registers the built-in models)
from fairdeploy.models._registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
