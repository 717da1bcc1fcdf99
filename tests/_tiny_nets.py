"""Tiny architectures for tests, named in recipes as ``_tiny_nets:cnn``."""

from __future__ import annotations

from torch import nn


def cnn(num_classes: int = 3, width: int = 16) -> nn.Module:
    """Conv → ReLU → MaxPool → Flatten → Linear → ReLU → Linear → ReLU → Linear, for
    (2, 6, 6) inputs: a trunk with a convolution, a head of Linear layers."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 3 * 3, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )
