"""A user's first day through the CLI (issue 12): what the report and the commands say.

One small tabular task, trained and optimized once for the module, with a recipe copied
from the shipped npz template (its ``name:`` kept). The report's accuracy is recomputed
from ONNX Runtime's own predictions with numpy; byte counts and row counts of the capped
reference by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from fairdeploy.cli import main

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"]

# The npz template's name (my-features) is kept, as a user copying the template would.
RECIPE = """\
name: my-features
model:
  arch: mlp
  num_classes: 3
  kwargs: {in_features: 8, widths: [32, 32]}
data:
  kind: npz
  path: data.npz
  split: {mode: column}
sensitive:
  attribute: group
  groups: {a: [0], b: [1]}
method:
  name: fairlrf
  beta: 3
  layers:
    - {layer: layers.2, rank: 8, sr: 0.25, rr: 0.5}
  scoring: {samples_per_group: 128, batch_size: 64}
train: {epochs: 3, lr: 0.05, step_epochs: 2, batch_size: 64, augment: false}
export: {verify_samples: 200, verify_npz_max_mb: 0.004}
report: {latency_batches: [1, 8], latency_warmup: 1, latency_quick_seconds: 0.5}
"""


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _one_line_error(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("fairdeploy: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("day")
    rng = np.random.default_rng(0)
    n = 900
    group = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 3)) + rng.normal(scale=0.3 + 0.9 * group[:, None],
                                                   size=(n, 3))).argmax(1)
    split = np.array(["train"] * 450 + ["val"] * 225 + ["test"] * 225)
    np.savez(tmp / "data.npz", x=x, y=y, group=group, split=split,
             feature_names=np.array(FEATURES))
    (tmp / "features-day.yaml").write_text(RECIPE)
    code, out = _invoke("train", "--recipe", str(tmp / "features-day.yaml"), "-o",
                        str(tmp / "ckpt.pt"))
    assert code == 0, out
    code, out = _invoke("optimize", str(tmp / "ckpt.pt"), "--recipe",
                        str(tmp / "features-day.yaml"), "--exports", str(tmp / "exports"))
    assert code == 0, out
    (run,) = [p for p in (tmp / "exports").iterdir() if not p.name.startswith(".")]
    report = json.loads((run / "report.json").read_text())
    return {"tmp": tmp, "run": run, "out": out, "report": report, "x": x, "y": y, "g": group,
            "test": split == "test"}


# --------------------------------------------------------------------------- the report


def test_accuracy_overall_and_per_group_match_onnxruntime(day: dict) -> None:
    run, report = day["run"], day["report"]
    test = day["test"]
    x, y, g = day["x"][test], day["y"][test], day["g"][test]
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": x})[0].argmax(1)
    acc = report["methods"][1]["accuracy"]["test"]
    by_group = [np.mean(pred[g == k] == y[g == k]) for k in (0, 1)]
    assert acc["overall"] == pytest.approx(np.mean(pred == y), abs=1e-12)
    assert acc["samples"] == len(y)
    assert acc["avg"] == pytest.approx(np.mean(by_group), abs=1e-12)
    assert acc["diff"] == pytest.approx(abs(by_group[0] - by_group[1]), abs=1e-12)
    for grp in report["methods"][1]["metrics"]["groups"]:
        assert grp["accuracy"] == pytest.approx(by_group[grp["id"]], abs=1e-12)
    md = (run / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if "| All (225)" in ln and "Vanilla" not in ln)
    assert row  # both methods have an All row; the figure is in the table
    assert f"{np.mean(pred == y):.3f}" in md
    assert "Accuracy" in day["out"].splitlines()[1] or "Accuracy" in day["out"]


def test_every_number_in_the_tables_has_fixed_decimals(day: dict) -> None:
    md = (day["run"] / "report.md").read_text()
    section = md.split("## Accuracy and fairness")[1].split("\n\n")[1]
    cells = [c.strip() for ln in section.splitlines()[2:] for c in ln.strip("|").split("|")]
    numbers = [c for c in cells if re.fullmatch(r"[\d.]+×?", c)]
    assert len(numbers) > 20
    assert all(re.fullmatch(r"\d+\.\d{3}×?", c) for c in numbers), numbers
    # The terminal table only: progress log lines above it carry timings such as 0.6 s.
    out_table = day["out"].split("⚠ FairLRF")[0]
    out_table = out_table[out_table.index("Method"):]
    assert not re.search(r"\s0\.\d{1,2}\s", out_table), out_table  # no 0.85, 0.7


def test_warnings_stand_under_the_table_in_words(day: dict) -> None:
    report, out = day["report"], day["out"]
    fair = report["methods"][1]
    beta = [w for w in fair["warnings"] if "β = 3 ≥ 1" in w]
    assert beta and beta[0] in report["notes"]
    md = (day["run"] / "report.md").read_text()
    table_end = md.index("## Accuracy and fairness")
    assert md.index("⚠ FairLRF", table_end) > table_end
    assert "FairLRF (k=8, sr=0.25, rr=0.5, β=3) ⚠" in out
    assert "⚠ FairLRF (k=8, sr=0.25, rr=0.5, β=3): layer layers.2: β = 3 ≥ 1" in out
    # No raw Python warnings, no dict text.
    assert "Warning:" not in out and ".py:" not in out
    assert not any("{" in n for n in report["notes"])


def test_paired_differences_say_their_direction(day: dict) -> None:
    boot = day["report"]["bootstrap"]
    words = {"better", "worse", "not significant"}
    diffs = boot["differences"]["fairlrf"]
    assert {"eopp1", "avg_accuracy", "avg_recall"} <= set(diffs)
    assert all(d["direction"] in words for d in diffs.values())
    assert sorted(boot["lower_is_better"]) == ["eodd", "eopp0", "eopp1"]
    line = next(ln for ln in day["out"].splitlines() if ln.strip().startswith("fairness: EOpp1"))
    assert re.search(r"EOpp1 [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] "
                     r"(better|worse|not significant)", line)


def test_change_direction_by_hand() -> None:
    from fairdeploy.report import change_direction

    down = {"value": -0.02, "low": -0.03, "high": -0.01, "significant": True}
    up = {"value": 0.02, "low": 0.01, "high": 0.03, "significant": True}
    across = {"value": 0.01, "low": -0.01, "high": 0.03, "significant": False}
    assert change_direction("eopp1", down) == "better"
    assert change_direction("eodd", up) == "worse"
    assert change_direction("avg_accuracy", down) == "worse"
    assert change_direction("avg_precision", up) == "better"
    assert change_direction("eopp1", across) == "not significant"
    assert change_direction("eopp1", {**up, "low": None}) == "not significant"


def test_notes_for_people() -> None:
    from fairdeploy.report import single_class_note, skipped_in_words

    assert skipped_in_words({"missing_image": 1, "bad_image": 3}) == (
        "1 missing image file, 3 unreadable images"
    )
    assert single_class_note("fairlrf", np.array([1, 1, 1]), ["no", "yes"]).startswith(
        "fairlrf predicts a single class ('yes') on every test sample"
    )
    assert single_class_note("fairlrf", np.array([0, 1]), ["no", "yes"]) is None


def test_quick_latency_is_the_default(day: dict) -> None:
    lat = day["report"]["latency"]
    assert lat["mode"] == "quick" and "0.5 s" in lat["mode_note"]
    assert {r["scope"] for r in lat["rows"]} == {"whole model", "layer layers.2"}
    assert all(r["iters"] >= 3 for r in lat["rows"])


# --------------------------------------------------------------------------- run folder


def test_run_folder_named_after_the_recipe_file(day: dict) -> None:
    from fairdeploy.commands._common import run_name_stem
    from fairdeploy.recipe import load_recipe

    assert day["run"].name.startswith("features-day-fairlrf-")
    shipped = ROOT / "fairdeploy" / "recipes" / "npz.yaml"
    assert run_name_stem(shipped, load_recipe(shipped)) == "my-features"
    assert run_name_stem(day["tmp"] / "features-day.yaml",
                         load_recipe(day["tmp"] / "features-day.yaml")) == "features-day"


def test_resolved_recipe_paths_are_relative_to_the_run_folder(day: dict, tmp_path: Path) -> None:
    from fairdeploy.recipe import load_recipe, recipe_hash

    text = (day["run"] / "recipe.yaml").read_text()
    assert "path: ../../data.npz" in text
    moved = tmp_path / "moved"
    shutil.copytree(day["tmp"], moved, ignore=shutil.ignore_patterns(".cache"))
    again = load_recipe(moved / "exports" / day["run"].name / "recipe.yaml")
    assert again.data.path.resolve() == (moved / "data.npz").resolve()
    assert again.data.path.is_file()
    assert recipe_hash(again) == day["report"]["recipe"]["hash"]


def test_reference_file_is_capped_and_verify_says_so(day: dict) -> None:
    run = day["run"]
    npz = np.load(run / "model.verify.npz")
    # A row: 8 float32 inputs + 3 float32 logits + int64 label + int64 group = 60 bytes.
    assert npz["inputs"].shape[0] == 4000 // 60 and int(npz["samples_total"]) == 200
    ver = day["report"]["verify"]
    assert ver["samples"] == 200 and ver["reference_file"]["samples"] == 66
    code, out = _invoke("verify", str(run / "model.onnx"))
    assert code == 0, out
    assert "the first 66 of the 200 reference inputs" in out


def test_capped_reference_by_hand() -> None:
    from fairdeploy.export._onnx import capped_reference

    arrays = {"inputs": np.zeros((10, 5), np.float32), "outputs": np.zeros((10, 2), np.float32)}
    assert capped_reference(arrays, None)["inputs"].shape == (10, 5)
    assert capped_reference(arrays, 280)["inputs"].shape == (10, 5)  # 28 bytes a row
    cut = capped_reference(arrays, 100)
    assert cut["inputs"].shape == (3, 5) and cut["outputs"].shape == (3, 2)
    assert int(cut["samples_total"]) == 10
    assert capped_reference(arrays, 1)["inputs"].shape == (1, 5)  # never empty


def test_bench_uses_the_vanilla_export_beside_the_model(day: dict, tmp_path: Path) -> None:
    run = day["run"]
    assert (run / "vanilla.onnx").is_file()
    code, out = _invoke("bench", str(run / "model.onnx"), "--batch", "1", "--iters", "2",
                        "--warmup", "0", "--json", str(tmp_path / "b.json"))
    assert code == 0, out
    assert out.startswith(f"baseline: {run / 'vanilla.onnx'}")
    assert re.search(r"model\.onnx is \d+\.\d\d× (as fast as|slower than) vanilla\.onnx", out)
    assert json.loads((tmp_path / "b.json").read_text())["baseline"] == str(run / "vanilla.onnx")
    # A different file under that name is not taken for the baseline.
    other = tmp_path / "run"
    shutil.copytree(run, other)
    (other / "vanilla.onnx").unlink()
    shutil.copy(run / "model.onnx", other / "vanilla.onnx")
    code, out = _invoke("bench", str(other / "model.onnx"), "--batch", "1", "--iters", "2",
                        "--warmup", "0")
    assert code == 0 and "SHA-256 differs" in out
    assert "as fast as" not in out and "slower than" not in out


# --------------------------------------------------------------------------- verify


def test_verify_with_the_vanilla_checkpoint_explains_the_mismatch(day: dict) -> None:
    tmp, run = day["tmp"], day["run"]
    code, out = _invoke("verify", str(run / "model.onnx"), "--checkpoint", str(tmp / "ckpt.pt"),
                        "--recipe", str(tmp / "features-day.yaml"), "--samples", "40")
    assert code == 1
    assert "records method 'fairlrf'" in out and "a mismatch is expected" in out
    assert "a subset of the 225 test samples" in out
    assert re.search(r"smallest atol that passes at rtol 0\.001: \d", out)
    assert "would pass with" not in out


def test_verify_with_inputs_of_the_wrong_rank_is_one_line(day: dict, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    np.savez(ref, inputs=np.zeros((4, 2, 4), np.float32), outputs=np.zeros((4, 3), np.float32))
    msg = _one_line_error("verify", str(day["run"] / "model.onnx"), "--reference", str(ref))
    assert "(4, 2, 4)" in msg and "(batch, 8)" in msg


def test_tolerance_text_by_hand() -> None:
    from fairdeploy.comparison import compare_outputs, tolerance_text

    ref = np.array([[1.0, -2.0], [0.0, 4.0]])
    got = ref + np.array([[0.002, 0.0], [0.0, -0.001]])
    o = compare_outputs("logits", got, ref, 1e-4, 1e-3, 0.999)
    # atol needed at rtol 1e-3: max(0.002 − 0.001, 0.001 − 0.004) = 0.001;
    # rtol needed at atol 1e-4: max((0.002 − 1e-4)/1, (0.001 − 1e-4)/4) = 0.0019.
    text = tolerance_text(o)
    assert "smallest atol that passes at rtol 0.001: 0.001;" in text
    assert "smallest rtol that passes at atol 0.0001: 0.0019" in text
    assert tolerance_text(compare_outputs("l", ref, ref, 1e-4, 1e-3, 0.999)) == (
        "identical outputs: any atol and rtol pass"
    )


# --------------------------------------------------------------------------- serving


def test_predict_reads_a_headered_csv_by_feature_name(day: dict, tmp_path: Path) -> None:
    run = day["run"]
    rows = day["x"][-3:]
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    with open(tmp_path / "rows.csv", "w") as f:
        f.write(",".join(FEATURES[i] for i in order) + "\n")
        for r in rows:
            f.write(",".join(repr(float(r[i])) for i in order) + "\n")
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = [str(int(k)) for k in sess.run(None, {"input": rows})[0].argmax(1)]
    code, out = _invoke("predict", str(run / "model.onnx"), str(tmp_path / "rows.csv"))
    assert code == 0, out
    assert [ln.split(": ")[1].split()[0] for ln in out.strip().splitlines()] == expected
    ex = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_onnxruntime.py"),
         str(run / "model.onnx"), str(tmp_path / "rows.csv")],
        capture_output=True, text=True, check=True,
    )
    assert [ln.split(": ")[1].split()[0] for ln in ex.stdout.strip().splitlines()] == expected


def test_the_serving_example_has_help() -> None:
    ex = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_onnxruntime.py"), "--help"],
                        capture_output=True, text=True)
    assert ex.returncode == 0 and "usage:" in ex.stdout and "header" in ex.stdout


def test_feature_names_must_fit_the_features(tmp_path: Path) -> None:
    from fairdeploy.data._npz import load_npz_table
    from fairdeploy.errors import FairDeployError
    from fairdeploy.recipe import parse_recipe

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3)), y=np.zeros(4, int), group=np.zeros(4, int),
             split=np.array(["train", "val", "test", "test"]),
             feature_names=np.array(["a", "b"]))
    recipe = parse_recipe({**_recipe_dict(tmp_path / "d.npz")})
    with pytest.raises(FairDeployError, match="has 2 names but 'x' has shape"):
        load_npz_table(recipe.data, recipe.sensitive)
    recipe = parse_recipe({**_recipe_dict(tmp_path / "d.npz"),
                           "data": {"kind": "npz", "path": str(tmp_path / "d.npz"),
                                    "feature_names": ["u", "v", "w"]}})
    table = load_npz_table(recipe.data, recipe.sensitive)
    assert table.preprocessing["features"] == ["u", "v", "w"]


def _recipe_dict(path: Path) -> dict:
    return {
        "model": {"arch": "mlp", "num_classes": 2, "kwargs": {"in_features": 3}},
        "data": {"kind": "npz", "path": str(path)},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "truncated_svd", "layers": [{"layer": "layers.2", "rank": 2}]},
    }


# --------------------------------------------------------------------------- train, compare


def test_rerunning_a_finished_train_keeps_the_checkpoint(day: dict) -> None:
    tmp = day["tmp"]
    before = hashlib.sha256((tmp / "ckpt.pt").read_bytes()).hexdigest()
    code, out = _invoke("train", "--recipe", str(tmp / "features-day.yaml"), "-o",
                        str(tmp / "ckpt.pt"))
    assert code == 0, out
    assert "unchanged: all 3 epochs were already done" in out
    assert hashlib.sha256((tmp / "ckpt.pt").read_bytes()).hexdigest() == before


@pytest.fixture(scope="module")
def compared(day: dict) -> tuple[str, dict]:
    """compare on the day's recipe, each row verified in ONNX Runtime and the reference
    evaluator (and OpenVINO when installed) at export time."""
    from fairdeploy.runtimes import runtime_available

    tmp = day["tmp"]
    runtimes = ["onnxruntime", "reference"] + (["openvino"] if runtime_available("openvino")
                                               else [])
    text = RECIPE.replace("export: {verify_samples: 200,",
                          f"export: {{verify_runtimes: [{', '.join(runtimes)}], "
                          "verify_samples: 200,")
    assert text != RECIPE
    (tmp / "compare-day.yaml").write_text(text)
    code, out = _invoke("compare", str(tmp / "ckpt.pt"), "--recipe",
                        str(tmp / "compare-day.yaml"), "--exports", str(tmp / "exports"),
                        "--out", str(tmp / "cmp"))
    assert code == 0, out
    return out, {"runtimes": runtimes}


def test_compare_reports_what_each_row_was_verified_on_and_in(day: dict, compared) -> None:
    """Issue 19 items 3 and 5: each row is verified on its capped model.verify.npz (66 of
    the 200 export.verify_samples here) and in every runtime the recipe names; the report
    says so, not 200."""
    _, info = compared
    report = json.loads((day["tmp"] / "cmp" / "report.json").read_text())
    rows = [m for m in report["methods"] if m.get("artifact")]
    assert rows
    for m in rows:
        ver = m["artifact"]["verify"]
        assert ver["samples"] == 66 and ver["samples_requested"] == 200
        assert ver["verified_in"] == info["runtimes"] and list(ver["runtimes"]) == info[
            "runtimes"]
        assert all(r["passed"] for r in ver["runtimes"].values())
        npz = np.load(day["tmp"] / "cmp" / m["artifact"]["path"].replace(
            "model.onnx", "model.verify.npz"))
        assert npz["inputs"].shape[0] == ver["samples"] == ver["details"]["n_samples"]
    note = report["artifacts"]["note"]
    assert "on the 66 real test inputs its model.verify.npz holds" in note, note
    assert "200 real test inputs" not in note
    assert "ONNX Runtime, the ONNX reference evaluator" in note
    md = (day["tmp"] / "cmp" / "report.md").read_text()
    assert "66 inputs, ONNX Runtime, the ONNX reference evaluator" in md


def test_compare_shows_the_validation_table_first(day: dict, compared) -> None:
    tmp = day["tmp"]
    out, _ = compared
    assert out.index("Validation split") < out.index("Test split")
    md = (tmp / "cmp" / "report.md").read_text()
    assert md.index("## Validation split") < md.index("## Accuracy and fairness")
    report = json.loads((tmp / "cmp" / "report.json").read_text())
    for m in report["methods"]:
        assert 0 <= m["accuracy"]["val"]["overall"] <= 1
    # Several methods: a run note names the method it belongs to.
    assert any(n.startswith("FairLRF (k=8") for n in report["notes"])


# --------------------------------------------------------------------------- day-one errors


def _image_recipe(tmp: Path, arch: str, crop: int = 20, exporter: str = "dynamo") -> Path:
    text = f"""
