"""Tiny architectures for tests, named in recipes as ``_tiny_nets:cnn``, and the small
models several test modules build the same way."""

from __future__ import annotations

import numpy as np
import torch
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


def small_conv_net() -> nn.Module:
    """Conv → ReLU → MaxPool → Flatten → Linear(27, 7) → ReLU → Linear(7, 3), seeded: the
    weight methods' reference cases (weights ``0``, ``4``, ``6``; (2, 6, 6) inputs)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 3),
    )


def trained_mlp(arrays: dict[str, np.ndarray]) -> nn.Module:
    """fairdeploy's ``mlp`` (8 → 32 → 32 → 3) fitted by 60 seeded full-batch SGD steps on
    the ``train`` rows of an npz-style dict (``x``, ``y``, ``split``), in eval mode."""
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=8, widths=(32, 32))
    train = arrays["split"] == "train"
    x, y = torch.as_tensor(arrays["x"][train]), torch.as_tensor(arrays["y"][train])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class ResidualMLP(nn.Module):
    """``out(h + fc2(relu(fc1(h))))`` with ``h = inp(x)``: a residual block whose second
    Linear (``fc2``) is cut with two values crossing (relu's output and ``h``)."""

    def __init__(self, num_classes: int = 3, in_features: int = 8, width: int = 12,
                 hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(h)


def residual_mlp(num_classes: int = 3, **kwargs: int) -> nn.Module:
    """:class:`ResidualMLP`, seeded."""
    torch.manual_seed(0)
    return ResidualMLP(num_classes, **kwargs)
