"""The ``optimize`` command without click: the dry run and the full run.

:func:`dry_run` checks a recipe against a checkpoint's shapes without running a method;
:func:`run_optimize` prepares, applies, evaluates, exports, verifies and reports one plan.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fairdeploy._text import nbytes
from fairdeploy.checkpoint import save_checkpoint
from fairdeploy.commands._common import (
    DEFAULT_EXPORTS,
    Echo,
    _experiment,
    _paths,
    _run_name,
    _runnable,
    warnings_as_notes,
)
from fairdeploy.commands._deploy import _deploy, exporting
from fairdeploy.commands._rows import _evaluate_plans, _unique
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.metrics import GroupMetrics
from fairdeploy.plan import Plan
from fairdeploy.progress import phase
from fairdeploy.recipe import Recipe, load_recipe, recipe_hash, save_resolved_recipe
from fairdeploy.report import write_report
from fairdeploy.rundir import check_out, staging_dir

__all__ = [
    "DryRun",
    "OptimizeResult",
    "dry_run",
    "input_shape",
    "row_names",
    "run_optimize",
]


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
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, RuntimeError, NotImplementedError):
        return None  # a damaged archive (an encrypted flag, an unknown compression) too
    return tuple(int(d) for d in shape)


def _check_export(exp: Experiment, *, progress: bool = False) -> str:
    """Export the vanilla model to a temporary ONNX file (checker and ONNX Runtime parity
    included) and say so; raises FairDeployError with the fix when it cannot be exported."""
    from fairdeploy.export import ExportOptions, export_onnx, onnx_sizes

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
                exp.model, example, path,
                options=ExportOptions(opset=spec.opset, exporter=spec.exporter),
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
