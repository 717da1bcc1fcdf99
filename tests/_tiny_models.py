"""Architectures named in test recipes as ``_tiny_models:<factory>`` (tests/ is on the path)."""

from __future__ import annotations

from torch import nn


def pooled_cnn(num_classes: int = 2) -> nn.Module:
    """A CNN with torchvision-style adaptive pooling to 7×7: exportable to ONNX only when
    the last feature map's size is a multiple of 7 (a 20×20 input gives 18×18: it fails)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 16),
        nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def tanh_mlp(num_classes: int = 2, in_features: int = 8) -> nn.Module:
    """An MLP whose hidden layer is followed by Tanh (not piecewise linear)."""
    return nn.Sequential(
        nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, num_classes),
    )
