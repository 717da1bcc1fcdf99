"""``fairdeploy sweep``: grid, selection rule, collapse guard, scoring draws, resume.

References are independent of the code under test: scikit-learn for accuracy, balanced
accuracy and per-group precision, ONNX Runtime running the exported model for the chosen
point's validation metrics, brute-force counts for scoring sets and class rates, and
hand-built values for the grammar, the grid and the guard. The end-to-end cases run on a
small tabular task built here (nothing downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from _tiny_nets import three_class_arrays, three_class_recipe, trained_mlp
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_score

from fairdeploy.cli import main
from fairdeploy.commands.compare import run_compare
from fairdeploy.commands.optimize import run_optimize
from fairdeploy.commands.sweep import run_sweep
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.metrics import selection_overlap, spread, summary_metrics
from fairdeploy.models import build_model
from fairdeploy.plan import Plan
from fairdeploy.recipe import load_recipe, parse_recipe
from fairdeploy.sweep import (
    CSV_COLUMNS,
    grid_points,
    guard_reasons,
    pareto_front,
    parse_grid,
    parse_selection,
)

# --------------------------------------------------------------------------- a small task


def _recipe(data: Path, **extra) -> dict:
    return three_class_recipe(data, **{"export": {"verify_samples": 100}, **extra})


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    arrays = three_class_arrays()
    np.savez(tmp / "data.npz", **arrays)
    # The same data with the test split's labels shuffled: a choice made on validation
    # cannot change when only test labels do.
    shuffled = dict(arrays)
    test = np.flatnonzero(arrays["split"] == "test")
    y = arrays["y"].copy()
    y[test] = np.random.default_rng(1).permutation(y[test])
    shuffled["y"] = y
    np.savez(tmp / "shuffled.npz", **shuffled)
    torch.save(trained_mlp(arrays).state_dict(), tmp / "ckpt.pt")
    (tmp / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp / "data.npz")))
    (tmp / "r_shuffled.yaml").write_text(yaml.safe_dump(_recipe(tmp / "shuffled.npz")))
    return tmp


GRID = ("sr=0.25:0.75:0.25", "rr=0,0.5", "beta=1/3,5/9")
RULE = "min eodd s.t. avg_precision >= vanilla - 0.01"


def _sweep(task: Path, out: str, **kw):
    kw.setdefault("grid", GRID)
    kw.setdefault("progress", False)
    kw.setdefault("echo", lambda s: None)
    kw.setdefault("plots", False)
    recipe = kw.pop("recipe", task / "r.yaml")
    return run_sweep(task / "ckpt.pt", recipe, out=task / out, exports_dir=task / "exports",
                     **kw)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


# --------------------------------------------------------------------------- the grid


def test_grid_values_ranges_fractions_and_errors() -> None:
    grid = parse_grid(["beta=1/3,5/9,0.8", "sr=0:0.9:0.1", "rank=16,64", "layer=all"])
    assert list(grid) == ["layer", "rank", "sr", "beta"]  # outermost first
    assert grid["sr"] == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # stop included
    assert grid["beta"] == (1 / 3, 5 / 9, 0.8)
    assert grid["rank"] == (16, 64) and grid["layer"] == ("all",)
    assert parse_grid({"rr": [0, "1/2", 0.5]})["rr"] == (0.0, 0.5)  # duplicates dropped
    for bad, message in [
        (["sr=1.5"], "use numbers in [0, 1]"),
        (["rank=2.5"], "integers ≥ 1"),
        (["beta=-1"], "≥ 0"),
        (["sr=0:1"], "start:stop:step"),
        (["sr=0.5:0.1:0.1"], "below start"),
        (["sr=0:1:0"], "step must be > 0"),
        (["k=16"], "unknown key"),
        (["sr"], "KEY=VALUES"),
        (["sr=0.1", "sr=0.2"], "given twice"),
        (["layer=all,layers.0"], "give it alone"),
    ]:
        with pytest.raises(FairDeployError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_grid(bad)


def test_grid_points_are_validated_plans_and_invalid_ranks_are_kept(task: Path) -> None:
    recipe = load_recipe(task / "r.yaml")
    model = build_model("mlp", 3, in_features=8, widths=(32, 32))
    grid = parse_grid(["layer=all", "sr=0.5", "beta=0.3"])
    points = grid_points(recipe.method, grid, model, repeats=3)
    assert [p.settings["layer"] for p in points] == ["layers.0", "layers.2", "layers.4"]
    first = points[0].plan
    assert first.layers[0].rank == 8 and first.layers[0].sr == 0.5  # the plan's own rank
    assert first.layers[0].beta == 0.3 and first.beta == 0.3 and first.scoring.repeats == 3
    assert first.layers[0].rr == 0.0  # not in the grid: the plan's own rr
    assert points[1].reference == Plan("truncated_svd", [{"layer": "layers.2", "rank": 8}])
    # layers.4 is 32 → 3: rank 8 does not fit; the point stays, marked with the reason.
    assert points[2].plan is None and "rank 8" in points[2].invalid
    # SLR-w reads no β: its points ignore the β values instead of repeating.
    both = grid_points(recipe.method, parse_grid(["sr=0.5", "beta=0.3,0.6"]), model,
                       methods=["fairlrf", "slr_w"])
    assert [p.method for p in both] == ["fairlrf", "fairlrf", "slr_w"]
    with pytest.raises(FairDeployError, match="none of the swept methods"):
        grid_points(recipe.method, parse_grid(["beta=0.3"]), model, methods=["slr_w"])
    with pytest.raises(FairDeployError, match=r"not an nn\.Linear"):
        grid_points(recipe.method, parse_grid(["layer=layers.1"]), model)


# --------------------------------------------------------------------------- the rule


def test_selection_grammar() -> None:
    s = parse_selection("min eodd s.t. avg_precision >= vanilla - 0.01")
    assert (s.goal, s.metric) == ("min", "eodd")
    (c,) = s.constraints
    assert c.bound({"vanilla": 0.8}) == pytest.approx(0.79)
    assert c.holds(0.79, {"vanilla": 0.8}) and not c.holds(0.7899, {"vanilla": 0.8})
    assert s.guard_tolerance() == 0.01
    s = parse_selection("MAX precision where eopp <= 0.8 * vanilla and cr > 1.5 & "
                        "accuracy >= svd - 2% , macro_recall >= vanilla - 0.03")
    assert s.metric == "avg_precision"
    assert [c.metric for c in s.constraints] == ["eopp1", "cr", "accuracy", "balanced_accuracy"]
    assert s.constraints[0].bound({"vanilla": 0.1}) == pytest.approx(0.08)
    assert s.constraints[2].bound({"svd": 0.9}) == pytest.approx(0.88)
    assert not s.constraints[1].holds(1.5, {}) and s.constraints[1].holds(1.51, {})
    assert s.guard_tolerance() == pytest.approx(0.03)  # the largest "vanilla - t"
    assert parse_selection("min eodd s.t. eodd <= vanilla").constraints[0].holds(
        0.1, {"vanilla": 0.1}
    )
    assert not parse_selection("min eodd s.t. accuracy >= svd").constraints[0].holds(
        0.9, {"svd": None}
    )  # an undefined reference fails the constraint
    for bad, where in [
        ("", "empty"),
        ("lowest eodd", "starts with min or max"),
        ("min eod", "expected a metric"),
        ("min eodd avg_precision", "expected s.t."),
        ("min eodd s.t. accuracy = vanilla", "unexpected"),
        ("min eodd s.t. accuracy >= vanila", "expected a number, vanilla or svd"),
        ("min eodd s.t. accuracy >= vanilla - 0.01 or cr > 2", "expected 'and'"),
        ("min eodd s.t.", "expected a metric, found the end"),
    ]:
        with pytest.raises(FairDeployError, match=where) as info:
            parse_selection(bad)
        assert "min|max METRIC" in str(info.value)  # the grammar is in every message


def test_guard_reasons_on_hand_built_metrics() -> None:
    vanilla = {"accuracy": 0.80, "balanced_accuracy": 0.70,
               "predicted_rates": [[0.60, 0.40], [0.50, 0.50]]}
    fine = {"accuracy": 0.795, "balanced_accuracy": 0.695,
            "predicted_rates": [[0.70, 0.30], [0.45, 0.55]]}
    names = {"class_names": ["no", "yes"], "group_names": ["f", "m"]}
    assert guard_reasons([fine], vanilla, tolerance=0.01, **names) == []
    collapsed = {"accuracy": 0.80, "balanced_accuracy": 0.70,
                 "predicted_rates": [[0.81, 0.19], [0.50, 0.50]]}
    (reason,) = guard_reasons([collapsed], vanilla, tolerance=0.01, **names)
    assert "group 'f' predicts class 'yes' for 19.0 %" in reason
    worse = {"accuracy": 0.78, "balanced_accuracy": 0.68,
             "predicted_rates": vanilla["predicted_rates"]}
    reasons = guard_reasons([fine, worse], vanilla, tolerance=0.01, seeds=[4, 5], **names)
    assert len(reasons) == 2 and reasons[0].startswith("draw seed 5: accuracy 0.7800")
    assert guard_reasons([worse], vanilla, tolerance=0.05, **names) == []


# --------------------------------------------------------------------------- summaries


def test_summary_metrics_match_sklearn_and_brute_force() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 3, 500))
    g = rng.integers(-1, 2, 500)  # some unknown groups
    m = summary_metrics(y, p, g, privileged=1, num_classes=3)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    per_group = [precision_score(y[g == k], p[g == k], average="macro", zero_division=0)
                 for k in (0, 1)]
    assert m["avg_precision"] == pytest.approx(np.mean(per_group))
    for k in (0, 1):
        for c in range(3):
            assert m["predicted_rates"][k][c] == pytest.approx(
                sum(1 for i in range(500) if g[i] == k and p[i] == c) / (g == k).sum()
            )


def test_spread_overlap_and_pareto_front_by_hand() -> None:
    assert spread([0.3, None, 0.1, 0.2]) == {
        "median": 0.2, "min": 0.1, "max": 0.3, "values": [0.3, None, 0.1, 0.2]
    }
    over = selection_overlap([
        {"l": {"rows": [1, 2, 3], "cols": []}},
        {"l": {"rows": [2, 3, 4], "cols": []}},
        {"l": {"rows": [1, 2, 3], "cols": []}},
    ])
    # pairs: 2/4, 1, 2/4
    assert over["l"]["rows"] == {"mean": pytest.approx(2 / 3), "min": 0.5}
    assert over["l"]["cols"] == {"mean": 1.0, "min": 1.0}
    pts = [(0.05, 0.80), (0.03, 0.78), (0.04, 0.82), (0.06, 0.70), (0.03, 0.77)]
    assert pareto_front(pts) == [1, 2]


# --------------------------------------------------------------------------- scoring draws


def test_samples_per_group_all_auto_and_draws(task: Path) -> None:
    arrays = dict(np.load(task / "data.npz"))
    train = arrays["split"] == "train"
    counts = [int(((arrays["group"] == k) & train).sum()) for k in (0, 1)]
    r = _recipe(task / "data.npz")
    r["method"]["scoring"] = {}  # auto: tabular data → every training sample of each group
    exp = Experiment(parse_recipe(r), task / "ckpt.pt")
    (draw,) = exp.draws(exp.recipe.method)
    assert draw.scoring.samples_per_group == "all" and draw.scoring.repeats == 1
    drawn = exp.context.scoring_set(exp.recipe.method.scoring)
    assert list(drawn.sizes) == counts
    assert sorted(drawn.indices.tolist()) == np.flatnonzero(train[: train.sum()]).tolist()
    # auto with repeats > 1 draws 1024 per group (capped by the smaller group), seeds 0..2.
    r["method"]["scoring"] = {"repeats": 3, "samples_per_group": 100}
    exp = Experiment(parse_recipe(r), task / "ckpt.pt")
    draws = exp.draws(exp.recipe.method)
    assert [d.scoring.seed for d in draws] == [0, 1, 2]
    sets = [exp.context.scoring_set(d.scoring) for d in draws]
    assert all(s.sizes == (100, 100) for s in sets)
    assert len({tuple(s.indices) for s in sets}) == 3  # three different draws
    # Drawn together (one trunk pass over their union), each draw is what a plan of that
    # draw alone computes.
    runs = [exp.apply(d) for d in draws]
    alone = Experiment(parse_recipe(r), task / "ckpt.pt").apply(draws[2])
    assert alone.selections == runs[2].selections
    assert exp.apply(exp.recipe.method).selections == runs[0].selections
    with pytest.raises(FairDeployError, match="samples_per_group: all"):
        Plan("fairlrf", [{"layer": "layers.2", "rank": 8}],
             scoring={"samples_per_group": "all", "repeats": 2})


def test_compare_reports_the_spread_over_draws(task: Path) -> None:
    r = _recipe(task / "data.npz", compare=["truncated_svd", "fairlrf"])
    r["method"]["layers"][0]["sr"] = 0.5
    r["method"]["scoring"] = {"samples_per_group": 64, "repeats": 3}
    (task / "r_rep.yaml").write_text(yaml.safe_dump(r))
    result = run_compare(task / "ckpt.pt", task / "r_rep.yaml", out=task / "cmp",
                         exports_dir=task / "exports", progress=False, echo=lambda s: None)
    entry = next(m for m in result.report["methods"] if m["name"] == "fairlrf")
    block = entry["draws"]
    assert block["draws"] == 3 and block["seeds"] == [0, 1, 2]
    exp = Experiment(parse_recipe(r), task / "ckpt.pt")
    eodd = [exp.evaluate(exp.apply(d), "test").eodd for d in exp.draws(exp.recipe.method)]
    got = block["metrics"]["test"]["eodd"]
    assert got["values"] == pytest.approx(eodd)
    assert got["median"] == pytest.approx(float(np.median(eodd)))
    assert (got["min"], got["max"]) == (pytest.approx(min(eodd)), pytest.approx(max(eodd)))
    assert "val" in block["metrics"]  # compare also shows the validation split
    assert "Spread over scoring draws" in (task / "cmp" / "report.md").read_text()
    assert "draws" not in next(m for m in result.report["methods"] if m["name"] == "vanilla")


# --------------------------------------------------------------------------- end to end


def test_sweep_chooses_on_validation_and_optimize_reproduces_the_row(task: Path) -> None:
    result = _sweep(task, "s1", select=RULE, write_recipe=task / "chosen.yaml", plots=True)
    rows = result.rows
    points = [r for r in rows if r.kind == "point"]
    assert len(points) == 3 * 2 * 2 and rows[0].kind == "vanilla"
    chosen = result.chosen
    assert chosen is not None and chosen.chosen
    vanilla = rows[0]
    # The rule, checked by brute force over the table: chosen is feasible and minimal.
    feasible = [
        r for r in points
        if r.guard == "ok" and r.value("avg_precision") >= vanilla.value("avg_precision") - 0.01
    ]
    assert chosen in feasible
    assert chosen.value("eodd") == min(r.value("eodd") for r in feasible)
    # The guard column agrees with the numbers it reports.
    for r in points:
        low = r.value("accuracy") < vanilla.value("accuracy") - 0.01 - 1e-12
        assert not low or r.guard.startswith("accuracy")
    # The files: csv with the documented columns, plots, the report, the chosen recipe.
    text = (result.out_dir / "sweep.csv").read_text().splitlines()
    assert tuple(text[0].split(",")) == CSV_COLUMNS and len(text) == 1 + len(rows)
    assert {p.name for p in (result.out_dir / "plots").iterdir()} == {
        "fig4_sr.png", "fig4_rr.png", "fig4_beta.png", "pareto.png"
    }
    report = json.loads((result.out_dir / "report.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["vanilla", "truncated_svd", "fairlrf"]
    assert "truncated_svd" in report["bootstrap_vs_truncated_svd"]["intervals"]
    assert result.test["verdict"]["text"][1:] in (result.out_dir / "sweep.md").read_text()

    # optimize turns the written recipe into the deployed model; its validation figures
    # are the sweep row's.
    opt = run_optimize(task / "ckpt.pt", task / "chosen.yaml", out=task / "deployed",
                       exports_dir=task / "exports", latency=False, progress=False,
                       echo=lambda s: None)
    assert opt.plan == chosen.plan
    val = opt.report["methods"][1]["metrics_val"]
    assert val["fairness"]["eodd"] == pytest.approx(chosen.value("eodd"), abs=1e-12)
    assert val["precision"]["avg"] == pytest.approx(chosen.value("avg_precision"), abs=1e-12)

    # Independently: ONNX Runtime runs the deployed model on the validation inputs and
    # scikit-learn scores them; the constraint holds against vanilla scored the same way.
    arrays = dict(np.load(task / "data.npz"))
    val_rows = arrays["split"] == "val"
    x, y, g = arrays["x"][val_rows], arrays["y"][val_rows], arrays["group"][val_rows]
    session = ort.InferenceSession(str(task / "deployed" / "model.onnx"))
    pred = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    model = build_model("mlp", 3, in_features=8, widths=(32, 32))
    model.load_state_dict(torch.load(task / "ckpt.pt", weights_only=True))
    with torch.no_grad():
        base = model.eval()(torch.as_tensor(x)).argmax(1).numpy()

    def avg_precision(p: np.ndarray) -> float:
        return float(np.mean([precision_score(y[g == k], p[g == k], average="macro",
                                              zero_division=0) for k in (0, 1)]))

    assert avg_precision(pred) == pytest.approx(chosen.value("avg_precision"), abs=1e-9)
    assert avg_precision(pred) >= avg_precision(base) - 0.01
    assert accuracy_score(y, pred) >= accuracy_score(y, base) - 0.01  # the guard


def test_the_choice_never_reads_the_test_split(task: Path) -> None:
    a = _sweep(task, "lab_a", select=RULE)
    b = _sweep(task, "lab_b", select=RULE, recipe=task / "r_shuffled.yaml")
    assert a.chosen.index == b.chosen.index and a.chosen.plan == b.chosen.plan
    assert (a.out_dir / "sweep.csv").read_text() == (b.out_dir / "sweep.csv").read_text()
    # The test split was read for the chosen point only, and its labels did change that.
    assert a.test["metrics"]["vanilla"] != b.test["metrics"]["vanilla"]


def test_repeats_with_the_same_seeds_are_identical(task: Path) -> None:
    a = _sweep(task, "rep_a", grid=("sr=0.5,0.75", "beta=5/9"), repeats=3, select=RULE)
    b = _sweep(task, "rep_b", grid=("sr=0.5,0.75", "beta=5/9"), repeats=3, select=RULE)
    assert (a.out_dir / "sweep.csv").read_bytes() == (b.out_dir / "sweep.csv").read_bytes()
    assert (a.out_dir / "sweep.json").read_bytes() == (b.out_dir / "sweep.json").read_bytes()
    point = next(r for r in a.rows if r.kind == "point")
    assert len(point.draws) == 3 and point.seeds == (0, 1, 2)
    assert point.metrics["eodd"]["median"] == pytest.approx(
        float(np.median(point.metrics["eodd"]["values"]))
    )
    assert point.overlap["layers.2"]["rows"]["mean"] <= 1.0
    # The draws are real draws: some selection differs between them.
    assert any(r.overlap["layers.2"]["rows"]["min"] < 1.0 for r in a.rows if r.kind == "point")


def test_resume_gives_the_same_table_as_an_uninterrupted_run(task: Path) -> None:
    whole = _sweep(task, "whole", select=RULE, repeats=2)
    calls: list[int] = []

    def stop_after_five(done: int, total: int) -> None:
        calls.append(done)
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(task, "resumed", select=RULE, repeats=2, on_evaluation=stop_after_five)
    journal = task / "resumed" / "sweep.jsonl"
    assert len(journal.read_text().splitlines()) == 1 + 5  # header + five records
    assert not (task / "resumed" / "sweep.csv").exists()
    # A kill in the middle of a write leaves half a line: it is dropped and redone.
    with journal.open("a") as f:
        f.write('{"key": "abc", "metr')
    seen: list[int] = []
    again = _sweep(task, "resumed", select=RULE, repeats=2,
                   on_evaluation=lambda done, total: seen.append(done))
    assert seen[0] == 5  # the five saved ones were not evaluated again
    assert (again.out_dir / "sweep.csv").read_bytes() == (whole.out_dir / "sweep.csv").read_bytes()
    assert again.chosen.index == whole.chosen.index
    # A rerun of the finished sweep evaluates nothing.
    seen.clear()
    _sweep(task, "resumed", select=RULE, repeats=2, on_evaluation=lambda d, t: seen.append(d))
    assert seen == [seen[0]] and seen[0] == len(journal.read_text().splitlines()) - 1


def test_another_checkpoint_is_refused_in_the_same_folder(task: Path) -> None:
    _sweep(task, "mine", grid=("sr=0.5",))
    other = trained_mlp(three_class_arrays(seed=0))
    with torch.no_grad():
        other.layers[0].weight.mul_(1.01)
    torch.save(other.state_dict(), task / "other.pt")
    with pytest.raises(FairDeployError, match="holds a sweep of another checkpoint_sha256"):
        run_sweep(task / "other.pt", task / "r.yaml", grid=["sr=0.5"], out=task / "mine",
                  progress=False, echo=lambda s: None, plots=False)
    done = run_sweep(task / "other.pt", task / "r.yaml", grid=["sr=0.5"], out=task / "mine",
                     progress=False, echo=lambda s: None, plots=False, restart=True)
    assert len(done.rows) == 3
    (task / "notmine").mkdir()
    (task / "notmine" / "thesis.tex").write_text("keep me")
    with pytest.raises(FairDeployError, match="not a fairdeploy sweep folder"):
        _sweep(task, "notmine")


def test_cli_sweep_layer_table_no_solution_and_bad_input(task: Path) -> None:
    code, out = _invoke(
        "sweep", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"), "--grid", "layer=all",
        "--grid", "sr=0.25", "--out", str(task / "cli"), "--exports", str(task / "exports"),
        "--no-plots", "--select", "min eodd s.t. avg_precision >= vanilla + 0.5",
    )
    assert code == 1, out
    assert "no point satisfies" in out and "1 invalid for this model" in out
    md = (task / "cli" / "sweep.md").read_text()
    assert "Per layer (the paper's Table 3)" in md and "invalid: " in md
    assert not (task / "cli" / "chosen.yaml").exists()
    csv_rows = (task / "cli" / "sweep.csv").read_text().splitlines()
    assert sum("invalid: " in line for line in csv_rows) == 1
    code, out = _invoke("sweep", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"),
                        "--grid", "sr=0.5", "--select", "min eodd s.t. acc >= vanila",
                        "--exports", str(task / "exports"))
    assert code == 1 and out.startswith("Error: --select") and "Traceback" not in out
    code, out = _invoke("sweep", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"),
                        "--exports", str(task / "exports"))
    assert code == 1 and "no grid" in out


def test_recipe_sweep_section(task: Path) -> None:
    r = _recipe(task / "data.npz", sweep={"grid": {"sr": "0.25:0.5:0.25", "beta": ["1/3", 0.5]},
                                          "select": RULE, "guard_tolerance": 0.02})
    (task / "r_sweep.yaml").write_text(yaml.safe_dump(r))
    recipe = load_recipe(task / "r_sweep.yaml")
    assert recipe.sweep.grid == {"sr": [0.25, 0.5], "beta": [1 / 3, 0.5]}
    assert recipe.method == load_recipe(task / "r.yaml").method
    from fairdeploy.recipe import recipe_hash

    assert recipe_hash(recipe) == recipe_hash(load_recipe(task / "r.yaml"))  # not in the hash
    # --grid replaces the recipe's entry of that key only.
    result = _sweep(task, "sect", recipe=task / "r_sweep.yaml", grid=("beta=0.4",))
    assert [r.settings["sr"] for r in result.rows if r.kind == "point"] == [0.25, 0.5]
    assert {r.settings["beta"] for r in result.rows if r.kind == "point"} == {0.4}
    assert result.chosen is not None  # the recipe's rule
    bad = _recipe(task / "data.npz", sweep={"grid": {"sr": "0:2:0.5"}})
    (task / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(FairDeployError, match=r"bad.yaml:\d+: sweep.grid: .*\[0, 1\]"):
        load_recipe(task / "bad.yaml")
    bad = _recipe(task / "data.npz", sweep={"select": "min eod"})
    (task / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(FairDeployError, match=r"sweep.select: .*expected a metric"):
        load_recipe(task / "bad.yaml")


def test_dry_run_says_what_all_costs_on_images(task: Path) -> None:
    from fairdeploy.commands.optimize import dry_run

    r = _recipe(task / "data.npz")
    r["data"] = {"kind": "image_csv", "csv": str(task / "images.csv")}
    r["method"]["scoring"] = {"samples_per_group": "all"}
    (task / "img.yaml").write_text(yaml.safe_dump(r))
    # The MLP does not take images: only the sampling note is looked at here.
    info = dry_run(task / "ckpt.pt", task / "img.yaml", export_check=False)
    assert any("every image of the training split" in w for w in info.warnings)
    tabular = dry_run(task / "ckpt.pt", task / "r.yaml")
    assert not any("training split" in w for w in tabular.warnings)
