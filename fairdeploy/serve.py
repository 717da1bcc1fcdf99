"""Serve an exported model with ONNX Runtime using only its own metadata.

The metadata written by export (``fairdeploy.preprocessing``, ``fairdeploy.class_names``)
is enough to turn image files or feature rows into predictions: no recipe, no torch.
Image preprocessing reproduces the evaluation transform (PIL bilinear resize to
size×size, center crop, scale to [0, 1], normalize with mean/std, NCHW).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy._json import METADATA_PREFIX, decode_prefixed
from fairdeploy._text import plural
from fairdeploy.errors import FairDeployError, first_line

__all__ = [
    "MAX_INPUT_SIDE",
    "Inputs",
    "Predictions",
    "check_metadata",
    "expand_inputs",
    "load_inputs",
    "model_metadata",
    "predict",
    "predict_files",
    "preprocess_image",
    "read_inputs",
]

#: The largest side a model's metadata may ask an input image to be resized or cropped
#: to (a 4096×4096 float input is 200 MB per image; classifiers take a few hundred
#: pixels). Larger values are refused before any image is read.
MAX_INPUT_SIDE = 4096
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def model_metadata(session: Any) -> dict[str, Any]:
    """The ``fairdeploy.*`` metadata of an ORT session's model, JSON-decoded."""
    try:
        items = session.get_modelmeta().custom_metadata_map.items()
    except UnicodeDecodeError as exc:  # protobuf strings must be UTF-8; damaged ones are not
        raise FairDeployError(
            f"the model's metadata is not valid UTF-8 ({exc.reason}): the file is damaged; "
            "re-export it with fairdeploy optimize"
        ) from None
    return decode_prefixed(items, METADATA_PREFIX)


def preprocess_image(path: str | os.PathLike[str], pre: dict[str, Any]) -> np.ndarray:
    """One image file as the model's (3, crop, crop) float32 input.

    Images over :data:`fairdeploy._image_limit.MAX_IMAGE_PIXELS` are refused from their
    header, before decoding.
    """
    from PIL import Image

    from fairdeploy._image_limit import open_image

    try:
        with open_image(path) as im:
            im = im.convert("RGB")
            w, h = pre["resize"][1], pre["resize"][0]
            im = im.resize((w, h), Image.BILINEAR)
            ch, cw = pre["crop"]
            top = round((h - ch) / 2.0)
            left = round((w - cw) / 2.0)
            im = im.crop((left, top, left + cw, top + ch))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError; ImageTooLarge a ValueError.
        raise FairDeployError(f"cannot read image {str(path)!r}: {exc}") from None
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _numbers(value: Any, n: int | None) -> bool:
    return (
        isinstance(value, list)
        and (n is None or len(value) == n)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def check_metadata(metadata: dict[str, Any], model: str | os.PathLike[str]) -> None:
    """Refuse metadata that cannot describe how to serve the model (damaged or hand-edited):
    a wrong number would be worse than none."""
    fix = f"model {str(model)!r} has unusable fairdeploy metadata"
    pre = metadata.get("preprocessing")
    if pre is None:
        pre = {}
    if not isinstance(pre, dict):
        raise FairDeployError(
            f"{fix}: 'preprocessing' is not a JSON mapping ({str(pre)[:60]!r}); re-export the "
            "model with fairdeploy optimize"
        )
    problems = []
    if pre.get("kind") == "image":
        for key, n in (("resize", 2), ("crop", 2), ("mean", 3), ("std", 3)):
            if not _numbers(pre.get(key), n):
                problems.append(f"preprocessing.{key} is {pre.get(key)!r}")
        for key in ("crop", "resize"):
            value = pre.get(key)
            if _numbers(value, 2) and any(not 1 <= c <= MAX_INPUT_SIDE for c in value):
                problems.append(
                    f"preprocessing.{key} is {value!r} (each side must be 1 to "
                    f"{MAX_INPUT_SIDE} pixels)"
                )
        if _numbers(pre.get("std"), 3) and any(v == 0 for v in pre["std"]):
            problems.append("preprocessing.std has a zero")
    shape = pre.get("input_shape")
    if shape is not None and not (
        _numbers(shape, None) and all(isinstance(d, int) and d >= 1 for d in shape)
    ):
        problems.append(f"preprocessing.input_shape is {shape!r}")
    feats = pre.get("features")
    if feats is not None and not (
        isinstance(feats, list) and all(isinstance(f, str) for f in feats)
    ):
        problems.append("preprocessing.features is not a list of names")
    names = metadata.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(c, str) for c in names)
    ):
        problems.append("class_names is not a list of names")
    if problems:
        raise FairDeployError(
            f"{fix} ({'; '.join(problems)[:300]}); re-export the model with fairdeploy optimize"
        )


