"""Datasets that yield ``(x, y, group)``: images read lazily, or tensors in memory."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fairdeploy.data._images import open_image
from fairdeploy.errors import FairDeployError

__all__ = ["GroupedDataset", "ImageGroupedDataset", "TensorGroupedDataset"]


class GroupedDataset(Dataset):
    """One split of a dataset with a sensitive attribute.

    Items are ``(x, y, group)``: ``x`` a float tensor, ``y`` the class id (int),
    ``group`` the group id (0..G−1 in the recipe's order of ``sensitive.groups``, −1
    when unknown). Arrays describe every item without loading it.

    Attributes
    ----------
    split : str
        ``train``, ``val`` or ``test``.
    targets : numpy.ndarray
        int64 class ids, one per item.
    groups : numpy.ndarray
        int64 group ids, one per item (−1 unknown).
    class_names : tuple of str
        Name of each class id.
    group_names : tuple of str
        Name of each group id.
    preprocessing : dict
        How inputs are made from raw data (for ONNX metadata and serving).
    sample_ids : tuple of str
        A stable identifier per item (file name, row number).
    skipped : dict
        Samples of this split dropped while loading, by reason (``missing_image``,
        ``bad_image``), counted over the split before ``max_samples``.
    """

    def __init__(
        self,
        *,
        split: str,
        targets: np.ndarray,
        groups: np.ndarray,
        class_names: Sequence[str],
        group_names: Sequence[str],
        preprocessing: dict[str, Any],
        sample_ids: Sequence[str],
        skipped: dict[str, int] | None = None,
    ) -> None:
        self.split = split
        self.targets = np.asarray(targets, dtype=np.int64)
        self.groups = np.asarray(groups, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.group_names = tuple(group_names)
        self.preprocessing = dict(preprocessing)
        self.sample_ids = tuple(sample_ids)
        self.skipped = dict(skipped or {})
        if not (len(self.targets) == len(self.groups) == len(self.sample_ids)):
            raise ValueError("targets, groups and sample_ids differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def group_counts(self) -> dict[str, int]:
        """Items per group name, plus ``unknown`` for group −1."""
        counts = {name: int((self.groups == g).sum()) for g, name in enumerate(self.group_names)}
        counts["unknown"] = int((self.groups < 0).sum())
        return counts

    def _take(self, index: np.ndarray) -> dict[str, Any]:
        # Keyword arguments of a subset of this dataset (used by max_samples).
        return dict(
            split=self.split,
            targets=self.targets[index],
            groups=self.groups[index],
            class_names=self.class_names,
            group_names=self.group_names,
            preprocessing=self.preprocessing,
            sample_ids=[self.sample_ids[i] for i in index],
            skipped=self.skipped,
        )

    def subset(self, index: Sequence[int] | np.ndarray) -> GroupedDataset:
        """A new dataset of the items at ``index`` (in that order)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.group_counts().items())
        return (
            f"{type(self).__name__}(split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, groups: {counts})"
        )


class TensorGroupedDataset(GroupedDataset):
    """Items from an in-memory float tensor ``features`` (tabular data, NPZ features).

    ``features`` holds every item's input (N × ...), so callers may skip the
    DataLoader and slice it directly.
    """

    def __init__(self, features: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = features
        if len(features) != len(self.targets):
            raise ValueError("features and targets differ in length")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.features[i], int(self.targets[i]), int(self.groups[i])

    def subset(self, index: Sequence[int] | np.ndarray) -> TensorGroupedDataset:
        index = np.asarray(index, dtype=np.int64)
        return TensorGroupedDataset(self.features[torch.from_numpy(index)], **self._take(index))


class ImageGroupedDataset(GroupedDataset):
    """Items from image files, decoded and transformed on access.

    Files were checked when the split was loaded (see ``data.check_images``); a file
    that still fails to decode here raises :class:`FairDeployError` naming it.
    """

    def __init__(
        self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.paths = tuple(Path(p) for p in paths)
        self.transform = transform
        if len(self.paths) != len(self.targets):
            raise ValueError("paths and targets differ in length")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path = self.paths[i]
        try:
            with open_image(path) as im, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise FairDeployError(
                f"image {path} cannot be decoded ({exc}); it passed the check at load time: "
                "set data.check_images: full to decode every image up front and skip bad ones"
            ) from None
        return self.transform(image), int(self.targets[i]), int(self.groups[i])

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageGroupedDataset:
        index = np.asarray(index, dtype=np.int64)
        return ImageGroupedDataset(
            [self.paths[i] for i in index], self.transform, **self._take(index)
        )

    def with_transform(
        self, transform: Callable[[Image.Image], torch.Tensor]
    ) -> ImageGroupedDataset:
        """The same items with another transform (e.g. training augmentation on/off)."""
        return ImageGroupedDataset(
            self.paths, transform, **self._take(np.arange(len(self), dtype=np.int64))
        )
