"""Serve an exported model with ONNX Runtime using only its own metadata.

The metadata written by export (``fairdeploy.preprocessing``, ``fairdeploy.class_names``)
is enough to turn image files or feature rows into predictions: no recipe, no torch.
Image preprocessing reproduces the evaluation transform (PIL bilinear resize to
size×size, center crop, scale to [0, 1], normalize with mean/std, NCHW).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy._text import plural
from fairdeploy.errors import FairDeployError

__all__ = [
    "Inputs",
    "Predictions",
    "expand_inputs",
    "load_inputs",
    "model_metadata",
    "predict",
    "predict_files",
    "preprocess_image",
    "read_inputs",
]

_PREFIX = "fairdeploy."
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def model_metadata(session: Any) -> dict[str, Any]:
    """The ``fairdeploy.*`` metadata of an ORT session's model, JSON-decoded."""
    out: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        if key.startswith(_PREFIX):
            try:
                out[key[len(_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(_PREFIX) :]] = value
    return out


def preprocess_image(path: str | os.PathLike[str], pre: dict[str, Any]) -> np.ndarray:
    """One image file as the model's (3, crop, crop) float32 input."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = pre["resize"][1], pre["resize"][0]
            im = im.resize((w, h), Image.BILINEAR)
            ch, cw = pre["crop"]
            top = round((h - ch) / 2.0)
            left = round((w - cw) / 2.0)
            im = im.crop((left, top, left + cw, top + ch))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise FairDeployError(f"cannot read image {str(path)!r}: {exc}") from None
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _is_number_row(row: Sequence[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def _feature_rows(path: Path, width: int | None, names: Sequence[str] | None) -> np.ndarray:
    """Rows of features from .npy or .csv. A CSV header is matched by name against the
    model's feature names (columns reordered to the model's order), never just dropped."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FairDeployError(f"cannot read {str(path)!r} as a .npy array: {exc}") from None
    else:
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r]
            if rows and not _is_number_row(rows[0]):
                header, rows = [c.strip() for c in rows[0]], rows[1:]
                if names is None:
                    raise FairDeployError(
                        f"{str(path)!r} has a header row but the model's metadata names no "
                        "features to match it against: remove the header, or name the "
                        "features when training (a feature_names array in the .npz, or "
                        "data.feature_names in the recipe) and optimize again"
                    )
                missing = [n for n in names if n not in header]
                if missing:
                    raise FairDeployError(
                        f"{str(path)!r}: the header lacks the model's feature(s) "
                        f"{missing[:5]}; the model expects {len(names)} columns named "
                        f"{list(names)[:5]}..."
                    )
                order = [header.index(n) for n in names]
                rows = [[r[i] for i in order] for r in rows]
            arr = np.asarray([[float(v) for v in r] for r in rows], dtype=np.float32)
        except (OSError, ValueError, IndexError) as exc:
            raise FairDeployError(
                f"cannot read {str(path)!r} as CSV feature rows (numbers, one row per input): {exc}"
            ) from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        raise FairDeployError(
            f"{str(path)!r} holds an array of shape {arr.shape}; the model expects rows of "
            f"{width} features"
        )
    return arr


@dataclass(frozen=True)
class Inputs:
    """Model inputs read from files: one name per row, the rows, and what was skipped."""

    names: list[str]
    x: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files to read: each path as given, a folder replaced by the image, .npy and .csv
    files directly inside it (sorted by name; other files in it are ignored)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(
                f for f in p.iterdir()
                if f.is_file() and f.suffix.lower() in (*_IMAGE_SUFFIXES, ".npy", ".csv")
            )
            if not inside:
                raise FairDeployError(
                    f"folder {str(p)!r} holds no image, .npy or .csv files: give the files "
                    f"({', '.join(sorted(_IMAGE_SUFFIXES))}, .npy, .csv) or their folder"
                )
            out += inside
        elif not p.exists():
            raise FairDeployError(f"input {str(p)!r} does not exist")
        else:
            out.append(p)
    return out


