"""Fitzpatrick-17k from a local CSV and images named ``<md5hash>.jpg``.

The CSV is the public release's ``fitzpatrick17k.csv`` (``md5hash``,
``fitzpatrick_scale`` — ``fitzpatrick`` in older copies — ``label``, ...). Classes are
the sorted unique values of ``label`` (114 in the release), computed over every row
so class ids do not depend on which images were fetched. Skin types are mapped to
groups by ``sensitive.groups`` (default light 1–3, dark 4–6; −1 stays unknown).
The seeded split is made over all rows, then rows whose image is missing are
counted and skipped.
"""

from __future__ import annotations

import numpy as np

from fairdeploy.data._csv import read_csv
from fairdeploy.data._table import Table
from fairdeploy.data._transforms import preprocessing_dict
from fairdeploy.data_specs import Fitzpatrick17kData, SensitiveSpec
from fairdeploy.errors import FairDeployError

__all__ = ["load_fitzpatrick_table"]


def load_fitzpatrick_table(data: Fitzpatrick17kData, sensitive: SensitiveSpec) -> Table:
    """Every Fitzpatrick-17k row with its class id, skin type and image path."""
    path = data.csv
    if not path.is_file():
        raise FairDeployError(
            f"data.csv {path}: no such file: expected the Fitzpatrick-17k CSV "
            "(fitzpatrick17k.csv with md5hash, fitzpatrick_scale, label, url, ...) and the images "
            f"as {data.images}/<md5hash>.jpg; fairdeploy never downloads data"
        )
    if not data.images.is_dir():
        raise FairDeployError(
            f"data.images {data.images}: no such folder: store the images fetched from the CSV's "
            "url column there as <md5hash>.jpg"
        )
    columns, rows = read_csv(path, what=f"data.csv {path}")
    attribute = str(sensitive.attribute)
    if attribute not in columns and attribute == "fitzpatrick_scale" and "fitzpatrick" in columns:
        attribute = "fitzpatrick"  # older copies of the CSV
    for key, col in (("md5hash", "md5hash"), ("data.target", data.target),
                     ("sensitive.attribute", attribute)):
        if col not in columns:
            raise FairDeployError(
                f"{path}: has no column {col!r} ({key}); its columns: {', '.join(columns)}"
            )
    labels = [r[data.target].strip() for r in rows]
    class_names = sorted(set(labels))
    class_id = {name: i for i, name in enumerate(class_names)}
    ids = [r["md5hash"].strip() for r in rows]
    return Table(
        where=f"Fitzpatrick-17k ({path})",
        sample_ids=ids,
        targets=np.array([class_id[x] for x in labels], dtype=np.int64),
        group_values=[r[attribute] for r in rows],
        class_names=class_names,
        preprocessing=preprocessing_dict(data.preprocessing),
        paths=[data.images / f"{h}.jpg" for h in ids],
        missing_counts_as_bad=False,
        attribute=attribute,
    )
