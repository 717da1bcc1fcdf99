"""Deploying one row: ONNX export, int8, verification against the reference, latency.

``optimize`` deploys its one row with :func:`_deploy`; ``compare``'s row exporter reuses
the export records and verification checks; ``optimize --dry-run`` uses :func:`exporting`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdeploy import __version__
from fairdeploy.cache import FeatureCache, file_sha256
from fairdeploy.commands._common import _seed
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.methods import Processed
from fairdeploy.plan import Plan
from fairdeploy.progress import phase
from fairdeploy.report import latency_block, packing_block, verify_summary

__all__ = [
    "export_error_message",
    "exporting",
]


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
    runtimes = ", ".join(exp.recipe.export.verify_runtimes)
    with phase(f"verify: {runtimes} vs PyTorch on {n:,} test inputs", unit="", enabled=show):
        vres = exp.verify_all(model_path, reference=ref)
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


def _verify_int8_in_runtimes(exp: Experiment, int8_path: Path, ref: Any,
                             atol: float) -> dict[str, Any]:
    """:func:`~fairdeploy.export.verify_int8` in each runtime of
    ``export.verify_runtimes``, with the recipe's int8 tolerances."""
    from fairdeploy.export import verify_int8

    spec = exp.recipe.export.int8
    checks = {}
    for runtime in exp.recipe.export.verify_runtimes:
        with phase(f"int8: verify in {runtime} on {len(ref.inputs):,} test inputs", unit="",
                   enabled=exp.progress):
            checks[runtime] = verify_int8(int8_path, ref.inputs, ref.outputs, atol=atol,
                                          rtol=spec.rtol, runtime=runtime,
                                          min_argmax_agreement=spec.argmax_agreement)
    return checks


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
    )

    spec = exp.recipe.export.int8
    ctx = exp.context
    show = exp.progress
    int8_path = model_path.with_name("model.int8.onnx")
    take, calibration = _int8_calibration(ctx.splits["train"], spec)
    with phase("int8: quantize with onnxruntime.quantization", unit="", enabled=show):
        made = quantize_int8(model_path, int8_path, calibration_inputs=calibration,
                             mode=spec.mode)
    atol = spec.atol_scale * float(np.std(ref.outputs))
    checks = _verify_int8_in_runtimes(exp, int8_path, ref, atol)
    check = next((c for c in checks.values() if not c), next(iter(checks.values())))
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
                         f"({float(np.std(ref.outputs)):.3g}), export.int8.atol_scale",
           "verified_in": list(checks),
           "runtimes": {rt: {k: c.to_dict()[k] for k in (
               "passed", "max_abs_error", "mean_abs_error", "argmax_agreement")}
               for rt, c in checks.items()}},
        "fairness": fair.to_dict(),
        "compression": comp.to_dict(),
    }
    update_metadata(int8_path, _int8_metadata(block, fair, len(x), model_path))
    return block


def _int8_metadata(
    block: dict[str, Any], fair: Any, samples: int, model_path: Path
) -> dict[str, Any]:
    """model.int8.onnx's metadata: how it was made, the tolerances and float reference
    ``fairdeploy verify model.int8.onnx`` uses by default (int8 has its own), and its
    test-split fairness."""
    from fairdeploy.export import verify_npz_path

    checked = block["verify"]
    return {
        "int8": {k: block["export"][k] for k in ("mode", "per_channel", "calibration_samples")}
        | {"verify": {"atol": float(checked["atol"]), "rtol": float(checked["rtol"]),
                      "argmax_agreement": float(checked["required_argmax_agreement"]),
                      "atol_basis": checked["atol_basis"],
                      "reference": verify_npz_path(model_path).name}},
        "fairness": {
            k: fair.int8_metrics.to_dict()["fairness"][k] for k in ("eopp0", "eopp1", "eodd")
        } | {"convention": "mean over classes; EOdd halved", "split": "test",
             "samples": samples},
    }


def _int8_calibration(train: Any, spec: Any) -> tuple[int, Any]:
    """How many training samples calibrate int8, and their inputs (``export.int8.seed``'s draw)."""
    import numpy as np

    take = min(spec.calibration_samples, len(train))
    rng = np.random.default_rng(spec.seed)
    calib = np.sort(rng.choice(len(train), size=take, replace=False))
    calibration = np.stack([np.asarray(train[int(i)][0], dtype=np.float32) for i in calib])
    return take, calibration


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
    """The first line of a failed verification's summary that says what failed (and, for
    several runtimes, in which)."""
    runtime = ""
    if getattr(vres, "failed_in", None):  # a RuntimesResult: the first runtime that failed
        runtime = f"in {vres.failed_in[0]}: "
        vres = vres.results[vres.failed_in[0]]
    lines = vres.summary_lines()
    return runtime + next((ln.strip() for ln in lines if "FAILED" in ln), lines[-1])


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
    from fairdeploy.export import ExportOptions, export_onnx

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
                ctx.model, example, path, metadata=metadata,
                options=ExportOptions(
                    opset=exp_spec.opset, exporter=exp_spec.exporter, simplify=exp_spec.simplify
                ),
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
    # An unwritable cache folder only costs the reuse: the export is made in the run.
    cached = FeatureCache(cache_dir).get_or_create_file(
        "vanilla", key, create, suffix=".onnx", fallback=target
    )[0]
    if cached != target:
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
