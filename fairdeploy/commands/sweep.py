"""The ``optimize --grid/--select`` sweep without click.

:func:`run_sweep` runs a journaled grid of recipe points, selects one by the rule, writes
the sweep table, plots and ``chosen.yaml``, and reports the chosen point on the test split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fairdeploy import __version__
from fairdeploy._io import atomic_write_text
from fairdeploy.commands._common import DEFAULT_EXPORTS, Echo, _paths, _seed, check_creatable
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.methods import get_method
from fairdeploy.plan import Plan
from fairdeploy.recipe import Recipe, load_recipe, save_resolved_recipe
from fairdeploy.report import base_report, draws_block, method_entry, prediction_notes, write_report
from fairdeploy.rundir import check_folder_path, check_replaceable_files, record_files

__all__ = [
    "MAX_REPEATS",
    "MAX_SWEEP_EVALUATIONS",
    "SweepResult",
    "chosen_recipe",
    "run_sweep",
]


@dataclass(frozen=True)
class SweepResult:
    """A finished ``sweep``.

    Attributes
    ----------
    out_dir : Path
        The sweep folder: sweep.jsonl (the journal), sweep.csv, sweep.json, sweep.md,
        plots/, recipe.yaml, and with a rule chosen.yaml, report.json and report.md.
    rows : list of SweepRow
        Vanilla, the truncated-SVD references and every grid point (validation split).
    chosen : SweepRow or None
        The point the rule picked (None without a rule, or when no point qualifies).
    message : str
        What the selection did, in one sentence.
    test : dict or None
        The chosen point on the test split: metrics, paired bootstrap differences against
        vanilla and truncated SVD, and the verdict.
    files : dict
        Name → path of every file written.
    """

    out_dir: Path
    rows: list[Any]
    chosen: Any
    message: str
    test: dict[str, Any] | None
    files: dict[str, Path]


_SWEEP_OUTPUTS = ("sweep.csv", "sweep.json", "sweep.md", "chosen.yaml", "report.json",
                  "report.md", "recipe.yaml")


def _sweep_dir(recipe_path: Path, recipe: Recipe, checkpoint_sha256: str) -> str:
    """``<recipe>-sweep-<hash>``: one folder per checkpoint and model/data/sensitive
    settings, so sweeps of other grids or method settings on them share one journal."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.name or recipe_path.stem)
    parts = [recipe.model.model_dump(mode="json"), _data_settings(recipe),
             recipe.sensitive.model_dump(mode="json"), checkpoint_sha256]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{stem}-sweep-{digest[:8]}"


def _data_settings(recipe: Recipe) -> dict[str, Any]:
    from fairdeploy.data_specs import LOCAL_PATH_KEYS

    data = recipe.data.model_dump(mode="json", exclude={"num_workers"})
    return {k: v for k, v in data.items() if k not in LOCAL_PATH_KEYS}


def _check_sweep_dir(path: Path) -> None:
    """Refuse a sweep folder that is a file or another folder of the user's; nothing is
    created here (the journal creates the folder when the first evaluation is written)."""
    from fairdeploy.sweep import JOURNAL_NAME

    check_folder_path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / JOURNAL_NAME).is_file():
        raise FairDeployError(
            f"--out {str(path)!r} exists and is not a fairdeploy sweep folder (no "
            f"{JOURNAL_NAME}): give a new or empty folder, so nothing of yours is replaced"
        )
    check_creatable(path)


_KEEP_FIX = (
    "move it out of the sweep folder (or give another --out), so nothing of yours is "
    "replaced; the sweep replaces only the files it wrote, unchanged since"
)


def _sweep_outputs(final: Path) -> list[str]:
    """What a rerun would replace or delete: the result files and everything in plots/."""
    rels = [name for name in _SWEEP_OUTPUTS if (final / name).exists()
            or (final / name).is_symlink()]
    plots = final / "plots"
    if plots.is_symlink() or (plots.exists() and not plots.is_dir()):
        rels.append("plots")
    elif plots.is_dir():
        for p in sorted(plots.rglob("*")):
            rels.append(p.relative_to(final).as_posix())
    return rels


