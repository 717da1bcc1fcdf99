"""A user's first day, round 2 (issue 20): what the new commands say and write.

One small tabular task (three classes, group 1's labels noisier), a seeded MLP fitted
here, and one ``compare`` and one ``sweep`` run for the module. Checks are made against
the files' own text (table cells counted by splitting on unescaped pipes, directions read
from the stored intervals by hand, label boxes measured by matplotlib's renderer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_nets import write_three_class_task

from fairdeploy.commands.compare import run_compare
from fairdeploy.commands.sweep import run_sweep

RULE = "min eodd s.t. avg_precision >= vanilla - 0.05 and avg_recall >= vanilla - 0.05"


def _recipe(data: Path) -> dict:
    return {
        "model": {"arch": "mlp", "num_classes": 3,
                  "kwargs": {"in_features": 8, "widths": [32, 32]}},
        "data": {"kind": "npz", "path": str(data), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "fairlrf", "beta": 3,
                   "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.75, "rr": 0}],
                   "scoring": {"samples_per_group": 64}},
        "export": {"verify_samples": 100},
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_three_class_task(tmp_path_factory.mktemp("day2"), _recipe)


@pytest.fixture(scope="module")
def compared(task: Path) -> dict:
    result = run_compare(task / "ckpt.pt", task / "r.yaml", out=task / "cmp",
                         exports_dir=task / "exports", progress=False, echo=lambda s: None)
    return {"dir": task / "cmp", "report": result.report}


@pytest.fixture(scope="module")
def swept(task: Path):
    return run_sweep(task / "ckpt.pt", task / "r.yaml", grid=("sr=0.25,0.5", "beta=1/3,5/9"),
                     select=RULE, out=task / "sweep", exports_dir=task / "exports",
                     progress=False, echo=lambda s: None, plots=True)


# --------------------------------------------------------------------------- markdown tables


def _cells(line: str) -> list[str]:
    """A table row's cells: split on pipes that are not escaped with a backslash."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|") and not inner.endswith("\\|"), line
    return re.split(r"(?<!\\)\|", inner[1:-1])


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines():
        if line.lstrip().startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _assert_tables_well_formed(markdown: str) -> int:
    tables = _tables(markdown)
    for table in tables:
        width = len(_cells(table[0]))
        assert len(table) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()), table
        for line in table:
            assert len(_cells(line)) == width, (line, table[0])
    return len(tables)


def test_every_report_table_has_as_many_cells_per_row_as_its_header(compared: dict) -> None:
    md = (compared["dir"] / "report.md").read_text()
    # The verification cells carry |Δ|: escaped, they stay one cell.
    assert "max \\|Δ\\|" in md
    assert _assert_tables_well_formed(md) >= 5


def test_markdown_table_escapes_pipes_in_any_cell() -> None:
    from fairdeploy._text import markdown_table

    text = markdown_table([["a|b", "x\ny", None]], ["h|1", "h2", "h3"])
    assert _assert_tables_well_formed(text) == 1
    assert [c.strip() for c in _cells(text.splitlines()[2])] == ["a\\|b", "x y", ""]


def test_every_sweep_table_is_well_formed(swept) -> None:
    assert _assert_tables_well_formed((swept.out_dir / "sweep.md").read_text()) >= 2
    assert _assert_tables_well_formed((swept.out_dir / "report.md").read_text()) >= 3


# --------------------------------------------------------------------------- sweep verdict


def _by_hand(metric: str, d: dict) -> str:
    if not (d["low"] > 0 or d["high"] < 0):
        return "not significant"
    lower_better = metric in ("eodd", "eopp0", "eopp1")
    return "better" if (d["high"] < 0) == lower_better else "worse"


def test_the_test_verdict_says_how_every_constrained_metric_moved(swept) -> None:
    test = swept.test
    assert test is not None
    for key, verdict_key in (("vs_svd", "verdict"), ("vs_vanilla", "verdict_vs_vanilla")):
        verdict = test[verdict_key]
        moves = {m["metric"]: m for m in verdict["moves"]}
        assert list(moves) == ["eodd", "avg_precision", "avg_recall"]  # objective first
        for metric, move in moves.items():
            expected = _by_hand(metric, test[key][metric])
            assert move["direction"] == expected
            assert f"{metric} {expected} (" in move["text"]
        for metric in ("avg_precision", "avg_recall"):
            assert moves[metric]["text"] in verdict["text"]
    md = (swept.out_dir / "sweep.md").read_text()
    assert "(significant)" not in md
    assert test["verdict"]["text"][1:] in md
    d = test["vs_svd"]["avg_precision"]
    assert f"avg_precision {d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] " \
           f"({_by_hand('avg_precision', d)})" in md


