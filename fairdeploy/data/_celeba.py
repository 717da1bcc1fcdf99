"""CelebA from a local copy in torchvision's layout (no download, no MD5 check).

Under ``data.root`` (or ``data.root/celeba``): ``list_attr_celeba.txt`` (line 1 the
image count, line 2 the 40 attribute names, then ``000001.jpg`` and 40 values of
−1/1 per line), ``list_eval_partition.txt`` (``000001.jpg 0``; 0 train, 1 valid,
2 test) and ``img_align_celeba/000001.jpg``…. The files are parsed directly rather
than through ``torchvision.datasets.CelebA``, whose MD5 checks reject anything but
the exact published files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fairdeploy.data._table import Table
from fairdeploy.data._transforms import preprocessing_dict
from fairdeploy.data_specs import CelebAData, SensitiveSpec
from fairdeploy.errors import FairDeployError

__all__ = ["load_celeba_table", "parse_attribute_file", "parse_partition_file"]

_ATTR = "list_attr_celeba.txt"
_PARTITION = "list_eval_partition.txt"
_IMAGES = "img_align_celeba"


def _base(root: Path) -> Path:
    for base in (root / "celeba", root):
        if (base / _ATTR).is_file():
            return base
    raise FairDeployError(
        f"data.root {root}: CelebA not found: expected torchvision's layout "
        f"{root}/celeba/{_ATTR}, {root}/celeba/{_PARTITION} and "
        f"{root}/celeba/{_IMAGES}/000001.jpg ... (or the same files directly under {root}); "
        "fairdeploy never downloads data"
    )


def parse_attribute_file(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: (file names, attribute names, int8 values −1/1)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        count = int(lines[0].split()[0])
        names = lines[1].split()
        body = [ln for ln in lines[2:] if ln.strip()]
        files = [ln.split(None, 1)[0] for ln in body]
        values = np.loadtxt(
            io.StringIO("\n".join(ln.split(None, 1)[1] for ln in body)),
            dtype=np.int8, comments=None, ndmin=2,
        )
    except (IndexError, ValueError, UnicodeDecodeError, OSError) as exc:
        raise FairDeployError(
            f"{path}: not a CelebA attribute file ({exc}): expected the image count, the "
            "attribute names, then one line per image ('000001.jpg' and a −1/1 per attribute)"
        ) from None
    if values.shape != (len(files), len(names)) or count != len(files):
        raise FairDeployError(
            f"{path}: says {count} images of {len(names)} attributes but holds "
            f"{values.shape[0]} rows of {values.shape[1] if values.ndim == 2 else 0} values"
        )
    return files, names, values


def parse_partition_file(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt``: file name → 0 train, 1 valid, 2 test."""
    if not path.is_file():
        raise FairDeployError(
            f"{path}: no such file (CelebA's official partition; or set data.split.mode: "
            "random / stratified)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FairDeployError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    out: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise FairDeployError(
                f"{path}:{i}: {line.strip()!r} is not allowed (use '<file name> <0|1|2>')"
            )
        out[parts[0]] = int(parts[1])
    return out


def load_celeba_table(data: CelebAData, sensitive: SensitiveSpec) -> Table:
    """Every CelebA image with its target, sensitive value and official partition."""
    base = _base(data.root)
    attr_path = base / _ATTR
    files, names, values = parse_attribute_file(attr_path)
    index = {}
    for key, name in (("data.target", data.target), ("sensitive.attribute", sensitive.attribute)):
        if name not in names:
            raise FairDeployError(
                f"{key}: {name!r} is not a column of {attr_path} (use one of {', '.join(names)})"
            )
        index[key] = names.index(name)
    split = None
    if data.split.mode == "official":
        partition = parse_partition_file(base / _PARTITION)
        try:
            split = np.array([partition[f] for f in files], dtype=np.int8)
        except KeyError as exc:
            raise FairDeployError(
                f"{base / _PARTITION}: image {exc.args[0]} of {_ATTR} is not listed"
            ) from None
    images = base / _IMAGES
    if not images.is_dir():
        raise FairDeployError(
            f"{images}: no such folder (CelebA's aligned images, {images}/000001.jpg ...)"
        )
    target = data.target
    return Table(
        where=f"CelebA at {base}",
        sample_ids=files,
        targets=(values[:, index["data.target"]] == 1).astype(np.int64),
        group_values=values[:, index["sensitive.attribute"]].astype(np.int64),
        class_names=[f"not_{target}", target],
        preprocessing=preprocessing_dict(data.preprocessing),
        split=split,
        paths=[images / f for f in files],
        attribute=str(sensitive.attribute),
    )
