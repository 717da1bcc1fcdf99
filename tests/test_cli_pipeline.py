"""End to end through the CLI on a small tabular task: train, optimize, verify, predict,
compare, and the bad-input paths. The shipped artifact's numbers are re-derived here from
ONNX Runtime's own outputs with fairlearn, independently of fairdeploy's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from fairdeploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _make_data(path: Path, n: int = 900, d: int = 8, seed: int = 0) -> None:
    """Three learnable classes; group 1's features are noisier, so the groups differ."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 3))
    y = (x @ w + rng.normal(scale=0.3 + 0.9 * group[:, None], size=(n, 3))).argmax(1)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    np.savez(path, x=x, y=y.astype(np.int64), group=group.astype(np.int64), split=split)


RECIPE = """\
name: tiny
model:
  arch: mlp
  num_classes: 3
  kwargs: {{in_features: 8, widths: [32, 32]}}
data:
  kind: npz
  path: {data}
  split: {{mode: column}}
sensitive:
  attribute: group
  groups: {{a: [0], b: [1]}}
  privileged: auto
method:
  name: {method}
  beta: 5/9
  layers:
    - {{layer: {layer}, rank: {rank}, sr: 0.25, rr: 0.5}}
  scoring: {{samples_per_group: 128, batch_size: 64}}
train: {{epochs: 4, lr: 0.05, step_epochs: 2, batch_size: 64, augment: false}}
export: {{verify_samples: 200}}
report: {{latency_batches: [1, 8], latency_warmup: 1, latency_iterations: 5}}
"""


def _recipe(
    tmp: Path,
    *,
    method: str = "fairlrf",
    layer: str = "layers.2",
    rank: int = 8,
    name: str = "recipe.yaml",
    data: str = "data.npz",
) -> Path:
    p = tmp / name
    p.write_text(RECIPE.format(data=data, method=method, layer=layer, rank=rank))
    return p


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    _make_data(tmp / "data.npz")
    _recipe(tmp)
    code, out = _invoke("train", "--recipe", str(tmp / "recipe.yaml"), "-o", str(tmp / "ckpt.pt"))
    assert code == 0, out
    return tmp


@pytest.fixture(scope="module")
def optimized(trained: Path) -> Path:
    code, out = _invoke(
        "optimize",
        str(trained / "ckpt.pt"),
        "--recipe",
        str(trained / "recipe.yaml"),
        "--out",
        str(trained / "run"),
        "--exports",
        str(trained / "exports"),
    )
    assert code == 0, out
    assert "test inputs): PASSED" in out
    return trained / "run"


def test_train_writes_a_weights_only_checkpoint(trained: Path) -> None:
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert set(ckpt["state_dict"]) >= {"layers.0.weight", "layers.2.weight", "layers.4.bias"}


def test_optimize_writes_the_run_folder(optimized: Path) -> None:
    names = {p.name for p in optimized.iterdir()}
    assert {
        "model.onnx",
        "model.verify.npz",
        "model.pt",
        "recipe.yaml",
        "report.json",
        "report.md",
    } <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    # Readable as a plain mkdir/open would make them (temporary names are owner-only).
    umask = os.umask(0)
    os.umask(umask)
    assert optimized.stat().st_mode & 0o777 == 0o777 & ~umask
    for p in optimized.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    report = json.loads((optimized / "report.json").read_text())
    assert report["schema_version"] == 1
    assert [m["name"] for m in report["methods"]] == ["vanilla", "fairlrf"]
    assert report["verify"]["passed"]
    fair = report["methods"][1]
    assert fair["compression"]["theoretical_cr"] > 1
    # Measured parameters agree with the theoretical count (S stored as k values).
    measured = fair["compression"]["measured"]["parameter_cr"]
    assert measured == pytest.approx(fair["compression"]["theoretical_cr_stored"], rel=0.01)
    md = (optimized / "report.md").read_text()
    assert "FairLRF (k=8, sr=0.25, rr=0.5" in md and "bootstrap" in md
    # The processed checkpoint loads without pickles.
    torch.load(optimized / "model.pt", weights_only=True)


