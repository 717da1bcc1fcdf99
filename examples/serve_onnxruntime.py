"""Serve a fairdeploy export with plain onnxruntime, numpy and Pillow (no fairdeploy, no torch).

    python examples/serve_onnxruntime.py exports/<run>/model.onnx INPUT [INPUT ...]

INPUT is an image file (image models), a .npy/.csv file of feature rows (tabular models),
or a folder: the image, .npy and .csv files directly inside it, by name. A CSV may start
with a header row: its columns are matched by name to the feature names in the model's
metadata (and reordered). A file that cannot be read (a truncated JPEG, a malformed CSV) is
skipped with a "warning: skipped FILE: reason" line on stderr, as `fairdeploy predict`
does; --strict stops at the first one instead (exit code 1). Everything needed to
preprocess and label the inputs is in the model's metadata.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_image(path, pre):
    (h, w), (ch, cw) = pre["resize"], pre["crop"]
    with Image.open(path) as f:
        im = f.convert("RGB").resize((w, h), Image.BILINEAR)
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    x = np.asarray(im.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255.0
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)[None]


def load_rows(path, names):
    if path.suffix.lower() == ".npy":
        return np.atleast_2d(np.load(path).astype(np.float32))
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    try:
        float(rows[0][0])
    except ValueError:  # a header row: pick the model's features by name, in its order
        header = [c.strip() for c in rows[0]]
        if not names:
            raise ValueError("it has a header, but the model names no features") from None
        missing = [n for n in names if n not in header]
        if missing:
            raise ValueError(f"the header lacks the model's features {missing}") from None
        rows = [[r[header.index(n)] for n in names] for r in rows[1:]]
    return np.atleast_2d(np.asarray(rows, dtype=np.float32))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand(inputs):
    """Each path as given; a folder replaced by the readable kinds of files inside it."""
    for p in map(Path, inputs):
        if p.is_dir():
            yield from sorted(f for f in p.iterdir() if f.is_file()
                              and f.suffix.lower() in IMAGE_SUFFIXES | {".npy", ".csv"})
        elif not p.exists():
            raise SystemExit(f"error: {p} does not exist")
        else:
            yield p


def main(model_path, inputs, strict=False):
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = {
        k.removeprefix("fairdeploy."): json.loads(v)
        for k, v in session.get_modelmeta().custom_metadata_map.items()
        if k.startswith("fairdeploy.")
    }
    pre, classes = meta["preprocessing"], meta["class_names"]
    input_name = session.get_inputs()[0].name
    done = 0
    for path in expand(inputs):
        try:
            if pre["kind"] == "image":
                x = load_image(path, pre)
            else:
                x = load_rows(path, pre.get("features"))
        except (OSError, ValueError, IndexError, SyntaxError, Image.DecompressionBombError) as exc:
            # A truncated or corrupt image is an OSError (UnidentifiedImageError included).
            if strict:
                raise SystemExit(f"error: cannot read {path}: {exc}") from None
            print(f"warning: skipped {path}: {exc}", file=sys.stderr)
            continue
        logits = session.run(None, {input_name: x})[0]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for i, row in enumerate(p):
            name = path if len(p) == 1 else f"{path}[{i}]"
            print(f"{name}: {classes[int(row.argmax())]} {row.max():.3f}")
        done += 1
    if not done:
        raise SystemExit("error: none of the inputs could be read")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="the exported model.onnx")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image, .npy or .csv file, or a folder of them")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable input instead of skipping it")
    args = parser.parse_args()
    main(args.model, args.inputs, strict=args.strict)