export: {{exporter: {exporter}, opset: 18}}
model: {{arch: "{arch}", num_classes: 2}}
data:
  kind: image_csv
  csv: labels.csv
  preprocessing: {{size: {crop}, crop: {crop}}}
sensitive:
  attribute: group
  groups: {{f: [f], m: [m]}}
method:
  name: truncated_svd
  layers: [{{layer: "4", rank: 4}}]
"""
    (tmp / "r.yaml").write_text(text)
    return tmp / "r.yaml"


def test_dry_run_exports_the_vanilla_model_up_front(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    import _tiny_models
    import torch

    torch.save(_tiny_models.pooled_cnn(2).state_dict(), tmp_path / "c.pt")
    start = time.perf_counter()
    # The TorchScript exporter cannot export a 7×7 adaptive pool of 18×18 feature maps.
    msg = _one_line_error("optimize", str(tmp_path / "c.pt"), "--recipe",
                          str(_image_recipe(tmp_path, "_tiny_models:pooled_cnn",
                                            exporter="torchscript")), "--dry-run")
    assert time.perf_counter() - start < 60
    assert "cannot be exported to ONNX" in msg and "adaptive_avg_pool2d" in msg
    assert "data.preprocessing.crop" in msg
    code, out = _invoke("optimize", str(tmp_path / "c.pt"), "--recipe",
                        str(_image_recipe(tmp_path, "_tiny_models:pooled_cnn", crop=23,
                                          exporter="torchscript")), "--dry-run")
    assert code == 0, out  # 23 → 21×21 feature maps: a multiple of 7
    assert "ONNX export: ok: the vanilla model exports to ONNX (input of shape 3×23×23" in out
    # The dynamo exporter (the default) decomposes the pool: the same model exports.
    code, out = _invoke("optimize", str(tmp_path / "c.pt"), "--recipe",
                        str(_image_recipe(tmp_path, "_tiny_models:pooled_cnn")), "--dry-run")
    assert code == 0, out
    assert "ONNX export: ok: the vanilla model exports to ONNX (input of shape 3×20×20" in out


def test_an_arch_module_that_is_not_importable_says_how_to_fix_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    import torch

    torch.save({"weight": torch.zeros(1)}, tmp_path / "c.pt")
    msg = _one_line_error("optimize", str(tmp_path / "c.pt"), "--recipe",
                          str(_image_recipe(tmp_path, "no_such_module_xyz:small_cnn")),
                          "--dry-run")
    assert "'no_such_module_xyz' is not importable" in msg and "PYTHONPATH" in msg


def test_a_symlinked_recipe_says_where_relative_paths_resolve(tmp_path: Path) -> None:
    from fairdeploy.errors import FairDeployError
    from fairdeploy.recipe import load_recipe

    (tmp_path / "pkg" / "recipes").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "data.npz").write_bytes(b"")
    real = tmp_path / "pkg" / "recipes" / "r.yaml"
    real.write_text(json.dumps({**_recipe_dict(Path("../data.npz"))}))
    os.symlink(tmp_path / "pkg" / "recipes", tmp_path / "proj" / "recipes")
    with pytest.raises(FairDeployError) as err:
        load_recipe(tmp_path / "proj" / "recipes" / "r.yaml")
    msg = str(err.value)
    assert "real folder" in msg and str(tmp_path / "pkg" / "data.npz") in msg
    assert str(tmp_path / "proj" / "data.npz") in msg


def test_the_exact_estimator_warns_about_curved_heads() -> None:
    import _tiny_models

    from fairdeploy import Plan

    model = _tiny_models.tanh_mlp(2)
    plan = Plan("fairlrf", [{"layer": "2", "rank": 4, "sr": 0.25, "rr": 0.0}], beta=0.5)
    (text,) = plan.implementation.warnings(plan, model)
    assert "layer 2: the modules after it are not piecewise linear (Tanh)" in text
    relu = Plan("fairlrf", [{"layer": "layers.2", "rank": 4, "sr": 0.25, "rr": 0.0}], beta=0.5)
    from fairdeploy.models import build_model

    assert relu.implementation.warnings(relu, build_model("mlp", 2, in_features=8,
                                                           widths=[16, 16])) == []


# --------------------------------------------------------------------------- cache


def test_cache_ls_clear_and_prune(day: dict, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    shutil.copytree(day["tmp"] / "exports", exports)
    cache = exports / ".cache"
    everything = sorted(p for p in cache.iterdir() if p.is_file())
    # A file entry's checksum record (<name>.check) is part of that entry.
    files = [p for p in everything if not p.name.endswith(".check")]
    code, out = _invoke("cache", "ls", "--exports", str(exports), "--json",
                        str(tmp_path / "ls.json"))
    assert code == 0, out
    listed = json.loads((tmp_path / "ls.json").read_text())["entries"]
    assert sorted(Path(e["path"]).name for e in listed) == [p.name for p in files]
    assert sum(e["size"] for e in listed) == sum(p.stat().st_size for p in everything)
    ckpt = str(day["tmp"] / "ckpt.pt")
    assert all(e["checkpoints"] == [ckpt] for e in listed)
    assert {e["kind"] for e in listed} == {"features", "svd", "hessian", "vanilla"}
    assert "test split at layers.2" in out and ckpt in out
    # prune: make two entries 10 days old, keep what was used within 5 days.
    old = files[:2]
    ten_days = time.time() - 10 * 86400
    for p in old:
        os.utime(p, (ten_days, ten_days))
    code, out = _invoke("cache", "prune", "--keep-days", "5", "--exports", str(exports))
    assert code == 0, out
    assert "removed 2 files, " in out and f"kept {len(files) - 2} files" in out
    assert not any(p.exists() for p in old) and all(p.exists() for p in files[2:])
    (cache / "notes.txt").write_text("mine")
    code, out = _invoke("cache", "clear", "--exports", str(exports))
    assert code == 0 and f"removed {len(files) - 2} files" in out
    assert [p.name for p in cache.iterdir()] == ["notes.txt"]