def test_report_matches_the_shipped_onnx_model(optimized: Path, trained: Path) -> None:
    """Recompute the processed model's test metrics from ONNX Runtime with fairlearn."""
    from fairlearn.metrics import MetricFrame, true_positive_rate
    from sklearn.metrics import precision_score

    data = np.load(trained / "data.npz")
    test = data["split"] == "test"
    x, y, g = data["x"][test], data["y"][test], data["group"][test]
    sess = ort.InferenceSession(str(optimized / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    report = json.loads((optimized / "report.json").read_text())
    m = report["methods"][1]["metrics"]
    gaps = []
    for k in range(3):
        mf = MetricFrame(
            metrics=true_positive_rate, y_true=y == k, y_pred=pred == k, sensitive_features=g
        )
        gaps.append(abs(mf.by_group[1] - mf.by_group[0]))
    assert m["fairness"]["eopp1"] == pytest.approx(np.mean(gaps), abs=1e-12)
    for grp in m["groups"]:
        sel = g == grp["id"]
        expected = precision_score(y[sel], pred[sel], average="macro", zero_division=0)
        assert grp["precision"] == pytest.approx(expected, abs=1e-12)


def test_verify_command(optimized: Path) -> None:
    code, out = _invoke("verify", str(optimized / "model.onnx"))
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("PASSED")


def test_second_run_reuses_the_feature_cache_and_is_deterministic(
    optimized: Path, trained: Path
) -> None:
    code, out = _invoke(
        "optimize",
        str(trained / "ckpt.pt"),
        "--recipe",
        str(trained / "recipe.yaml"),
        "--out",
        str(trained / "run2"),
        "--exports",
        str(trained / "exports"),
        "--no-latency",
    )
    assert code == 0, out
    a = json.loads((optimized / "report.json").read_text())
    b = json.loads((trained / "run2" / "report.json").read_text())
    assert all(b["feature_cache"]["hits"].values())
    cached = {p.name.split("-")[0] for p in (trained / "exports" / ".cache").iterdir()}
    assert {"features", "svd", "hessian", "vanilla"} <= cached
    assert a["methods"] == b["methods"]
    assert a["bootstrap"] == b["bootstrap"]


def test_dry_run_reads_no_data(trained: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, data="missing.npz")
    code, out = _invoke("optimize", str(trained / "ckpt.pt"), "--recipe", str(recipe), "--dry-run")
    assert code == 0, out
    assert "layers.2" in out and "theoretical C.R." in out
    # layers.2 is 32×32 = 1,056 params; k=8 → 32·8 + 64 + 8·32 + 32 = 608, minus the
    # zeroed entries: 8 rows and 8 cols × (8 − 4) = 64 → 544.
    assert "1,056" in out and "544" in out


def test_predict_and_the_serving_example_agree(
    optimized: Path, trained: Path, tmp_path: Path
) -> None:
    data = np.load(trained / "data.npz")
    rows = data["x"][-3:]
    np.savetxt(tmp_path / "rows.csv", rows, delimiter=",")
    code, out = _invoke("predict", str(optimized / "model.onnx"), str(tmp_path / "rows.csv"))
    assert code == 0, out
    sess = ort.InferenceSession(str(optimized / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {sess.get_inputs()[0].name: rows})[0].argmax(1)
    got = [line.split(": ")[1].split()[0] for line in out.strip().splitlines()]
    assert got == [str(int(k)) for k in expected]
    ex = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "serve_onnxruntime.py"),
            str(optimized / "model.onnx"),
            str(tmp_path / "rows.csv"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [line.split(": ")[1].split()[0] for line in ex.stdout.strip().splitlines()] == got


def test_compare_runs_the_paper_methods(trained: Path) -> None:
    code, out = _invoke(
        "compare",
        str(trained / "ckpt.pt"),
        "--recipe",
        str(trained / "recipe.yaml"),
        "--out",
        str(trained / "cmp"),
        "--exports",
        str(trained / "exports"),
    )
    assert code == 0, out
    report = json.loads((trained / "cmp" / "report.json").read_text())
    names = [m["name"] for m in report["methods"]]
    assert names[:5] == ["vanilla", "truncated_svd", "slr_w", "slr_a", "fairlrf"]
    assert set(report["bootstrap"]["differences"]) == set(names[1:])
    assert all("metrics_val" in m for m in report["methods"])
    assert "## Validation split" in (trained / "cmp" / "report.md").read_text()


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    # Progress log lines of phases that ran before the error may precede it.
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("fairdeploy: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_inputs_give_one_line_and_leave_no_run_folder(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "ckpt.pt")
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(_recipe(tmp_path).read_text().replace("name: tiny", "nmae: tiny"))
    assert "nmae" in _error(
        ["optimize", ckpt, "--recipe", str(bad_key), "--out", str(tmp_path / "r1")]
    )
    msg = _error(
        [
            "optimize",
            ckpt,
            "--recipe",
            str(_recipe(tmp_path, layer="layers.9", name="l.yaml")),
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert "layers.9" in msg and "layers.0" in msg and "layers.4" in msg
    msg = _error(
        [
            "optimize",
            ckpt,
            "--recipe",
            str(_recipe(tmp_path, rank=64, name="r.yaml")),
            "--out",
            str(tmp_path / "r3"),
        ]
    )
    assert "rank" in msg and "32" in msg
    assert "missing.pt" in _error(
        [
            "optimize",
            str(tmp_path / "missing.pt"),
            "--recipe",
            str(_recipe(tmp_path)),
            "--out",
            str(tmp_path / "r4"),
        ]
    )
    from fairdeploy.models import build_model

    torch.save(build_model("mlp", 3, in_features=8, widths=[32, 32]), tmp_path / "pickled.pt")
    msg = _error(
        [
            "optimize",
            str(tmp_path / "pickled.pt"),
            "--recipe",
            str(_recipe(tmp_path)),
            "--out",
            str(tmp_path / "r5"),
        ]
    )
    assert "--trust-checkpoint" in msg
    # A split in which a group has no samples.
    d = dict(np.load(trained / "data.npz"))
    d["group"] = np.where(d["split"] == "test", 0, d["group"])
    np.savez(tmp_path / "onegroup.npz", **d)
    msg = _error(
        [
            "optimize",
            ckpt,
            "--recipe",
            str(_recipe(tmp_path, data="onegroup.npz", name="g.yaml")),
            "--out",
            str(tmp_path / "r6"),
        ]
    )
    assert "test" in msg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("r", ".r")) and p.is_dir()]


def test_verify_against_checkpoint_and_recipe(optimized: Path, trained: Path) -> None:
    """The "checkpoint + recipe" reference: optimize's model.pt rebuilt and run in PyTorch
    on the test split; fairness of the ONNX model's predictions is reported."""
    code, out = _invoke(
        "verify", str(optimized / "model.onnx"), "--checkpoint", str(optimized / "model.pt"),
        "--recipe", str(optimized / "recipe.yaml"), "--samples", "50", "--json",
        str(trained / "v.json"),
    )
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("PASSED")
    result = json.loads((trained / "v.json").read_text())
    assert result["n_samples"] == 50 and result["fairness"] is not None
    # The vanilla checkpoint is a different model: the comparison must fail.
    code, out = _invoke(
        "verify", str(optimized / "model.onnx"), "--checkpoint", str(trained / "ckpt.pt"),
        "--recipe", str(optimized / "recipe.yaml"),
    )
    assert code == 1 and out.strip().splitlines()[-1].startswith("FAILED")


def test_train_is_deterministic_across_processes(trained: Path, tmp_path: Path) -> None:
    """Same recipe and seed in a fresh process → the same weights (model init included)."""
    ckpt = tmp_path / "again.pt"
    subprocess.run(
        [sys.executable, "-m", "fairdeploy.cli", "train", "--recipe",
         str(trained / "recipe.yaml"), "-o", str(ckpt)],
        check=True, capture_output=True,
    )
    a = torch.load(trained / "ckpt.pt", weights_only=True)["state_dict"]
    b = torch.load(ckpt, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_target_layers(trained: Path, tmp_path: Path) -> None:
    """Multi-layer FairLRF: the cut is at the first layer the forward pass reaches (listed
    second here); both layers are factorized, sparsified, exported and verified."""
    text = (trained / "recipe.yaml").read_text().replace(
        "    - {layer: layers.2, rank: 8, sr: 0.25, rr: 0.5}",
        "    - {layer: layers.2, rank: 8, sr: 0.25, rr: 0.5}\n"
        "    - {layer: layers.0, rank: 4, sr: 0.25, rr: 0.0}",
    )
    recipe = tmp_path / "two.yaml"
    recipe.write_text(text.replace("path: data.npz", f"path: {trained / 'data.npz'}"))
    code, out = _invoke(
        "optimize", str(trained / "ckpt.pt"), "--recipe", str(recipe), "--out",
        str(tmp_path / "run"), "--exports", str(tmp_path / "exp"), "--no-latency",
    )
    assert code == 0, out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["feature_cache"]["first_layer"] == "layers.0"
    layers = {lt["name"]: lt for lt in report["methods"][1]["compression"]["layers"]}
    assert layers["layers.0"]["k"] == 4 and layers["layers.0"]["rows_sparsified"] == 2
    assert layers["layers.2"]["keep"] == 4
    assert report["verify"]["passed"]


def test_out_never_replaces_a_folder_that_is_not_a_run(trained: Path, tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    msg = _error(["optimize", str(trained / "ckpt.pt"), "--recipe", str(trained / "recipe.yaml"),
                  "--out", str(mine)])
    assert "not a fairdeploy run folder" in msg
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "afile").write_text("x")
    msg = _error(["optimize", str(trained / "ckpt.pt"), "--recipe", str(trained / "recipe.yaml"),
                  "--out", str(tmp_path / "afile" / "run")])
    assert "afile" in msg


def test_changed_data_at_the_same_path_is_not_served_from_the_cache(tmp_path: Path) -> None:
    _make_data(tmp_path / "data.npz")
    recipe = _recipe(tmp_path)
    code, out = _invoke("train", "--recipe", str(recipe), "-o", str(tmp_path / "c.pt"),
                        "--epochs", "1")
    assert code == 0, out
    args = ["optimize", str(tmp_path / "c.pt"), "--recipe", str(recipe), "--exports",
            str(tmp_path / "exp"), "--no-latency"]
    assert _invoke(*args, "--out", str(tmp_path / "r1"))[0] == 0
    d = dict(np.load(tmp_path / "data.npz"))
    d["y"] = (d["y"] + 1) % 3  # same file name, new labels
    np.savez(tmp_path / "data.npz", **d)
    assert _invoke(*args, "--out", str(tmp_path / "r2"))[0] == 0
    a = json.loads((tmp_path / "r1" / "report.json").read_text())
    b = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert not any(b["feature_cache"]["hits"].values())
    assert a["methods"][0]["metrics"] != b["methods"][0]["metrics"]


def test_an_unavailable_method_is_refused_before_any_data_is_read(
    trained: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipe imports a test module
    text = (trained / "recipe.yaml").read_text()
    start = text.index("method:")
    end = text.index("train:")
    recipe = tmp_path / "na.yaml"
    recipe.write_text(text[:start] + "method: {name: '_tiny_method:NotHere', layer: layers.2}\n"
                      + text[end:])
    msg = _error(["optimize", str(trained / "ckpt.pt"), "--recipe", str(recipe), "--out",
                  str(tmp_path / "r")])
    assert "_tiny_method:NotHere" in msg and "needs a licence server" in msg
    assert "fairprune" in msg and "fairquantize" in msg  # the methods that can run
    assert not (tmp_path / "r").exists()


def test_predict_matches_a_csv_header_by_name(tmp_path: Path) -> None:
    """Demo-style tabular metadata names its features: a CSV header is reordered to them."""
    from fairdeploy.serve import load_inputs

    meta = {"preprocessing": {"kind": "tabular", "features": ["a", "b", "c"], "input_shape": [3]}}
    (tmp_path / "x.csv").write_text("c,a,b\n3,1,2\n6,4,5\n")
    _, x = load_inputs([tmp_path / "x.csv"], meta)
    assert x.tolist() == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "bad.csv").write_text("a,b,d\n1,2,3\n")
    with pytest.raises(Exception, match="lacks the model's feature"):
        load_inputs([tmp_path / "bad.csv"], meta)
