"""End to end on image data (CelebA layout): optimize → files, ONNX Runtime predictions,
the report's group metrics recomputed independently, and bad inputs as one-line errors.

A tiny CNN (imported through ``model.arch: module:factory``) keeps this to seconds.
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from _fixtures import make_celeba, write_image
from click.testing import CliRunner

from fairdeploy.cli import main

_NET = '''
from torch import nn

def tiny(num_classes=2, width=32):
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(16)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 7 * 7, width), nn.ReLU(), nn.Dropout(),
                      nn.Linear(width, width), nn.ReLU(), nn.Dropout(),
                      nn.Linear(width, num_classes)))
'''

_RECIPE = """
name: e2e-images
model: {arch: "e2e_tinynet:tiny", num_classes: 2}
data:
  kind: celeba
  root: data
  target: Smiling
  split: {mode: official}
  preprocessing: {size: 128, crop: 112}
sensitive:
  attribute: Male
  groups: {female: [-1], male: [1]}
method:
  name: fairlrf
  beta: 5/9
  layers:
    - {layer: "2.3", rank: 4, sr: 0.5, rr: 0.5}
  scoring: {samples_per_group: 16}
"""


@pytest.fixture(scope="module", autouse=True)
def _trusted_recipes():
    """The recipes here import the test's own tiny CNN module: trusted (issue 21 item 15)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "e2e_tinynet.py").write_text(_NET)
    sys.path.insert(0, str(tmp))
    try:
        info = make_celeba(tmp / "data", n=32, seed=3)
        for i, f in enumerate(info["files"]):  # real CelebA size, 178×218
            write_image(tmp / "data/celeba/img_align_celeba" / f, 7000 + i, size=(178, 218))
        (tmp / "recipe.yaml").write_text(textwrap.dedent(_RECIPE))
        import e2e_tinynet

        torch.manual_seed(0)
        model = e2e_tinynet.tiny(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        torch.save(model.state_dict(), tmp / "ckpt.pt")
        result = CliRunner().invoke(
            main,
            ["optimize", str(tmp / "ckpt.pt"), "--recipe", str(tmp / "recipe.yaml"),
             "--out", str(tmp / "run"), "--no-latency", "--exports", str(tmp / "exports")],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        yield tmp, info
    finally:
        sys.path.remove(str(tmp))


def test_run_folder_and_metrics_match_onnxruntime(run):
    import onnxruntime as ort

    tmp, info = run
    out = tmp / "run"
    for name in ("model.onnx", "model.verify.npz", "model.pt", "recipe.yaml", "report.json",
                 "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    ref = np.load(out / "model.verify.npz")
    test = info["partition"] == 2
    from fairdeploy.recipe import CELEBA_ATTRIBUTES

    y = (info["values"][test, CELEBA_ATTRIBUTES.index("Smiling")] == 1).astype(int)
    g = (info["values"][test, CELEBA_ATTRIBUTES.index("Male")] == 1).astype(int)
    np.testing.assert_array_equal(ref["labels"], y)
    np.testing.assert_array_equal(ref["groups"], g)

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": ref["inputs"]})[0].argmax(1)
    priv = report["task"]["privileged"]["id"]
    metrics = report["methods"][-1]["metrics"]

    def rate(gi, k, positives):
        m = (g == gi) & ((y == k) if positives else (y != k))
        return ((pred == k) & m).sum() / m.sum()

    dtpr = np.array([rate(priv, k, True) - rate(1 - priv, k, True) for k in (0, 1)])
    dfpr = np.array([rate(priv, k, False) - rate(1 - priv, k, False) for k in (0, 1)])
    assert metrics["fairness"]["eopp1"] == pytest.approx(np.abs(dtpr).mean())
    assert metrics["fairness"]["eodd"] == pytest.approx(np.abs(dtpr + dfpr).mean() / 2)
    for grp in metrics["groups"]:
        m = g == grp["id"]
        assert grp["count"] == int(m.sum())
        assert grp["accuracy"] == pytest.approx((pred[m] == y[m]).mean())
    assert report["checkpoint"]["sha256"]
    # no staging folder is left beside the run
    assert not [p for p in (tmp / "run").parent.iterdir() if p.name.startswith(".run")]


def test_predict_agrees_with_verify_inputs(run):
    from fairdeploy.serve import predict_files

    tmp, info = run
    out = tmp / "run"
    files = [tmp / "data/celeba/img_align_celeba" / f
             for f, p in zip(info["files"], info["partition"], strict=True) if p == 2]
    ref = np.load(out / "model.verify.npz")
    logits = ref["outputs"][: len(files)]
    got = predict_files(out / "model.onnx", files, top=2)
    assert [r["top"][0]["index"] for r in got] == list(logits.argmax(1))


@pytest.mark.parametrize("case", ["not_onnx_predict", "truncated_ckpt", "wrong_classes"])
def test_bad_inputs_are_one_line_errors(run, case):
    tmp, info = run
    img = str(tmp / "data/celeba/img_align_celeba" / info["files"][-1])
    if case == "not_onnx_predict":
        args = ["predict", str(tmp / "ckpt.pt"), img]
    elif case == "truncated_ckpt":
        (tmp / "trunc.pt").write_bytes((tmp / "ckpt.pt").read_bytes()[:500])
        args = ["optimize", str(tmp / "trunc.pt"), "--recipe", str(tmp / "recipe.yaml"),
                "--exports", str(tmp / "bad_exports")]
    else:
        import e2e_tinynet

        torch.save(e2e_tinynet.tiny(3).state_dict(), tmp / "three.pt")
        args = ["optimize", str(tmp / "three.pt"), "--recipe", str(tmp / "recipe.yaml"),
                "--exports", str(tmp / "bad_exports")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert not (tmp / "bad_exports").exists() or not [
        p for p in (tmp / "bad_exports").iterdir() if p.name != ".cache"
    ]


def test_predict_a_folder_skips_unreadable_images(run, tmp_path):
    tmp, info = run
    out = tmp / "run"
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = [tmp / "data/celeba/img_align_celeba" / f for f in info["files"][:3]]
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an input type")
    result = CliRunner().invoke(main, ["predict", str(out / "model.onnx"), str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [str(folder / f.name) for f in files]
    assert f"warning: skipped {folder / 'broken.jpg'}: cannot read image" in result.stderr
    # The same predictions as the files given one by one.
    from fairdeploy.serve import predict_files

    alone = predict_files(out / "model.onnx", files)
    assert [ln.split(": ")[1].split()[0] for ln in lines] == [r["top"][0]["class"] for r in alone]
    strict = CliRunner().invoke(main, ["predict", str(out / "model.onnx"), str(folder),
                                       "--strict"])
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    assert strict.output.strip().splitlines()[-1].startswith("Error: cannot read image")
