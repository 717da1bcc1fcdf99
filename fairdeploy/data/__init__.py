"""Datasets with a sensitive attribute, split into train / val / test.

:func:`load_splits` reads the data a recipe describes — CelebA (torchvision's
layout), Fitzpatrick-17k, an image CSV, an NPZ of arrays, or the embedded CelebA
attribute table — and returns one :class:`GroupedDataset` per split, yielding
``(x, y, group)`` with group ids in the recipe's order and −1 for unknown. Nothing is
ever downloaded.
"""

from fairdeploy.data._celeba_attributes import celeba_official_split, find_celeba_table
from fairdeploy.data._dataset import GroupedDataset, ImageGroupedDataset, TensorGroupedDataset
from fairdeploy.data._groups import UNKNOWN_GROUP, assign_groups
from fairdeploy.data._load import load_splits, load_table
from fairdeploy.data._splits import SPLITS, seeded_split
from fairdeploy.data._transforms import image_transform, preprocessing_dict

__all__ = [
    "SPLITS",
    "UNKNOWN_GROUP",
    "GroupedDataset",
    "ImageGroupedDataset",
    "TensorGroupedDataset",
    "assign_groups",
    "celeba_official_split",
    "find_celeba_table",
    "image_transform",
    "load_splits",
    "load_table",
    "preprocessing_dict",
    "seeded_split",
]
