"""What ``verify``, ``predict`` and ``bench`` need from checkpoints and exported models.

The reference outputs and privileged group come from a checkpoint
(:func:`reference_from_checkpoint`); notes compare a checkpoint with an export's metadata
(:func:`reference_notes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fairdeploy.data import load_splits
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import first_samples
from fairdeploy.methods import get_method
from fairdeploy.progress import phase
from fairdeploy.recipe import load_recipe

__all__ = [
    "method_names",
    "privileged_id_of",
    "reference_from_checkpoint",
    "reference_notes",
]


def reference_from_checkpoint(
    onnx_path: str | Path,
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    split: str = "test",
    samples: int | None = None,
    trust_checkpoint: bool = False,
    progress: bool = False,
) -> tuple[Any, int | None]:
    """A verify reference from a checkpoint and a recipe: the PyTorch model's outputs on
    the first ``samples`` inputs of a data split, with their labels and groups.

    ``checkpoint`` may be a vanilla checkpoint or ``optimize``'s ``model.pt`` (its
    factorized layers are rebuilt from the stored factors). Returns the reference and
    the privileged group id named in the ONNX model's metadata (None if absent). Use
    :func:`reference_notes` for what the user must know to read the comparison.
    """
    from fairdeploy.checkpoint import load_checkpoint
    from fairdeploy.verification import reference_from_model

    recipe = load_recipe(recipe_path)
    model = load_checkpoint(
        checkpoint,
        arch=recipe.model.arch,
        num_classes=recipe.model.num_classes,
        model_kwargs=recipe.model.kwargs,
        trust_checkpoint=trust_checkpoint,
    )
    ds = load_splits(recipe, splits=(split,))[split]
    n = min(samples or recipe.export.verify_samples, len(ds))
    if n == 0:
        raise FairDeployError(f"--split {split}: the split is empty; choose another split")
    with phase(f"reference: PyTorch on {n:,} {split} samples", unit="", enabled=progress):
        x, labels, groups = first_samples(ds, n)
        ref = reference_from_model(model, x.numpy(), labels=labels, groups=groups)
    return ref, privileged_id_of(onnx_path)


def reference_notes(onnx_path: str | Path, checkpoint: str | Path) -> list[str]:
    """What to know before reading a comparison with a checkpoint: a vanilla checkpoint
    against a processed model is expected to differ."""
    from fairdeploy.checkpoint import checkpoint_metadata
    from fairdeploy.export import read_metadata

    method = read_metadata(onnx_path).get("method")
    try:
        ckpt_plan = checkpoint_metadata(checkpoint).get("plan")
    except FairDeployError:
        return []
    ckpt_method = ckpt_plan.get("method") if isinstance(ckpt_plan, dict) else None
    if method and method != "vanilla" and ckpt_method in (None, "vanilla"):
        return [
            f"the model's metadata records method {method!r}, and {str(checkpoint)!r} is a "
            "vanilla checkpoint: the two models differ, so a mismatch is expected. To check "
            "the export, compare with the run folder's model.pt (--checkpoint "
            "<run>/model.pt --recipe <run>/recipe.yaml) or its model.verify.npz (the default)"
        ]
    return []


def privileged_id_of(onnx_path: str | Path) -> int | None:
    """The privileged group's id named in an exported model's metadata (None if absent)."""
    from fairdeploy.export import read_metadata

    meta = read_metadata(onnx_path)
    names = meta.get("group_names") or []
    priv = meta.get("privileged")
    return names.index(priv) if priv in names else None


def method_names() -> list[str]:
    """The registered methods (for help texts)."""
    from fairdeploy.methods import list_methods

    return [f"{n} ({get_method(n).label})" for n in list_methods()]