def _read_one(p: Path, metadata: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    pre = metadata.get("preprocessing") or {}
    kind = pre.get("kind")
    if p.suffix.lower() in _IMAGE_SUFFIXES:
        if kind != "image":
            raise FairDeployError(
                f"{str(p)!r} is an image but the model takes {kind or 'unknown'} inputs: "
                "give .npy or .csv feature rows"
            )
        return [str(p)], preprocess_image(p, pre)[None]
    if p.suffix.lower() in (".npy", ".csv"):
        shape = pre.get("input_shape")
        width = int(shape[0]) if shape and len(shape) == 1 else None
        rows = _feature_rows(p, width, pre.get("features"))
        names = [f"{p}[{i}]" for i in range(len(rows))] if len(rows) > 1 else [str(p)]
        return names, rows
    raise FairDeployError(
        f"input {str(p)!r}: unsupported file type; give images "
        f"({', '.join(sorted(_IMAGE_SUFFIXES))}) or .npy/.csv feature rows"
    )


def read_inputs(
    paths: Sequence[str | os.PathLike[str]], metadata: dict[str, Any], *, strict: bool = True
) -> Inputs:
    """Model inputs from image files, folders of them, or .npy/.csv feature rows.

    With ``strict=False`` an input that cannot be read (a corrupt image, a malformed CSV)
    is skipped and listed in ``skipped`` with the reason, instead of stopping the batch;
    inputs of the wrong kind for the model (an image for a tabular model) and missing
    paths are errors either way. At least one input must be readable.
    """
    names: list[str] = []
    batches: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    kind = (metadata.get("preprocessing") or {}).get("kind")
    for p in expand_inputs(paths):
        try:
            n, x = _read_one(p, metadata)
        except FairDeployError as exc:
            wrong_kind = p.suffix.lower() in _IMAGE_SUFFIXES and kind != "image"
            if strict or wrong_kind or p.suffix.lower() not in (
                *_IMAGE_SUFFIXES, ".npy", ".csv"
            ):
                raise
            skipped.append((str(p), str(exc)))
            continue
        names += n
        batches.append(x)
    if not batches:
        raise FairDeployError(
            f"none of the {plural(len(skipped), 'input')} could be read (first: "
            f"{skipped[0][1] if skipped else 'none given'})"
        )
    return Inputs(names, np.concatenate(batches).astype(np.float32), skipped)


def load_inputs(
    paths: Sequence[str | os.PathLike[str]], metadata: dict[str, Any]
) -> tuple[list[str], np.ndarray]:
    """Model inputs from image files or .npy/.csv feature rows, with one label per input
    (every input must be readable: see :func:`read_inputs` to skip unreadable ones)."""
    inputs = read_inputs(paths, metadata, strict=True)
    return inputs.names, inputs.x


@dataclass(frozen=True)
class Predictions:
    """:func:`predict`'s result: one dict per input row, and the inputs skipped."""

    predictions: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


#: Rows per ONNX Runtime call: a folder of thousands of images is not one batch.
_PREDICT_BATCH = 64


def predict(
    model: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    top: int = 1,
    provider: str = "cpu",
    strict: bool = False,
) -> Predictions:
    """Classify files (or folders of them) with an exported model, using its metadata.

    Each prediction is ``{"input", "top": [{"class", "index", "probability"}, ...]}``
    (softmax probabilities, most likely first). With ``strict=False`` (the default)
    unreadable inputs are skipped and listed in ``skipped``; ``strict=True`` stops at
    the first one.
    """
    from fairdeploy.providers import make_session

    if not Path(model).is_file():
        raise FairDeployError(f"model {str(model)!r} does not exist")
    session = make_session(model, provider=provider)  # unreadable models → FairDeployError
    meta = model_metadata(session)
    read = read_inputs(inputs, meta, strict=strict)
    input_name = session.get_inputs()[0].name
    logits = np.concatenate(
        [
            session.run(None, {input_name: read.x[i : i + _PREDICT_BATCH]})[0]
            for i in range(0, len(read.x), _PREDICT_BATCH)
        ]
    ).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    classes = meta.get("class_names") or [str(i) for i in range(prob.shape[1])]
    out = []
    for name, p in zip(read.names, prob, strict=True):
        order = np.argsort(-p, kind="stable")[:top]
        out.append(
            {
                "input": name,
                "top": [
                    {"class": classes[i], "index": int(i), "probability": float(p[i])}
                    for i in order
                ],
            }
        )
    return Predictions(out, read.skipped)


def predict_files(
    model: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    top: int = 1,
    provider: str = "cpu",
) -> list[dict[str, Any]]:
    """Classify files with an exported model; class names come from its metadata.

    Returns one dict per input: ``input`` and ``top`` (a list of ``{"class", "index",
    "probability"}``, softmax probabilities, most likely first). Every input must be
    readable (:func:`predict` can skip unreadable ones).
    """
    return predict(model, inputs, top=top, provider=provider, strict=True).predictions
