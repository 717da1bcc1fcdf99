"""``load_splits``: a recipe's data and sensitive sections → one dataset per split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fairdeploy.data._celeba import load_celeba_table
from fairdeploy.data._celeba_attributes import load_celeba_attributes_table
from fairdeploy.data._dataset import GroupedDataset, ImageGroupedDataset, TensorGroupedDataset
from fairdeploy.data._fitzpatrick import load_fitzpatrick_table
from fairdeploy.data._groups import assign_groups
from fairdeploy.data._image_csv import load_image_csv_table
from fairdeploy.data._images import check_image_files
from fairdeploy.data._npz import load_npz_table
from fairdeploy.data._splits import SPLITS, check_groups_present, seeded_split, subsample
from fairdeploy.data._table import Table
from fairdeploy.data._transforms import image_transform
from fairdeploy.data_specs import DataSpec, SensitiveSpec
from fairdeploy.errors import FairDeployError

__all__ = ["load_splits", "load_table"]


@runtime_checkable
class RecipeSections(Protocol):
    """What :func:`load_splits` reads of a whole :class:`~fairdeploy.recipe.Recipe`: its
    ``data`` and ``sensitive`` sections and ``model.num_classes`` (the data package sits
    below the recipe package, so it names the sections, not the class)."""

    data: Any
    sensitive: Any
    model: Any


_LOADERS: dict[str, Callable[..., Table]] = {
    "celeba": load_celeba_table,
    "fitzpatrick17k": load_fitzpatrick_table,
    "image_csv": load_image_csv_table,
    "npz": load_npz_table,
    "celeba_attributes": load_celeba_attributes_table,
}


def load_table(data: DataSpec, sensitive: SensitiveSpec) -> Table:
    """Every sample of the dataset with its split id (before checks and ``max_samples``)."""
    table = _LOADERS[data.kind](data, sensitive)
    if table.split is None:
        if data.split.mode not in ("random", "stratified"):
            raise RuntimeError(f"loader for {data.kind} left split mode {data.split.mode} unset")
        table.split = seeded_split(len(table.targets), data.split, labels=table.targets)
    return table


def load_splits(
    data: DataSpec | RecipeSections,
    sensitive: SensitiveSpec | None = None,
    *,
    splits: Sequence[str] = SPLITS,
    augment: bool = False,
    num_classes: int | None = None,
) -> dict[str, GroupedDataset]:
    """Load the requested splits of a recipe's dataset.

    Parameters
    ----------
    data : DataSpec or Recipe
        ``recipe.data`` (then pass ``sensitive``), or the whole recipe.
    sensitive : SensitiveSpec, optional
        ``recipe.sensitive`` (taken from the recipe when ``data`` is one).
    splits : sequence of str
        Any of ``train``, ``val``, ``test``. Images of other splits are not checked.
    augment : bool
        Random flip and colour jitter on the ``train`` split's images (``fairdeploy
        train``); evaluation splits never augment. Ignored for tensor data.
    num_classes : int, optional
        When given (``recipe.model.num_classes``; taken from the recipe when ``data`` is
        one), the dataset's class count must equal it.

    Returns
    -------
    dict
        Split name → :class:`GroupedDataset` yielding ``(x, y, group)``.

    Raises
    ------
    FairDeployError
        Missing files (the message says what is expected where), bad columns or
        values, too many unreadable images (``data.max_bad_images``), a class count
        other than ``num_classes``, or a split without any sample of a group.

    Notes
    -----
    Images are checked when a split is loaded (``data.check_images``: header by
    default), not while iterating: unusable files are dropped and counted in
    ``dataset.skipped``, so ``targets``/``groups`` always describe exactly the items
    served. Seeded splits are made over every row before missing images are dropped,
    so the split of a sample does not depend on which other files exist.
    """
    if isinstance(data, RecipeSections):
        recipe = data
        data, sensitive = recipe.data, recipe.sensitive
        num_classes = recipe.model.num_classes if num_classes is None else num_classes
    if sensitive is None:
        raise TypeError("load_splits needs the sensitive section (or pass the whole recipe)")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise FairDeployError(f"split {bad[0]!r} is not allowed (use {', '.join(SPLITS)})")
    groups_spec = sensitive.groups or {}
    table = load_table(data, sensitive)
    if num_classes is not None and len(table.class_names) != num_classes:
        raise FairDeployError(
            f"model.num_classes is {num_classes} but {table.where} has {len(table.class_names)} "
            f"classes ({_preview(table.class_names)}): set model.num_classes: "
            f"{len(table.class_names)}"
        )
    groups = assign_groups(table.group_values, groups_spec)
    group_names = list(groups_spec)
    out: dict[str, GroupedDataset] = {}
    for split in splits:
        idx, skipped = _split_rows(table, data, split)
        check_groups_present(
            groups[idx], group_names, split=split, attribute=table.attribute, values=groups_spec
        )
        common = dict(
            split=split,
            targets=table.targets[idx],
            groups=groups[idx],
            class_names=table.class_names,
            group_names=group_names,
            preprocessing=table.preprocessing,
            sample_ids=[table.sample_ids[i] for i in idx],
            skipped=skipped,
        )
        if table.paths is not None:
            transform = image_transform(
                data.preprocessing, augment=augment and split == "train"
            )
            out[split] = ImageGroupedDataset([table.paths[i] for i in idx], transform, **common)
        else:
            features = table.features
            if features is None:
                raise RuntimeError("table has neither paths nor features")
            out[split] = TensorGroupedDataset(features[idx], **common)
    return out


def _split_rows(table: Table, data: DataSpec, split: str) -> tuple[np.ndarray, dict[str, int]]:
    """The table rows one split serves: its rows whose images pass the check (each
    unusable file counted by reason), then at most ``data.max_samples`` of them, seeded."""
    idx = np.flatnonzero(table.split == SPLITS.index(split))
    if len(idx) == 0:
        raise FairDeployError(
            f"split {split!r} of {table.where} is empty: check data.split"
        )
    skipped: dict[str, int] = {}
    if table.paths is not None:
        keep, skipped = check_image_files(
            [table.paths[i] for i in idx],
            mode=data.check_images,
            max_bad=data.max_bad_images,
            where=f"{table.where}, split {split!r}",
            missing_counts_as_bad=table.missing_counts_as_bad,
        )
        idx = idx[keep]
    idx = idx[subsample(len(idx), data.max_samples, seed=data.split.seed, split=split)]
    return idx, skipped


def _preview(names: Sequence[str]) -> str:
    shown = ", ".join(map(str, names[:5]))
    return shown + (", ..." if len(names) > 5 else "")