def _check_sweep_outputs(final: Path) -> None:
    """Refuse, before any work, a sweep folder whose result files or plots/ hold a file
    the sweep did not write, or one edited since (a hand-edited chosen.yaml)."""
    if final.is_dir():
        check_replaceable_files(final, _sweep_outputs(final), fix=_KEEP_FIX)


#: The first line of a recipe the sweep writes; the third records the SHA-256 of the rest.
_CHOSEN_MARK = "# Chosen by `fairdeploy sweep`"
_CHOSEN_SUM = "# fairdeploy-chosen-recipe sha256="


def _chosen_unchanged(path: Path) -> bool:
    """Whether ``path`` is a recipe the sweep wrote, unchanged since (its own checksum)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.splitlines(keepends=True)
    if len(lines) < 3 or not lines[0].startswith(_CHOSEN_MARK):
        return False
    if not lines[2].startswith(_CHOSEN_SUM):
        return False
    body = "".join(lines[3:])
    return lines[2].strip() == _CHOSEN_SUM + hashlib.sha256(body.encode()).hexdigest()


def _check_write_recipe(
    path: Path, recipe_path: Path, checkpoint: Path, selection: Any
) -> None:
    """Refuse, before any work, a ``--write-recipe`` that would write nothing (no rule) or
    replace something it must not: the input recipe or checkpoint, a folder, a link, or
    a file that is not a recipe a sweep wrote, unchanged since."""
    where = f"--write-recipe {str(path)!r}"
    if selection is None:
        raise FairDeployError(
            f"{where} needs a rule to choose the point it writes: give --select (or "
            "sweep.select in the recipe)"
        )
    for what, other in (("the input recipe", recipe_path), ("the checkpoint", checkpoint)):
        with contextlib.suppress(OSError):
            if path.exists() and os.path.samefile(path, other):
                raise FairDeployError(f"{where} is {what}: give another path")
    if path.is_symlink():
        raise FairDeployError(f"{where} is a symlink: give the path of a plain file")
    if path.exists() and not path.is_file():
        raise FairDeployError(f"{where} is not a file: give the path of a .yaml file")
    if path.exists() and not _chosen_unchanged(path):
        raise FairDeployError(
            f"{where} exists and is not a recipe a sweep wrote (or it was edited since): "
            "give a new path, or move the file away first, so nothing of yours is replaced"
        )


def chosen_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """``recipe`` with ``plan`` as its method (the compare list derived anew, no sweep
    section): what ``optimize`` turns into the deployed model."""
    from fairdeploy.recipe import parse_recipe

    data = recipe.model_dump(mode="json", by_alias=True)
    data["method"] = plan.model_dump(mode="json", by_alias=True)
    data.pop("compare", None)
    data.pop("sweep", None)
    return parse_recipe(data, source="the chosen recipe")


def run_sweep(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    grid: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    repeats: int | None = None,
    select: str | None = None,
    guard: bool | None = None,
    guard_tolerance: float | None = None,
    write_recipe: str | Path | None = None,
    out: str | Path | None = None,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | Path | None = "default",
    plots: bool | None = None,
    restart: bool = False,
    yes: bool = False,
    progress: bool = True,
    echo: Echo = print,
    on_evaluation: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """``fairdeploy sweep``: every grid point on the validation split, resumable; with a
    rule, the chosen point on the test split and a runnable recipe.

    Parameters
    ----------
    checkpoint, recipe_path
        The vanilla checkpoint and the recipe (its method is the swept plan; its
        ``sweep:`` section may hold the grid, methods, rule and guard settings).
    grid : sequence of str
        ``KEY=VALUES`` items; each replaces the recipe's ``sweep.grid`` entry of the key.
    methods : sequence of str, optional
        Low-rank methods to sweep (default ``sweep.methods``, else the recipe's method).
    repeats : int, optional
        Scoring draws per point (default ``sweep.repeats``, else each plan's
        ``scoring.repeats``).
    select : str, optional
        The rule (overrides ``sweep.select``); grammar in :mod:`fairdeploy.sweep`.
    guard, guard_tolerance
        The collapse guard (default on) and its tolerance (default from the rule).
    write_recipe : path, optional
        Also write the chosen recipe there (it is always written as chosen.yaml in the
        sweep folder).
    out : path, optional
        The sweep folder (default ``<exports>/<recipe>-sweep-<hash>``). A folder holding
        another checkpoint's or recipe's journal is refused (``restart`` discards it).
    plots : bool, optional
        Write the PNG plots (default ``sweep.plots``, on).
    yes : bool
        Run a sweep over the work limits (:data:`MAX_SWEEP_EVALUATIONS` evaluations,
        :data:`MAX_REPEATS` draws per point), which is otherwise refused before it starts.

    Returns
    -------
    SweepResult
        ``chosen`` is None when no point satisfies the rule (the CLI exits 1).
    """
    from fairdeploy.sweep import apply_selection, grid_points, test_comparison

    # The recipe, grid and rule are checked first: a refused sweep creates no folder.
    recipe = load_recipe(recipe_path)
    st = _sweep_settings(recipe, grid, methods, repeats, select, guard, guard_tolerance, plots)
    _check_work(recipe, st, yes=yes, echo=echo)
    recipe_path, exports_dir, cache_dir = _paths(
        recipe_path, exports_dir, cache_dir, out, check=_check_sweep_dir
    )
    if write_recipe is not None:
        _check_write_recipe(Path(write_recipe), recipe_path, Path(checkpoint), st.selection)
    exp = Experiment(
        recipe, checkpoint, cache_dir=cache_dir, device=device, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    points = grid_points(recipe.method, st.grid, exp.model, methods=st.methods,
                         repeats=st.repeats)
    plans = [p for pt in points if pt.plan is not None for p in (pt.plan, pt.reference)]
    if not plans:
        raise FairDeployError(
            f"sweep: none of the {len(points)} grid points fits the model "
            f"({points[0].invalid if points else 'an empty grid'})"
        )
    final = Path(out) if out is not None else exports_dir / _sweep_dir(
        recipe_path, recipe, exp.checkpoint_sha256
    )
    _check_sweep_dir(final)
    _check_sweep_outputs(final)
    ctx = exp.prepare(plans)
    info = ctx.privileged_info
    echo(f"privileged group: {info['name']} ({info['how']})")
    identity = _sweep_identity(exp, recipe, device)
    rows, notes = _journaled_grid(exp, points, final, identity, restart=restart,
                                  progress=progress, echo=echo, on_evaluation=on_evaluation)
    rows, chosen, message = apply_selection(
        rows, st.selection, guard=st.guard, tolerance=st.tolerance,
        class_names=ctx.class_names, group_names=ctx.group_names,
    )
    test_block: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    if chosen is not None:
        assert st.selection is not None and chosen.reference is not None
        reference = rows[chosen.reference]
        test = test_comparison(exp, chosen, reference, st.selection, seed=_seed(chosen.plan))
        test_block, report = _sweep_test_report(exp, recipe_path, chosen, reference, test,
                                                st.selection, message)
    summary = _sweep_summary(exp, recipe_path, st, points, rows, identity, message, chosen,
                             test_block)
    summary["notes"] = notes
    if report is not None:
        report["notes"] = [*notes, *report["notes"]]
    files = _write_sweep_outputs(final, recipe, st, rows, summary)
    if chosen is not None:
        assert report is not None
        files |= _write_chosen(final, recipe, chosen, st.selection, report, write_recipe)
    record_files(final, [p.relative_to(final).as_posix() for p in files.values()
                         if p.is_relative_to(final)])
    return SweepResult(final, rows, chosen, message, test_block, files)


#: Evaluations (grid points × methods × scoring draws) a sweep runs without ``--yes``: far
#: above a paper's grid (10 sr × 5 rr × 3 β = 150 points), far below a typo's
#: (``sr=0:1:0.001`` × ``rr=0:1:0.001`` is a million points and gigabytes of plans).
MAX_SWEEP_EVALUATIONS = 20_000
#: Scoring draws per point a sweep runs without ``--yes``.
MAX_REPEATS = 100


def _check_work(recipe: Recipe, st: _SweepSettings, *, yes: bool, echo: Echo) -> None:
    """Count the sweep's evaluations before anything is built; refuse one over the limits
    unless ``yes`` (``layer=all`` counts as one value: the model is not loaded yet)."""
    per_method = 1
    for values in st.grid.values():
        per_method *= len(values)
    points = per_method * len(st.methods)
    scoring = getattr(recipe.method, "scoring", None)
    draws = st.repeats if st.repeats is not None else (scoring.repeats if scoring else 1)
    # Only the methods with scoring sets draw (SLR-w and truncated SVD evaluate once).
    total = sum(per_method * (draws if _draws(name) else 1) for name in st.methods)
    over = []
    if draws > MAX_REPEATS:
        over.append(f"{draws:,} scoring draws per point (the limit is {MAX_REPEATS})")
    if total > MAX_SWEEP_EVALUATIONS:
        how = (f"{points:,} grid points × {draws:,} draws" if total == points * draws else
               f"{points:,} grid points, {draws:,} draws each for the methods that draw")
        over.append(f"{how} = {total:,} evaluations (the limit is {MAX_SWEEP_EVALUATIONS:,})")
    if not over:
        return
    if not yes:
        raise FairDeployError(
            f"sweep: {'; '.join(over)}: use a coarser grid (a larger step) or fewer "
            "--repeats, or pass --yes to run it anyway"
        )
    echo(f"warning: {'; '.join(over)}: running it as --yes asks")


def _draws(method: str) -> bool:
    """Whether a method's plans draw scoring samples (have ``scoring.repeats``)."""
    scoring = get_method(method).plan_class.model_fields.get("scoring")
    annotation = getattr(scoring, "annotation", None)
    return isinstance(annotation, type) and "repeats" in getattr(annotation, "model_fields", {})


@dataclass(frozen=True)
class _SweepSettings:
    """A sweep's settings: the command line's over the recipe's ``sweep:`` section."""

    grid: dict[str, list[Any]]
    methods: list[str]
    repeats: int | None
    selection: Any
    guard: bool
    #: The guard tolerance given (None: from the rule) and the one applied.
    tolerance: float | None
    tolerance_used: float
    plots: bool


def _sweep_settings(
    recipe: Recipe, grid: Sequence[str], methods: Sequence[str] | None, repeats: int | None,
    select: str | None, guard: bool | None, guard_tolerance: float | None,
    plots: bool | None = None,
) -> _SweepSettings:
    from fairdeploy.sweep import parse_grid, parse_selection

    spec = recipe.sweep
    values = {**parse_grid(spec.grid if spec else {}), **parse_grid(grid)}
    values = {k: values[k] for k in ("layer", "rank", "sr", "rr", "beta") if k in values}
    if not values:
        raise FairDeployError(
            "sweep: no grid: give --grid KEY=VALUES (e.g. --grid sr=0:0.9:0.1 --grid "
            "beta=1/3,5/9) or a sweep: {grid: ...} section in the recipe"
        )
    rule = select if select is not None else (spec.select if spec else None)
    if rule is not None and not rule.strip():
        where = "--select" if select is not None else "sweep.select"
        raise FairDeployError(
            f"{where} is empty: give a rule (e.g. \"min eodd s.t. avg_precision >= vanilla - "
            "0.01\"), or leave it out to sweep without choosing"
        )
    selection = parse_selection(rule) if rule else None
    if guard is False and guard_tolerance is not None:
        raise FairDeployError(
            "--guard-tolerance is read only by the collapse guard, which --no-guard turns "
            "off: give one of them"
        )
    tolerance = guard_tolerance if guard_tolerance is not None else (
        spec.guard_tolerance if spec else None
    )
    ok = isinstance(tolerance, int | float) and not isinstance(tolerance, bool)
    if tolerance is not None and not (ok and 0 <= tolerance <= 1):  # NaN fails too
        raise FairDeployError(
            f"guard_tolerance={tolerance!r} is not allowed: use a number in [0, 1]"
        )
    names = list(methods or (spec.methods if spec and spec.methods else [recipe.method.method]))
    for name in names:
        reason = get_method(name).unavailable
        if reason:
            raise FairDeployError(f"sweep method {name!r} cannot run: {reason}")
    asked = repeats if repeats is not None else (spec.repeats if spec else None)
    if asked is not None and not any(_draws(n) for n in names):
        where = "--repeats" if repeats is not None else "sweep.repeats"
        raise FairDeployError(
            f"{where}: none of the swept methods ({', '.join(names)}) draws scoring samples, "
            "so every draw would be the same: remove it"
        )
    return _SweepSettings(
        grid=values,
        methods=names,
        repeats=repeats if repeats is not None or spec is None else spec.repeats,
        selection=selection,
        guard=guard if guard is not None else (spec.guard if spec else True),
        tolerance=tolerance,
        tolerance_used=tolerance if tolerance is not None else (
            selection.guard_tolerance() if selection else 0.01
        ),
        plots=plots if plots is not None else (spec.plots if spec else True),
    )


def _sweep_identity(exp: Experiment, recipe: Recipe, device: str) -> dict[str, Any]:
    """What every journal record depends on besides its plan (a journal of another
    checkpoint, recipe or data is refused)."""
    return {
        "checkpoint_sha256": exp.checkpoint_sha256,
        "model": recipe.model.model_dump(mode="json"),
        "data": _data_settings(recipe),
        "sensitive": recipe.sensitive.model_dump(mode="json"),
        "data_content": exp.context.cache_key["content"],
        "device": str(device),
        "fairdeploy": __version__,
        "torch": torch.__version__,
    }


def _journaled_grid(
    exp: Experiment, points: Sequence[Any], final: Path, identity: dict[str, Any], *,
    restart: bool, progress: bool, echo: Echo, on_evaluation: Callable[[int, int], None] | None,
) -> tuple[list[Any], list[str]]:
    """Every grid point on the validation split, each evaluation appended to the journal
    (``sweep.jsonl``) as it ends; what the journal holds is not evaluated again. Returns
    the rows and the journal's notes (records dropped as damaged, recomputed)."""
    from fairdeploy.sweep import JOURNAL_NAME, Journal, run_grid

    with Journal(final / JOURNAL_NAME, identity, restart=restart) as journal:
        for note in journal.notes:
            echo(f"warning: {note}")
        # Stale results of an earlier command: only what a sweep wrote, unchanged since.
        stale = _sweep_outputs(final)
        check_replaceable_files(final, stale, fix=_KEEP_FIX)
        for rel in stale:
            (final / rel).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (final / "plots").rmdir()  # only when empty
        try:
            rows = run_grid(exp, points, journal, split="val", progress=progress, echo=echo,
                            on_evaluation=on_evaluation)
            return rows, journal.notes
        except KeyboardInterrupt:
            echo(f"interrupted: {len(journal)} evaluations are saved in {final / JOURNAL_NAME}; "
                 "run the same command again to resume")
            raise


def _sweep_summary(
    exp: Experiment, recipe_path: Path, st: _SweepSettings, points: Sequence[Any],
    rows: Sequence[Any], identity: dict[str, Any], message: str, chosen: Any,
    test_block: dict[str, Any] | None,
) -> dict[str, Any]:
    """sweep.json's header: settings, identity, the rule, the guard, the choice."""
    from fairdeploy.sweep import reference_settings

    ctx = exp.context
    recipe = exp.recipe
    base = recipe.method.layers[0] if getattr(recipe.method, "layers", None) else None
    base_settings = {"method": recipe.method.method}
    if base is not None:
        base_settings |= {"layer": base.layer, "rank": base.rank, "sr": base.sr, "rr": base.rr,
                          "beta": base.beta}
    tol = st.tolerance_used
    return {
        "fairdeploy_version": __version__,
        "recipe": str(recipe_path),
        "identity": identity,
        "split": "val",
        "samples": len(ctx.features["val"]),
        "grid": {k: list(v) for k, v in st.grid.items()},
        "methods": st.methods,
        "repeats": st.repeats,
        "scoring": _scoring_text(exp, points, getattr(recipe.method, "scoring", None)),
        "class_names": ctx.class_names,
        "group_names": ctx.group_names,
        "privileged": ctx.privileged_info,
        "guard": {
            "on": st.guard,
            "tolerance": tol,
            "text": (
                f"on: accuracy and macro recall at most {tol:g} below vanilla's and no "
                "group's rate of predicting any class below half of vanilla's, in every draw"
                if st.guard else "off"
            ),
        },
        "selection": st.selection.to_dict() if st.selection else None,
        "message": message,
        "reference_point": reference_settings(rows, st.grid, base_settings),
        "chosen_row": chosen.index if chosen is not None else None,
        "test": test_block,
    }


def _write_sweep_outputs(
    final: Path, recipe: Recipe, st: _SweepSettings, rows: Sequence[Any],
    summary: dict[str, Any],
) -> dict[str, Path]:
    """The plots (unless off), sweep.csv / sweep.json / sweep.md and the resolved recipe."""
    from fairdeploy.sweep import write_plots, write_sweep_files

    files: dict[str, Path] = {}
    if st.plots:
        written = write_plots(final / "plots", rows, st.grid, summary["reference_point"])
        summary["plots"] = [str(p.relative_to(final)) for p in written]
        files |= {p.stem: p for p in written}
    files |= write_sweep_files(final, summary, rows)
    save_resolved_recipe(recipe, final / "recipe.yaml")
    files["recipe"] = final / "recipe.yaml"
    return files


def _write_chosen(
    final: Path, recipe: Recipe, chosen: Any, selection: Any, report: dict[str, Any],
    write_recipe: str | Path | None,
) -> dict[str, Path]:
    """chosen.yaml (and ``--write-recipe``'s copy) and the chosen point's test report."""
    chosen_r = chosen_recipe(recipe, chosen.plan)
    rule = " ".join((selection.text if selection else "").split())  # one line
    header = (
        f"{_CHOSEN_MARK} (row {chosen.index} of {final / 'sweep.csv'}) on the "
        f"validation split with the rule: {rule}\n"
        f"# Deploy it: fairdeploy optimize CHECKPOINT --recipe THIS_FILE\n"
    )
    files: dict[str, Path] = {}
    for path in (final / "chosen.yaml", *([Path(write_recipe)] if write_recipe else [])):
        if path.exists() and not _chosen_unchanged(path):  # changed during the sweep
            raise FairDeployError(
                f"{str(path)!r} was changed while the sweep ran: move it away and run the "
                "same command again (the evaluations are journaled)"
            )
        with tempfile.TemporaryDirectory() as tmp:  # never a header-less file at ``path``
            body = save_resolved_recipe(chosen_r, Path(tmp) / "r.yaml").read_text("utf-8")
        digest = hashlib.sha256(body.encode()).hexdigest()
        atomic_write_text(path, f"{header}{_CHOSEN_SUM}{digest}\n{body}")
    files["chosen_recipe"] = final / "chosen.yaml"
    if write_recipe:
        files["written_recipe"] = Path(write_recipe)
    report["run_dir"] = str(final)
    files["report_json"], files["report_md"] = write_report(report, final)
    return files


def _scoring_text(exp: Experiment, points: Sequence[Any], spec: Any) -> str:
    """How the scoring sets of the sweep were drawn, in words (for sweep.md)."""
    ctx = exp.context
    plans = [pt.plan for pt in points if pt.plan is not None and hasattr(pt.plan, "scoring")]
    if not plans:
        return "none (the swept methods read no scoring sets)"
    first = plans[0].scoring
    resolved = ctx.resolve_sampling(first)
    sizes = ctx.scoring_set(first).sizes
    if resolved.samples_per_group == "all":
        text = f"every training sample of each group ({sizes[0]} + {sizes[1]})"
        if first.samples_per_group == "auto":
            text += ", samples_per_group: auto (the training inputs are in memory, so cheap)"
    else:
        text = f"{sizes[0]} per group drawn from the training split"
        if first.samples_per_group == "auto":
            text += (" (samples_per_group: auto = 1024 for data read from files or with "
                     "repeats > 1; `all` would cost one trunk pass over the training split)")
    draws = len(resolved.draw_seeds)
    if draws > 1:
        text += f"; {draws} draws per point, seeds {first.seed}…{first.seed + draws - 1}"
    return text


def _sweep_test_report(
    exp: Experiment,
    recipe_path: Path,
    chosen: Any,
    reference: Any,
    test: dict[str, Any],
    selection: Any,
    message: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chosen point's test-split block (sweep.json) and its report dict (report.json)."""
    from fairdeploy.sweep import describe_settings

    names = {"vanilla": "vanilla", "truncated_svd": "truncated_svd", "chosen": chosen.method}
    if names["chosen"] == "truncated_svd":
        names["chosen"] = "truncated_svd-chosen"
    labels = {
        "vanilla": "Vanilla",
        "truncated_svd": f"Truncated SVD ({describe_settings(reference.settings)})",
        "chosen": f"{chosen.plan.label} — chosen",
    }
    block = {
        "plan": chosen.plan.to_dict(),
        "row": chosen.index,
        "labels": labels,
        "metrics": {k: m.to_dict() for k, m in test["metrics"].items()},
        "vs_vanilla": {
            m: d.to_dict() for m, d in test["bootstrap_vs_vanilla"].differences["chosen"].items()
        },
        "vs_svd": {
            m: d.to_dict() for m, d in test["bootstrap_vs_svd"].differences["chosen"].items()
        },
        "verdict": test["verdict"],
        "verdict_vs_vanilla": test["verdict_vs_vanilla"],
        "note": "evaluated once on the test split, with the first scoring draw (what optimize "
        "of chosen.yaml deploys); the choice read the validation split only",
    }
    report = base_report(exp, recipe_path, chosen.plan)
    report["evaluation"]["chosen_on"] = "validation split (fairdeploy sweep)"
    report["methods"] = [
        method_entry(exp, names[k], run.plan, test["metrics"][k],
                     metrics_val=exp.evaluate(run, "val"))
        for k, run in test["runs"].items()
    ]
    for entry, k in zip(report["methods"], test["runs"], strict=True):
        entry["label"] = labels[k]
    report["bootstrap"] = test["bootstrap_vs_vanilla"].to_dict()
    report["bootstrap"]["intervals"] = {
        names[k]: v for k, v in report["bootstrap"]["intervals"].items()
    }
    report["bootstrap"]["differences"] = {
        names[k]: v for k, v in report["bootstrap"]["differences"].items()
    }
    report["bootstrap_vs_truncated_svd"] = test["bootstrap_vs_svd"].to_dict()
    others = exp.draws(chosen.plan)[1:]
    if others:  # the spread the choice saw, on the validation split only
        runs = [test["runs"]["chosen"], *(exp.apply(d) for d in others)]
        report["methods"][-1]["draws"] = draws_block(exp, runs, splits=("val",))
    report["notes"] += prediction_notes({names[k]: p for k, p in test["predictions"].items()})
    report["sweep"] = {
        "selection": selection.to_dict(),
        "message": message,
        "row": chosen.index,
        "verdict": test["verdict"]["text"],
        "verdict_vs_vanilla": test["verdict_vs_vanilla"]["text"],
    }
    return block, report