def _is_number_row(row: Sequence[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def _feature_rows(path: Path, width: int | None, names: Sequence[str] | None) -> np.ndarray:
    """Rows of features from .npy or .csv. A CSV header is matched by name against the
    model's feature names (columns reordered to the model's order), never just dropped."""
    arr = _npy_rows(path) if path.suffix.lower() == ".npy" else _csv_rows(path, names)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        raise FairDeployError(
            f"{str(path)!r} holds an array of shape {arr.shape}; the model expects rows of "
            f"{width} features"
        )
    if len(arr) == 0:
        raise FairDeployError(f"{str(path)!r} holds no rows: give at least one input")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(bad):
        raise FairDeployError(
            f"{str(path)!r}: row {int(bad[0])} has a non-finite value (NaN, infinity, or a "
            "number too large for float32): the model cannot classify it"
        )
    return arr


def _npy_rows(path: Path) -> np.ndarray:
    """The real-valued array a .npy file holds (no pickles)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, EOFError, TokenError, MemoryError on bad bytes
        raise FairDeployError(
            f"cannot read {str(path)!r} as a .npy array ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise FairDeployError(
            f"{str(path)!r} is an .npz archive, not a .npy array: save the rows with np.save"
        )
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_ or np.iscomplexobj(
        arr
    ):
        raise FairDeployError(
            f"{str(path)!r} holds a {arr.dtype} array: feature rows must be real numbers"
        )
    return arr


def _csv_rows(path: Path, names: Sequence[str] | None) -> np.ndarray:
    """CSV rows as float32, columns in the model's feature order when there is a header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, strict=True) if r]
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
    except (OSError, ValueError, IndexError, csv.Error) as exc:
        raise FairDeployError(
            f"cannot read {str(path)!r} as CSV feature rows (numbers, one row per input): {exc}"
        ) from None
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
        elif not p.is_file():
            # A FIFO or device would block the read, or never end: refused before reading.
            raise FairDeployError(
                f"input {str(p)!r} is not a regular file (a pipe, socket or device): give "
                "image, .npy or .csv files, or their folder"
            )
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
    from fairdeploy.rundir import check_unchanged

    if not Path(model).is_file():
        raise FairDeployError(f"model {str(model)!r} does not exist")
    check_unchanged(model)
    session = make_session(model, provider=provider)  # unreadable models → FairDeployError
    meta = model_metadata(session)
    check_metadata(meta, model)
    read = read_inputs(inputs, meta, strict=strict)
    if not session.get_inputs() or not session.get_outputs():
        raise FairDeployError(f"model {str(model)!r} has no inputs or outputs to run")
    input_name = session.get_inputs()[0].name
    try:
        logits = np.concatenate(
            [
                session.run(None, {input_name: read.x[i : i + _PREDICT_BATCH]})[0]
                for i in range(0, len(read.x), _PREDICT_BATCH)
            ]
        ).astype(np.float64)
    except Exception as exc:  # ORT's InvalidArgument for inputs of the wrong shape
        raise FairDeployError(
            f"model {str(model)!r} cannot run on these inputs (shape {read.x.shape[1:]}): "
            f"{first_line(exc)}"
        ) from None
    if logits.ndim != 2 or len(logits) != len(read.names):
        raise FairDeployError(
            f"model {str(model)!r} returned shape {logits.shape} for {len(read.names)} inputs: "
            "it is not a classifier with (batch, classes) logits"
        )
    if not np.isfinite(logits).all():
        raise FairDeployError(
            f"model {str(model)!r} returned non-finite logits (NaN or infinity): its weights "
            "are damaged or the inputs are far outside its training range"
        )
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    classes = meta.get("class_names") or [str(i) for i in range(prob.shape[1])]
    if len(classes) != prob.shape[1]:
        raise FairDeployError(
            f"model {str(model)!r} returns {prob.shape[1]} classes but its metadata names "
            f"{len(classes)}: re-export the model with fairdeploy optimize"
        )
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
