"""Serve a fairdeploy export with plain onnxruntime, numpy and Pillow (no fairdeploy, no torch).

    python examples/serve_onnxruntime.py exports/<run>/model.onnx INPUT [INPUT ...]

INPUT is an image file (image models) or a .npy/.csv file of feature rows (tabular models).
Everything needed to preprocess and label the inputs is in the model's metadata.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_image(path, pre):
    (h, w), (ch, cw) = pre["resize"], pre["crop"]
    im = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    x = np.asarray(im.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255.0
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)[None]


def load_rows(path):
    if path.endswith(".npy"):
        return np.atleast_2d(np.load(path).astype(np.float32))
    return np.atleast_2d(np.loadtxt(path, delimiter=",", dtype=np.float32))


def main(model_path, inputs):
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = {
        k.removeprefix("fairdeploy."): json.loads(v)
        for k, v in session.get_modelmeta().custom_metadata_map.items()
        if k.startswith("fairdeploy.")
    }
    pre, classes = meta["preprocessing"], meta["class_names"]
    input_name = session.get_inputs()[0].name
    for path in inputs:
        x = load_image(path, pre) if pre["kind"] == "image" else load_rows(path)
        logits = session.run(None, {input_name: x})[0]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for i, row in enumerate(p):
            name = path if len(p) == 1 else f"{path}[{i}]"
            print(f"{name}: {classes[int(row.argmax())]} {row.max():.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
