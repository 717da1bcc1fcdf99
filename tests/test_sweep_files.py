"""What a sweep may replace, and what it trusts (issue 21 items 1, 3, 4, 5).

The journal's records carry checksums: an edited record is recomputed, so the results
equal an untouched run's. ``--write-recipe`` replaces only a recipe a sweep wrote,
unchanged since, never the input recipe or checkpoint, and needs a rule. A rerun
replaces only the result files and plots it wrote, unchanged since.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from _tiny_nets import write_three_class_task
from test_sweep import _recipe

from fairdeploy.commands.sweep import run_sweep
from fairdeploy.errors import FairDeployError

RULE = "min eodd s.t. avg_precision >= vanilla - 0.05"
GRID = ("sr=0.25,0.5", "beta=5/9")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_three_class_task(tmp_path_factory.mktemp("sweepfiles"), _recipe)


def _sweep(task: Path, out: Path, **kw):
    kw.setdefault("grid", GRID)
    kw.setdefault("select", RULE)
    kw.setdefault("plots", False)
    return run_sweep(task / "ckpt.pt", task / "r.yaml", out=out, exports_dir=task / "exports",
                     progress=False, echo=kw.pop("echo", lambda s: None), **kw)


def test_an_edited_journal_record_is_recomputed_and_noted(task: Path, tmp_path: Path) -> None:
    first = _sweep(task, tmp_path / "a")
    csv = (tmp_path / "a" / "sweep.csv").read_bytes()
    journal = tmp_path / "a" / "sweep.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    edited = 0
    for i, line in enumerate(lines[1:], start=1):
        record = json.loads(line)
        if edited < 2 and record["metrics"].get("eodd") is not None:
            record["metrics"]["eodd"] = 0.0  # "fairer": would change the choice
            lines[i] = json.dumps(record, sort_keys=True) + "\n"
            edited += 1
    assert edited == 2
    journal.write_text("".join(lines))
    said: list[str] = []
    again = _sweep(task, tmp_path / "a", echo=said.append)
    assert (tmp_path / "a" / "sweep.csv").read_bytes() == csv
    assert again.chosen.index == first.chosen.index
    note = "2 record(s) of"
    assert any(note in s and "checksum" in s for s in said)
    summary = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert any(note in n for n in summary["notes"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert any(note in n for n in report["notes"])


def test_write_recipe_never_replaces_what_is_not_its_own(task: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    recipe_text = (task / "r.yaml").read_bytes()
    ckpt = (task / "ckpt.pt").read_bytes()
    cases = [
        (mine, "is not a recipe a sweep wrote"),
        (task / "r.yaml", "is the input recipe"),
        (task / "ckpt.pt", "is the checkpoint"),
        (tmp_path, "is not a file"),
    ]
    for target, phrase in cases:
        with pytest.raises(FairDeployError, match=phrase):
            _sweep(task, out, write_recipe=target)
        assert not out.exists(), "refused after work had started"
    assert mine.read_text() == "my notes"
    assert (task / "r.yaml").read_bytes() == recipe_text
    assert (task / "ckpt.pt").read_bytes() == ckpt
    # No rule: nothing would be written, so the flag is refused rather than ignored.
    with pytest.raises(FairDeployError, match="needs a rule"):
        _sweep(task, out, select=None, write_recipe=tmp_path / "new.yaml")
    # Its own file, unchanged, is replaced; once edited, it is not.
    target = tmp_path / "chosen-copy.yaml"
    _sweep(task, out, write_recipe=target)
    assert target.read_text().startswith("# Chosen by `fairdeploy sweep`")
    _sweep(task, out, write_recipe=target)
    target.write_text(target.read_text().replace("beta:", "beta:  "))
    edited = target.read_text()
    with pytest.raises(FairDeployError, match="edited since"):
        _sweep(task, out, write_recipe=target)
    assert target.read_text() == edited


@pytest.mark.parametrize("rule", ["", "   "])
def test_an_empty_rule_is_refused(task: Path, tmp_path: Path, rule: str) -> None:
    with pytest.raises(FairDeployError, match="--select is empty"):
        _sweep(task, tmp_path / "s", select=rule)


def test_a_rerun_keeps_user_plots_and_a_hand_edited_chosen_yaml(
    task: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s"
    _sweep(task, out, plots=True)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots
    (out / "plots" / "my-figure.png").write_bytes(b"mine")
    with pytest.raises(FairDeployError, match=r"my-figure\.png.*not written by fairdeploy"):
        _sweep(task, out, plots=True)
    assert (out / "plots" / "my-figure.png").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted([*plots, "my-figure.png"])
    shutil.move(out / "plots" / "my-figure.png", tmp_path / "my-figure.png")
    chosen = out / "chosen.yaml"
    chosen.write_text(chosen.read_text() + "# my note\n")
    edited = chosen.read_text()
    with pytest.raises(FairDeployError, match=r"chosen\.yaml.*changed after fairdeploy wrote"):
        _sweep(task, out, plots=True)
    assert chosen.read_text() == edited
    chosen.unlink()
    # Unchanged outputs are replaced; plots of an earlier run no longer asked for go.
    done = _sweep(task, out, plots=False)
    assert done.chosen is not None and chosen.exists()
    assert not (out / "plots").exists()


# --------------------------------------------------------------------------- work bounds


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--grid", "sr=0:0.999:0.001", "--grid", "rr=0:0.999:0.001"],
         "1,000,000 grid points × 1 draws = 1,000,000 evaluations (the limit is 20,000)"),
        (["--grid", "sr=0.5", "--repeats", "100000"],
         "100,000 scoring draws per point (the limit is 100)"),
        # SLR-w draws nothing: its points count once, not once per draw.
        (["--grid", "sr=0:0.2:0.001", "--method", "fairlrf", "--method", "slr_w",
          "--repeats", "100"],
         "402 grid points, 100 draws each for the methods that draw = 20,301 evaluations"),
    ],
)
def test_a_sweep_over_the_work_limits_is_refused_before_it_starts(
    task: Path, tmp_path: Path, args: list[str], phrase: str
) -> None:
    """Issue 21 item 10: a 1,000 × 1,000 grid ran 300 s with no output and 4.7 GB."""
    import time

    from _reliability import check_contract, invoke

    t0 = time.perf_counter()
    out = invoke("sweep", task / "ckpt.pt", "--recipe", task / "r.yaml", *args, "--out",
                 tmp_path / "s", "--exports", tmp_path / "exports")
    assert check_contract(out) == "error" and phrase in out.text and "--yes" in out.text
    assert time.perf_counter() - t0 < 20
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["cli", "recipe"])
def test_repeats_for_methods_that_draw_nothing_are_refused(task: Path, tmp_path: Path,
                                                          where: str) -> None:
    from _reliability import check_contract, invoke

    recipe = task / "r.yaml"
    args = ["--repeats", "3"]
    if where == "recipe":
        data = yaml.safe_load(recipe.read_text()) | {"sweep": {"repeats": 3}}
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(data))
        args = []
    out = invoke("sweep", task / "ckpt.pt", "--recipe", recipe, "--grid", "sr=0.5",
                 "--method", "slr_w", "--method", "truncated_svd", *args, "--out", tmp_path / "s",
                 "--exports", tmp_path / "exports")
    name = "--repeats" if where == "cli" else "sweep.repeats"
    assert check_contract(out) == "error", out.text
    assert f"{name}: none of the swept methods (slr_w, truncated_svd) draws" in out.text
    assert not (tmp_path / "s").exists()


def test_yes_runs_a_sweep_over_the_limits(task: Path, tmp_path: Path, monkeypatch) -> None:
    import fairdeploy.commands.sweep as command

    monkeypatch.setattr(command, "MAX_SWEEP_EVALUATIONS", 1)
    with pytest.raises(FairDeployError, match=r"2 grid points × 1 draws = 2 evaluations"):
        _sweep(task, tmp_path / "s", select=None)
    said: list[str] = []
    done = _sweep(task, tmp_path / "s", select=None, yes=True, echo=said.append)
    assert len([r for r in done.rows if r.kind == "point"]) == 2
    assert any("as --yes asks" in s for s in said)


# --------------------------------------------------------------------------- messages


def test_no_choice_because_the_objective_is_undefined_says_so(task: Path, tmp_path: Path) -> None:
    """Issue 21 item 14: it said 'no point satisfies … 0 invalid, 0 rejected, 0 violating'."""
    import dataclasses

    from fairdeploy.sweep import apply_selection, parse_selection

    done = _sweep(task, tmp_path / "s", select=None)
    rows = [
        dataclasses.replace(r, metrics={**r.metrics, "eodd": {"median": None, "min": None,
                                                               "max": None, "values": [None]}})
        if r.kind == "point" else r
        for r in done.rows
    ]
    rule = parse_selection("min eodd s.t. accuracy >= vanilla - 1")
    _, chosen, message = apply_selection(rows, rule, guard=False, class_names=["0", "1", "2"],
                                         group_names=["a", "b"])
    assert chosen is None
    assert "2 with eodd undefined on the validation split" in message, message
    assert "0 violating the constraints" in message