def test_sweep_json_keeps_the_moves(swept) -> None:
    data = json.loads((swept.out_dir / "sweep.json").read_text())
    assert [m["metric"] for m in data["test"]["verdict"]["moves"]] == [
        "eodd", "avg_precision", "avg_recall"]


# --------------------------------------------------------------------------- plots


def _label_boxes(fig) -> list[list]:
    renderer = fig.canvas.get_renderer()
    return [[t.get_window_extent(renderer) for t in ax.texts] for ax in fig.axes]


def _overlaps(a, b) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def _assert_no_label_overlaps(fig) -> int:
    fig.canvas.draw()
    count = 0
    for boxes in _label_boxes(fig):
        count += len(boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not _overlaps(a, b), (a, b)
    return count


def test_tradeoff_plot_shows_validation_first_and_marks_the_collapsed_row(compared) -> None:
    from fairdeploy.report import collapse_reasons, tradeoff_figure

    report = compared["report"]
    # FairLRF at β = 3, sr = 0.75, rr = 0 predicts one class: computed here from the
    # validation predictions' stored class rates, and by hand from the accuracy.
    fair = next(m for m in report["methods"] if m["name"] == "fairlrf")
    rates = fair["class_rates"]["val"]["predicted_rates"]
    assert any(max(row) == 1.0 for row in rates)
    reasons = collapse_reasons(report, "val")
    assert reasons["fairlrf"][0].startswith("predicts only class")
    assert not reasons["truncated_svd"]
    fig = tradeoff_figure(report)
    top, bottom = fig.axes[0], fig.axes[2]
    assert "validation" in top.get_xlabel() and "test" in bottom.get_xlabel()
    texts = [t.get_text() for t in top.texts]
    assert any(t.startswith("⚠ fairlrf") for t in texts), texts
    assert not any("⚠" in t for t in texts if "fairlrf" not in t)
    assert _assert_no_label_overlaps(fig) >= 4
    md = (compared["dir"] / "report.md").read_text()
    assert "Collapsed on the validation split" in md and "predicts only class" in md


def test_tradeoff_labels_do_not_overlap_when_rows_are_close(compared) -> None:
    import copy

    from fairdeploy.report import tradeoff_figure

    report = copy.deepcopy(compared["report"])
    for i, m in enumerate(report["methods"] * 2):  # ten rows a hair apart
        m = copy.deepcopy(m)
        m["name"] = f"{m['name']}-{i}"
        for key in ("metrics", "metrics_val"):
            m[key]["precision"]["avg"] = 0.80 + 0.001 * i
            m[key]["fairness"]["eopp1"] = 0.10 + 0.0005 * (i % 3)
            m[key]["fairness"]["eodd"] = 0.05 + 0.0004 * i
        report["methods"].append(m)
    fig = tradeoff_figure(report)
    assert _assert_no_label_overlaps(fig) >= 4 * 10


def test_pareto_view_is_fitted_to_the_points_that_matter(swept) -> None:
    import dataclasses

    from fairdeploy.sweep import pareto_figure

    rows = list(swept.rows)
    points = [r for r in rows if r.kind == "point" and r.status == "ok" and not r.chosen]
    far = points[0]
    metrics = {**far.metrics, "eodd": {**far.metrics["eodd"], "median": 0.0},
               "avg_precision": {**far.metrics["avg_precision"], "median": 0.05}}
    rows[far.index] = dataclasses.replace(far, metrics=metrics, guard="accuracy too low")
    fig = pareto_figure(rows)
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    kept = [r for r in rows if r.kind != "point" or r.guard in ("ok", "off")]
    xs = [r.value("eodd") for r in kept if r.value("eodd") is not None]
    ys = [r.value("avg_precision") for r in kept if r.value("avg_precision") is not None]
    assert x0 <= min(xs) and max(xs) <= x1 and y0 <= min(ys) and max(ys) <= y1
    # The kept points fill the view (12 % margins), the collapsed one is left out.
    assert (max(ys) - min(ys)) >= 0.7 * (y1 - y0) or max(ys) == min(ys)
    assert not y0 <= 0.05 <= y1
    labels = ax.get_legend_handles_labels()[1]
    assert "rejected by the collapse guard (1 outside this view)" in labels


# --------------------------------------------------------------------------- serving example


def _image_model(path: Path) -> None:
    """A hand-built image classifier (3×4×4 input → 2 classes) with fairdeploy's
    serving metadata: all that predict and the example read."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(48, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    pre = {"kind": "image", "resize": [6, 6], "crop": [4, 4], "mean": [0.5, 0.5, 0.5],
           "std": [0.25, 0.25, 0.25], "input_shape": [3, 4, 4]}
    for key, value in (("preprocessing", pre), ("class_names", ["cat", "dog"])):
        entry = model.metadata_props.add()
        entry.key, entry.value = f"fairdeploy.{key}", json.dumps(value)
    onnx.save(model, path)


def _images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(folder / name)
    good = (folder / "a.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated mid-scan
    (folder / "notes.txt").write_text("not an input")


def test_the_serving_example_skips_like_predict_and_stops_with_strict(tmp_path: Path) -> None:
    import subprocess
    import sys

    from click.testing import CliRunner

    from fairdeploy.cli import main

    _image_model(tmp_path / "m.onnx")
    _images(tmp_path / "photos")
    example = Path(__file__).resolve().parents[1] / "examples" / "serve_onnxruntime.py"
    run = CliRunner().invoke(main, ["predict", str(tmp_path / "m.onnx"),
                                    str(tmp_path / "photos")])
    assert run.exit_code == 0, run.output
    ex = subprocess.run([sys.executable, str(example), str(tmp_path / "m.onnx"),
                         str(tmp_path / "photos")], capture_output=True, text=True)
    assert ex.returncode == 0, ex.stderr
    assert "Traceback" not in ex.stderr
    got = [ln.split(": ")[1].split()[0] for ln in ex.stdout.strip().splitlines()]
    want = [ln.split(": ")[1].split()[0] for ln in run.stdout.strip().splitlines()]
    assert got == want and len(got) == 2  # a.jpg, c.png; b.jpg skipped, notes.txt ignored
    assert ex.stderr.startswith(f"warning: skipped {tmp_path / 'photos' / 'b.jpg'}: ")
    assert "warning: skipped" in run.stderr and "b.jpg" in run.stderr
    strict = subprocess.run([sys.executable, str(example), "--strict", str(tmp_path / "m.onnx"),
                             str(tmp_path / "photos")], capture_output=True, text=True)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert strict.stderr.strip().startswith("error: cannot read") and "b.jpg" in strict.stderr


# --------------------------------------------------------------------------- progress


@pytest.fixture
def log_lines(monkeypatch, capsys):
    from fairdeploy import progress

    monkeypatch.setenv("FAIRDEPLOY_PROGRESS", "lines")

    def read() -> list[str]:
        return [ln for ln in capsys.readouterr().err.splitlines()
                if ln.startswith(progress.PREFIX)]

    return read


def test_a_long_counted_phase_says_where_it_is_with_the_time_left(log_lines, monkeypatch):
    import time

    from fairdeploy import progress

    handle = progress.Phase("training", 10, "step", "lines")
    handle.started -= 20.0
    handle.done = 4
    assert handle.where() == "training: 4/10 steps, 20.0 s elapsed, about 30.0 s left"
    monkeypatch.setattr(progress, "HEARTBEAT_FIRST", 0.05)
    monkeypatch.setattr(progress, "HEARTBEAT_EVERY", 0.1)
    with progress.phase("Hessians", total=4, unit="sample", quiet_below=0) as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.advance()
    lines = log_lines()
    assert re.fullmatch(r"fairdeploy: Hessians: 1/4 samples, 0\.\d s elapsed, about 0\.\d s "
                        r"left", lines[0]), lines
    assert 2 <= len(lines) <= 4 and lines[-1].startswith("fairdeploy: Hessians: 4 samples in")


def test_bench_counts_timed_rounds_and_has_a_default_budget(
    log_lines, tmp_path: Path, monkeypatch
) -> None:
    from fairdeploy import progress
    from fairdeploy.bench import DEFAULT_BENCH_SECONDS, measure_latency
    from fairdeploy.cli import bench

    _image_model(tmp_path / "m.onnx")
    monkeypatch.setattr(progress, "HEARTBEAT_FIRST", 0.0)  # a line at every timed round
    monkeypatch.setattr(progress, "HEARTBEAT_EVERY", 0.0)
    result = measure_latency(tmp_path / "m.onnx", tmp_path / "m.onnx", batches=(1, 2), iters=7,
                             warmup=0, max_seconds=1e-9, min_iters=2, progress=True)
    assert [t.iters for t in result.timings] == [2, 2, 2, 2]  # the budget cut every batch
    counts = [re.match(r"fairdeploy: latency: whole model: (\d+)/14 timed rounds", ln)
              for ln in log_lines()]
    done = [int(m.group(1)) for m in counts if m]
    # 2 rounds timed per batch size, the 5 the budget cut counted at once: the bar ends full.
    assert done == [1, 2, 7, 8, 9, 14]
    budget = next(p for p in bench.params if p.name == "max_seconds")
    assert budget.default == DEFAULT_BENCH_SECONDS == 20.0


def test_weight_hessians_report_every_chunk() -> None:
    from _tiny_nets import small_conv_net

    from fairdeploy.weight_hessian import group_weight_hessians

    torch.manual_seed(0)
    x, y = torch.randn(23, 2, 6, 6), torch.randint(0, 3, (23,))
    groups = np.array([0] * 10 + [1] * 11 + [-1] * 2)
    seen: list[int] = []
    group_weight_hessians(small_conv_net(), ["4.weight"], x, y, groups, batch_size=4,
                          on_chunk=seen.append)
    assert seen == [4, 4, 2, 4, 4, 3]  # group 0: 10 samples, group 1: 11; unknown left out


# --------------------------------------------------------------------------- errors, small ones


def _cli(*args: str):
    from click.testing import CliRunner

    from fairdeploy.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_refused_sweep_leaves_no_folder(task: Path, tmp_path: Path) -> None:
    for where in (["--exports", tmp_path / "exports"], ["--out", tmp_path / "out"]):
        r = _cli("sweep", task / "ckpt.pt", "--recipe", task / "r.yaml", "--grid", "sr=0.5",
                 "--select", "min foo", *where)
        assert r.exit_code == 1 and r.output.startswith("Error: --select 'min foo'")
        r = _cli("sweep", tmp_path / "missing.pt", "--recipe", task / "r.yaml", "--grid",
                 "sr=0.5", *where)
        assert r.exit_code == 1 and "missing.pt" in r.output
    assert list(tmp_path.iterdir()) == []


def test_file_too_large_names_the_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A file size limit (ulimit -f) makes write() fail without a file name; Python ignores
    # SIGXFSZ, so the write raises EFBIG. Run in a child: the limit must not hit pytest.
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from fairdeploy._io import atomic_write_bytes\n"
        "from fairdeploy.sweep import Journal\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "out = Path(sys.argv[1])\n"
        "for what in ('atomic', 'journal'):\n"
        "    try:\n"
        "        if what == 'atomic':\n"
        "            atomic_write_bytes(out / 'plot.png', b'x' * 10000)\n"
        "        else:\n"
        "            with Journal(out / 'sweep.jsonl', {'a': 1}) as j:\n"
        "                j.append({'key': 'k', 'v': 'x' * 10000})\n"
        "    except OSError as exc:\n"
        "        print(exc.errno, exc.filename)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.stdout.split("\n")[:2] == [f"27 {tmp_path / 'plot.png'}",
                                          f"27 {tmp_path / 'sweep.jsonl'}"], run.stderr
    assert not (tmp_path / "plot.png").exists()  # nothing half-written


def test_version_short_flag() -> None:
    assert _cli("-V").output == _cli("--version").output
    assert _cli("-V").exit_code == 0 and "version" in _cli("-V").output


def test_train_says_its_1_epoch(task: Path, tmp_path: Path) -> None:
    args = ("train", "--recipe", task / "r.yaml", "-o", tmp_path / "c.pt", "--epochs", "1")
    assert _cli(*args).exit_code == 0
    again = _cli(*args)
    assert "(unchanged: its 1 epoch was already done;" in again.output, again.output
    assert "all 1 epochs" not in again.output


def test_sweep_next_step_names_the_checkpoint(task: Path) -> None:
    r = _cli("sweep", task / "ckpt.pt", "--recipe", task / "r.yaml", "--grid", "sr=0.25,0.5",
             "--grid", "beta=1/3,5/9", "--select", RULE, "--out", task / "cli-sweep",
             "--exports", task / "exports", "--no-plots")
    assert r.exit_code == 0, r.output
    assert f"deploy it with fairdeploy optimize {task / 'ckpt.pt'} --recipe " in r.output
    assert "CHECKPOINT" not in r.output and "(significant)" not in r.output
    assert re.search(r"avg_recall [+-]\d\.\d{4} \[.*\] \((better|worse|not significant)\)",
                     r.output)


def test_a_slowdown_says_slower() -> None:
    from fairdeploy.bench import LatencyResult, Timing

    result = LatencyResult(
        [Timing("candidate", 1, 1.0, 1.1, 9), Timing("baseline", 1, 0.94, 1.0, 9),
         Timing("candidate", 8, 1.0, 1.1, 9), Timing("baseline", 8, 2.0, 2.1, 9)],
        ratios={1: 0.94, 8: 2.0},
    )
    lines = result.summary_lines({"candidate": "model.onnx", "baseline": "vanilla.onnx"})
    assert "  at batch 1: model.onnx is 1.06× slower than vanilla.onnx (0.94× its speed)" in lines
    assert "  at batch 8: model.onnx is 2.00× as fast as vanilla.onnx" in lines


def test_provider_cuda_without_cuda_is_one_warning_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback warning to check")
    _image_model(tmp_path / "m.onnx")
    _images(tmp_path / "p")
    run = subprocess.run([sys.executable, "-m", "fairdeploy.cli", "predict", "--provider",
                          "cuda", str(tmp_path / "m.onnx"), str(tmp_path / "p" / "a.jpg")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("warning: CUDAExecutionProvider is not available")
    assert "UserWarning" not in run.stderr and ".py:" not in run.stderr


def test_dry_run_checks_the_device(task: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = _cli("optimize", task / "ckpt.pt", "--recipe", task / "r.yaml", "--dry-run",
             "--device", "cuda")
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: --device cuda: no CUDA device is available to PyTorch; "
                                "use --device cpu")


# --------------------------------------------------------------------------- verify int8


def test_verify_int8_out_of_the_box_with_its_recorded_tolerances(task: Path) -> None:
    import onnxruntime as ort

    from fairdeploy.commands.optimize import run_optimize
    from fairdeploy.export import read_metadata

    recipe = _recipe(task / "data.npz")
    recipe["method"] = {"name": "truncated_svd", "layers": [{"layer": "layers.2", "rank": 8}]}
    recipe["export"] = {"verify_samples": 100, "quantize": "int8", "int8": {"mode": "dynamic"}}
    (task / "int8.yaml").write_text(yaml.safe_dump(recipe))
    run_optimize(task / "ckpt.pt", task / "int8.yaml", out=task / "int8", latency=False,
                 exports_dir=task / "exports", progress=False, echo=lambda s: None)
    int8 = task / "int8" / "model.int8.onnx"
    own = read_metadata(int8)["int8"]["verify"]
    report = json.loads((task / "int8" / "report.json").read_text())
    assert own["atol"] == pytest.approx(report["int8"]["verify"]["atol"])
    assert (own["rtol"], own["argmax_agreement"]) == (0.02, 0.98)
    assert own["reference"] == "model.verify.npz"
    r = _cli("verify", int8)
    assert r.exit_code == 0, r.output
    assert "tolerances recorded in the model's metadata (int8)" in r.output
    assert "reference: model.verify.npz beside the model" in r.output
    assert r.output.strip().splitlines()[-1].startswith("PASSED")
    # The recorded atol, checked by hand against ONNX Runtime's int8 outputs.
    ref = np.load(task / "int8" / "model.verify.npz")
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ref["inputs"]})[0]
    err = np.abs(got - ref["outputs"])
    assert (err <= own["atol"] + own["rtol"] * np.abs(ref["outputs"])).all()
    # Given tolerances win; the float model keeps its own defaults.
    strict = _cli("verify", int8, "--atol", "1e-6", "--rtol", "0")
    assert strict.exit_code == (0 if err.max() <= 1e-6 else 1)
    assert "tolerances recorded" not in strict.output
    assert _cli("verify", task / "int8" / "model.onnx").exit_code == 0
