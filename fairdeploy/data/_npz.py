"""An ``.npz`` of arrays: features, labels, groups[, split] — tabular data or
features extracted beforehand.

Keys are set by ``data.x_key`` (float features, N × ...), ``data.target`` (integer
class ids 0..C−1), ``sensitive.attribute`` (raw group values) and ``data.split_key``
(``train``/``val``/``test`` strings or 0/1/2). Class names: ``data.class_names``, else
a ``class_names`` array in the file, else ``"0"``…``"C−1"``. Loaded with
``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fairdeploy.data._splits import parse_split_values
from fairdeploy.data._table import Table
from fairdeploy.data_specs import NpzData, SensitiveSpec
from fairdeploy.errors import FairDeployError, first_line

__all__ = ["load_npz_table"]

# Class ids index a list of class names: a larger id is a mistake (or a hash), not a class.
_MAX_CLASS_ID = 1_000_000


def load_npz_table(data: NpzData, sensitive: SensitiveSpec) -> Table:
    """Every row of the NPZ file."""
    path = data.path
    attr = str(sensitive.attribute)
    keys_wanted = [data.x_key, data.target, attr]
    if data.split.mode == "column":
        keys_wanted.append(data.split_key)
    npz = _open_npz(path, keys_wanted)
    arrays, file_names, file_features = _read_members(npz, path, keys_wanted, data.split_key)
    x, y, g = arrays[data.x_key], arrays[data.target], arrays[attr]
    n = _check_shapes(arrays, data.x_key, path)
    x32 = _finite_float32(x, data.x_key, path)
    y = _class_ids(y, data.target, path)
    class_names = _class_names(data, file_names, y, path)
    split = None
    if data.split.mode == "column":
        split = parse_split_values(arrays[data.split_key].tolist(), where=f"{path}")
    features = torch.from_numpy(np.ascontiguousarray(x32))
    preprocessing = {"kind": "tensor", "input_shape": list(x.shape[1:]), "dtype": "float32"}
    names = _feature_names(data, file_features, x, path)
    if names is not None:
        preprocessing["features"] = names
    return Table(
        where=f"data.path {path}",
        sample_ids=[str(i) for i in range(n)],
        targets=y,
        group_values=g.tolist(),
        class_names=class_names,
        preprocessing=preprocessing,
        split=split,
        features=features,
        attribute=attr,
    )


def _unreadable(path: object, exc: BaseException) -> FairDeployError:
    return FairDeployError(
        f"data.path {path}: cannot be read as an .npz without pickles "
        f"({type(exc).__name__}: {first_line(exc)}): save plain numeric/string arrays "
        "with np.savez"
    )


def _open_npz(path: Path, keys_wanted: list[str]) -> np.lib.npyio.NpzFile:
    """The archive at ``path``, opened without pickles; refused when it is missing,
    empty, unreadable or a single ``.npy`` array."""
    if not path.is_file():
        raise FairDeployError(
            f"data.path {path}: no such file: expected an .npz with arrays "
            f"{', '.join(keys_wanted)} (np.savez)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except EOFError:
        raise FairDeployError(
            f"data.path {path}: the file is empty or cut short: save the arrays with np.savez"
        ) from None
    except Exception as exc:  # numpy's parsers raise ValueError, TokenError, MemoryError...
        raise _unreadable(path, exc) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise FairDeployError(
            f"data.path {path} holds a single .npy array, not an .npz archive of named arrays: "
            f"save them with np.savez(path, {', '.join(f'{k}=...' for k in keys_wanted)})"
        )
    return loaded


def _read_members(
    loaded: np.lib.npyio.NpzFile, path: Path, keys_wanted: list[str], split_key: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    """The wanted arrays by key, and the file's ``class_names`` and ``feature_names``
    arrays (None where absent); closes the archive."""
    try:
        with loaded as npz:
            keys = list(npz.keys())
            for key in keys_wanted:
                if key not in keys:
                    hint = (
                        " (or set data.split.mode: stratified / random)"
                        if key == split_key else ""
                    )
                    raise FairDeployError(
                        f"{path}: has no array {key!r}{hint}; its arrays: {', '.join(keys)}"
                    )
            arrays = {k: npz[k] for k in keys_wanted}
            file_names = npz["class_names"] if "class_names" in keys else None
            file_features = npz["feature_names"] if "feature_names" in keys else None
    except FairDeployError:
        raise
    except Exception as exc:
        # A damaged member: zipfile checks each one's CRC-32 as it is read; numpy's header
        # parser raises ValueError, SyntaxError or tokenize's TokenError on damaged headers,
        # MemoryError on a header that claims a huge shape.
        raise _unreadable(path, exc) from None
    return arrays, file_names, file_features


def _check_shapes(arrays: dict[str, np.ndarray], x_key: str, path: Path) -> int:
    """The number of rows: features are (samples, features ...), every other array one
    value per row."""
    x = arrays[x_key]
    n = len(x) if x.ndim else 0
    if x.ndim < 2:
        raise FairDeployError(
            f"{path}: array {x_key!r} has shape {x.shape}: give one row of features per "
            f"sample, shape (samples, features) (x[:, None] for a single feature)"
        )
    if n == 0:
        raise FairDeployError(f"{path}: array {x_key!r} has no rows: the data set is empty")
    if x.size == 0:
        raise FairDeployError(f"{path}: array {x_key!r} has shape {x.shape}: no features")
    for key, arr in arrays.items():
        if key != x_key and arr.ndim != 1:
            raise FairDeployError(
                f"{path}: array {key!r} has shape {arr.shape}, expected one value per row "
                f"({n},)"
            )
        if len(arr) != n:
            raise FairDeployError(
                f"{path}: array {key!r} has shape {arr.shape}, expected {n} rows like "
                f"{x_key!r}"
            )
    return n


def _finite_float32(x: np.ndarray, x_key: str, path: Path) -> np.ndarray:
    """The features as float32, refused if not real numbers or not finite in float32."""
    if not np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_ or np.iscomplexobj(x):
        raise FairDeployError(f"{path}: array {x_key!r} is {x.dtype}, expected real numbers")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        x32 = np.asarray(x, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(x32).reshape(len(x), -1).all(axis=1))
    if len(bad_rows):
        overflow = bool(np.isfinite(x).all())
        raise FairDeployError(
            f"{path}: array {x_key!r} has non-finite values (NaN or infinity"
            f"{', or too large for float32' if overflow else ''}) in {len(bad_rows)} row"
            f"{'s' if len(bad_rows) > 1 else ''} (first: row {int(bad_rows[0])}): drop or "
            "impute them; the model and every score computed from it would be meaningless"
        )
    return x32


def _class_ids(y: np.ndarray, target: str, path: Path) -> np.ndarray:
    """The labels as int64 class ids, refused unless whole numbers of a sane size."""
    if not (np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
    )):
        raise FairDeployError(
            f"{path}: array {target!r} ({y.dtype}, shape {y.shape}) is not allowed (use one "
            "integer class id 0..C−1 per row)"
        )
    if np.abs(y).max() > _MAX_CLASS_ID:
        raise FairDeployError(
            f"{path}: array {target!r} has class id {y.flat[np.abs(y).argmax()]!r}: use "
            "class ids 0..C−1 (and data.class_names for their names)"
        )
    return y.astype(np.int64)


def _class_names(
    data: NpzData, file_names: np.ndarray | None, y: np.ndarray, path: Path
) -> list[str]:
    """``data.class_names``, else the file's ``class_names``, else ``"0"``…``"C−1"``;
    every class id must index them."""
    if data.class_names is not None:
        class_names = list(data.class_names)
    elif file_names is not None:
        class_names = [str(c) for c in file_names.tolist()]
    else:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    if y.min() < 0 or y.max() >= len(class_names):
        raise FairDeployError(
            f"{path}: array {data.target!r} has class ids {int(y.min())}..{int(y.max())}, "
            f"not allowed with {len(class_names)} class names (use ids 0..{len(class_names) - 1})"
        )
    return class_names


def _feature_names(
    data: NpzData, in_file: np.ndarray | None, x: np.ndarray, path: object
) -> list[str] | None:
    """The names of x's columns: ``data.feature_names``, else the file's ``feature_names``
    array; checked to be one distinct name per column of 2-D features."""
    if data.feature_names is not None:
        names, where = [str(n) for n in data.feature_names], "data.feature_names"
    elif in_file is not None:
        names, where = [str(n) for n in np.asarray(in_file).reshape(-1).tolist()], (
            f"{path}: array 'feature_names'"
        )
    else:
        return None
    if x.ndim != 2 or len(names) != x.shape[1]:
        raise FairDeployError(
            f"{where} has {len(names)} names but {data.x_key!r} has shape {x.shape}: give one "
            "name per feature column (2-D features)"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FairDeployError(f"{where}: the names {dup[:3]} repeat; give distinct names")
    return names
