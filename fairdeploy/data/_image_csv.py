"""A CSV with one row per image: ``path``, ``label``, ``group``[, ``split``].

Column names are set by ``data.path_column``, ``data.target``,
``sensitive.attribute`` and ``data.split_column``. Image paths are relative to
``data.root`` (default: the CSV's folder) unless absolute. Classes: ``data.class_names``
if given (labels must be among them), else the sorted unique labels — numerically
when every label is an integer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fairdeploy.data._csv import read_csv
from fairdeploy.data._splits import parse_split_values
from fairdeploy.data._table import Table
from fairdeploy.data._transforms import preprocessing_dict
from fairdeploy.data_specs import ImageCsvData, SensitiveSpec
from fairdeploy.errors import FairDeployError

__all__ = ["class_ids", "load_image_csv_table"]


def class_ids(
    labels: list[str], class_names: list[str] | None, *, where: str
) -> tuple[np.ndarray, list[str]]:
    """Class ids of text labels, and the class names in id order."""
    if class_names is None:
        unique = set(labels)
        try:
            class_names = sorted(unique, key=lambda s: (int(s), s))
        except ValueError:
            class_names = sorted(unique)
    lookup = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        cid = lookup.get(label)
        if cid is None:
            raise FairDeployError(
                f"{where}: label {label!r} (row {i + 1}) is not in data.class_names "
                f"({', '.join(class_names)})"
            )
        out[i] = cid
    return out, list(class_names)


def load_image_csv_table(data: ImageCsvData, sensitive: SensitiveSpec) -> Table:
    """Every row of the image CSV."""
    path = data.csv
    if not path.is_file():
        raise FairDeployError(
            f"data.csv {path}: no such file: expected a CSV with columns {data.path_column}, "
            f"{data.target}, {sensitive.attribute}[, {data.split_column}] and image paths "
            f"relative to {data.root}"
        )
    columns, rows = read_csv(path, what=f"data.csv {path}")
    needed = [("data.path_column", data.path_column), ("data.target", data.target),
              ("sensitive.attribute", str(sensitive.attribute))]
    if data.split.mode == "column":
        needed.append(("data.split_column", data.split_column))
    for key, col in needed:
        if col not in columns:
            extra = (
                " (or set data.split.mode: stratified / random)" if key == "data.split_column"
                else ""
            )
            raise FairDeployError(
                f"{path}: has no column {col!r} ({key}){extra}; its columns: {', '.join(columns)}"
            )
    if not rows:
        raise FairDeployError(f"{path}: has no rows")
    where = f"data.csv {path}"
    targets, class_names = class_ids(
        [r[data.target].strip() for r in rows], data.class_names, where=where
    )
    root = Path(data.root) if data.root is not None else path.parent
    paths = [root / r[data.path_column].strip() for r in rows]
    split = None
    if data.split.mode == "column":
        split = parse_split_values([r[data.split_column] for r in rows], where=where)
    return Table(
        where=where,
        sample_ids=[r[data.path_column].strip() for r in rows],
        targets=targets,
        group_values=[r[str(sensitive.attribute)] for r in rows],
        class_names=class_names,
        preprocessing=preprocessing_dict(data.preprocessing),
        split=split,
        paths=paths,
        attribute=str(sensitive.attribute),
    )
