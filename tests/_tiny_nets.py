"""Tiny architectures for tests, named in recipes as ``_tiny_nets:cnn``, and the small
models several test modules build the same way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def three_class_arrays(n: int = 900, d: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Tabular data with three learnable classes; group 1's labels are noisier, so the groups
    differ. Split train/val/test as 1/2, 1/4, 1/4 (the arrays an NPZ recipe reads)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = x @ rng.normal(size=(d, 3)) + rng.normal(scale=0.3 + 0.9 * group[:, None], size=(n, 3))
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    return {"x": x, "y": y.argmax(1).astype(np.int64), "group": group, "split": split}


def write_three_class_task(folder: Path, recipe: Callable[[Path], dict]) -> Path:
    """``folder`` with ``data.npz`` (:func:`three_class_arrays`), ``ckpt.pt`` (the
    :func:`trained_mlp` on it) and ``r.yaml`` (``recipe(data path)``)."""
    import yaml

    arrays = three_class_arrays()
    np.savez(folder / "data.npz", **arrays)
    torch.save(trained_mlp(arrays).state_dict(), folder / "ckpt.pt")
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe(folder / "data.npz")))
    return folder


def rows_and_vanilla(model: nn.Module) -> tuple[nn.Module, list[dict]]:
    """The vanilla counterpart of ``model`` (each FactorizedLinear a Linear of the same shape)
    and the layer rows ``compression.layer_table`` would give for it."""
    import copy

    from fairdeploy.lrf import FactorizedLinear

    vanilla = copy.deepcopy(model)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            vanilla.set_submodule(name, nn.Linear(m.in_features, m.out_features,
                                                  bias=m.bias is not None))
            rows.append({"name": name, "din": m.in_features, "dout": m.out_features,
                         "k": m.rank, "rows_sparsified": m.sparse_rows.numel(),
                         "cols_sparsified": m.sparse_cols.numel(), "keep": m.keep})
    return vanilla, rows


def three_class_recipe(data: Path, **sections: Any) -> dict:
    """The recipe (as a dict) of :func:`trained_mlp` on :func:`three_class_arrays` saved at
    ``data``: the ``mlp`` architecture, groups ``a``/``b``, FairLRF on ``layers.2`` (rank 8,
    sr 0.25, 64 scoring samples per group); ``sections`` replace whole sections."""
    recipe = {
        "model": {"arch": "mlp", "num_classes": 3,
                  "kwargs": {"in_features": 8, "widths": [32, 32]}},
        "data": {"kind": "npz", "path": str(data), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}],
                   "scoring": {"samples_per_group": 64}},
    }
    recipe.update(sections)
    return recipe
