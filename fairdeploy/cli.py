"""The ``fairdeploy`` command line: parse options, call the library, report.

Only this module imports click. Each command is one small function; options used by
several commands are defined once below and applied as decorators. A
:class:`~fairdeploy.errors.FairDeployError` from the library becomes one
``Error: ...`` line and exit code 1 (click usage errors exit 2); anything else is a bug
and keeps its traceback.

Adding a command: write a function decorated with ``@main.command()`` and the shared
options it needs, call the library, print with ``click.echo``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from fairdeploy.errors import FairDeployError


class _Group(click.Group):
    """A click group that turns FairDeployError into ``Error: ...`` and exit code 1.

    Operating-system errors (a full disk, a folder without write permission) are the
    user's environment, not a bug: they get the same one-line treatment.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FairDeployError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None


def _batch_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,32") from None
    if not out or any(b < 1 for b in out):
        raise click.BadParameter(f"{value!r}: batch sizes must be ≥ 1, e.g. 1,32")
    return out


# Shared options, defined once.
provider_option = click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ONNX Runtime execution provider (cuda falls back to cpu with a warning).",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads (default: ONNX Runtime's choice).",
)
json_option = click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None,
    help="Also write the result as JSON to this file.",
)


recipe_option = click.option(
    "--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
    help="The YAML recipe (see recipes/).",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
    help="Where the PyTorch trunk runs (features, training).",
)
trust_option = click.option(
    "--trust-checkpoint", is_flag=True,
    help="Allow a checkpoint that pickles a whole module (runs code from the file: "
         "only for files you trust).",
)
exports_option = click.option(
    "--exports", "exports_dir", type=click.Path(file_okay=False), default="exports",
    show_default=True, help="Folder for run outputs and the feature cache (.cache/).",
)
cache_option = click.option(
    "--no-cache", is_flag=True, help="Do not read or write the persisted feature cache.",
)


def _apply(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for d in reversed(decorators):
            f = d(f)
        return f

    return deco


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    from fairdeploy._io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fairdeploy")
def main() -> None:
    """fairdeploy: fairer, smaller classifiers shipped as verified ONNX models."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--reference", type=click.Path(dir_okay=False), default=None,
    help="Reference .npz (inputs, outputs[, labels, groups]); default <model>.verify.npz.",
)
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Reference from this checkpoint (vanilla, or optimize's model.pt) run in "
                   "PyTorch on a data split; needs --recipe.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe naming the model and data for --checkpoint.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test",
              show_default=True, help="Data split for --checkpoint.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Inputs of the split to compare (default: the recipe's export.verify_samples).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@_apply(provider_option, trust_option, json_option)
def verify(
    model: str, reference: str | None, checkpoint: str | None, recipe_path: str | None,
    split: str, samples: int | None, atol: float, rtol: float, provider: str,
    trust_checkpoint: bool, json_path: str | None,
) -> None:
    """Check MODEL and compare ONNX Runtime's outputs with a reference; exit 1 on failure.

    The reference is REFERENCE, or MODEL's <name>.verify.npz, or --checkpoint with
    --recipe (then the group fairness of the ONNX model's predictions on that split is
    reported too).
    """
    from fairdeploy.verification import verify as run_verify

    privileged = None
    if (checkpoint is None) != (recipe_path is None):
        raise click.UsageError("--checkpoint and --recipe go together")
    if checkpoint is not None:
        if reference is not None:
            raise click.UsageError("give either --reference or --checkpoint/--recipe")
        from fairdeploy import app

        reference, privileged = app.reference_from_checkpoint(
            model, checkpoint, recipe_path, split=split, samples=samples,
            trust_checkpoint=trust_checkpoint,
        )
    result = run_verify(model, reference=reference, atol=atol, rtol=rtol, provider=provider,
                        privileged=privileged)
    for line in result.summary_lines():
        click.echo(line)
    _write_json(json_path, result.to_dict())
    if not result:
        click.get_current_context().exit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Baseline model (e.g. the vanilla export), timed interleaved with MODEL.")
@click.option("--batch", "batches", default="1,32", show_default=True, callback=_batch_list,
              help="Comma-separated batch sizes.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget per batch size (at least 5 timed runs per model).")
@click.option("--layer", "layers", multiple=True,
              help="Also time this layer's sub-graph (repeatable; default: the factorized "
                   "layers in MODEL's metadata).")
@_apply(threads_option, provider_option, json_option)
def bench(
    model: str, baseline: str | None, batches: tuple[int, ...], iters: int, warmup: int,
    layers: tuple[str, ...], threads: int | None, provider: str, json_path: str | None,
    max_seconds: float | None,
) -> None:
    """Time MODEL (and BASELINE) in ONNX Runtime: median and p90 per batch size."""
    from fairdeploy.bench import measure_latency, measure_layer_latency
    from fairdeploy.export import read_metadata

    common = {"batches": batches, "threads": threads, "provider": provider,
              "warmup": warmup, "iters": iters, "max_seconds": max_seconds}
    results = [measure_latency(model, baseline, label="model", **common)]
    if not layers:
        layers = tuple(row["layer"] for row in read_metadata(model).get("layers", []))
    for layer in layers:
        results.append(measure_layer_latency(model, layer, baseline, **common))
    for r in results:
        for line in r.summary_lines():
            click.echo(line)
    _write_json(json_path, {"results": [r.to_dict() for r in results]})


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise FairDeployError(
            "--device cuda: no CUDA device is available to PyTorch; use --device cpu"
        )


def _print_dry_run(info: Any) -> None:
    from tabulate import tabulate

    click.echo(f"recipe {info.recipe}: {info.label}, "
               f"{info.parameters:,} parameters in the vanilla model")
    rows = [
        [lt["name"], lt["din"], lt["dout"], lt["k"], lt["rows_sparsified"], lt["cols_sparsified"],
         lt["keep"], f"{lt['params_before']:,}", f"{lt['params_after']:,}"]
        for lt in info.layers
    ]
    if rows:
        click.echo(tabulate(rows, ["layer", "Din", "Dout", "k", "rows sparsified",
                                   "cols sparsified", "kept per row/col", "params before",
                                   "params after (S as k×k)"], tablefmt="simple"))
    click.echo(f"theoretical C.R.: {info.theoretical_cr:.3f}× (paper's parameter count)")
    dep = info.deployed
    if dep is not None:
        span = "" if dep.exact else f" to {dep.ratio_max:.3f}× (depends on the selections)"
        click.echo(f"deployed C.R.: {dep.ratio:.3f}×{span} (whole model, parameters the "
                   f"exported graph stores: {dep.sparse_layout} layout, dead neurons "
                   f"{'removed' if dep.eliminate else 'kept'})")
    if len(info.rows) > 1:
        click.echo("compare rows (theoretical, from shapes):")
        click.echo(tabulate(
            [[r["name"], r["label"],
              f"{r['theoretical_cr']:.3f}×" if "theoretical_cr" in r else "skipped",
              f"{r['stored_cr']:.3f}×" if "stored_cr" in r else r.get("skipped", "")]
             for r in info.rows],
            ["row", "method", "C.R. paper", "C.R. stored (S as k; packed: +1 mask bit/weight)"],
            tablefmt="simple",
        ))
    for text in info.warnings:
        click.echo(f"warning: {text}")


def _print_differences(block: dict[str, Any], against: Callable[[str], str]) -> None:
    for name, per in block["differences"].items():
        parts = []
        for metric in ("eopp1", "eodd", "avg_precision"):
            d = per.get(metric)
            if d is None or None in (d["value"], d["low"], d["high"]):
                continue
            sig = "significant" if d["significant"] else "not significant"
            parts.append(f"{metric} {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                         f"({sig})")
        click.echo(f"{name} vs {against(name)}, {round(100 * block['confidence'])} % CI: "
                   + "; ".join(parts))


def _print_report(report: dict[str, Any]) -> None:
    from fairdeploy.report import terminal_text

    click.echo(terminal_text(report))
    for note in report.get("notes", []):
        click.echo(f"warning: {note}")
    boot = report.get("bootstrap")
    if boot:
        _print_differences(boot, lambda name: boot["baseline"])
    rank = report.get("bootstrap_rank")
    if rank and rank.get("differences"):
        _print_differences(rank, lambda name: rank["pairs"][name]["baseline"])
    rows = [m for m in report["methods"] if m.get("artifact")]
    if rows:
        passed = sum(m["artifact"]["verify"]["passed"] for m in rows)
        click.echo(f"exported and verified: {passed} of {len(rows)} rows PASSED "
                   "(<run folder>/<row>/model.onnx)")
    if report.get("plot"):
        click.echo(f"plot: {report['plot']} (Avg. precision against EOpp1 and EOdd)")
    ver = report.get("verify")
    if ver:
        click.echo(f"ONNX verify: {'PASSED' if ver['passed'] else 'FAILED'} "
                   f"(max |Δ| {ver['max_abs_error']:.3g} on {ver['samples']} test inputs)")
    onnx_info = report.get("onnx")
    if onnx_info:
        deployed = report["methods"][-1].get("compression", {}).get("deployed")
        if deployed:
            click.echo(f"deployed C.R.: {deployed['cr']:.3f}× (whole model, parameters stored)")
        click.echo(f"measured C.R.: initializers {onnx_info['initializer_cr']:.3f}×, "
                   f"files {onnx_info['file_cr']:.3f}×")
    click.echo(f"run folder: {report['run_dir']}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_apply(recipe_option)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: exports/<recipe>-<method>-<hash>).")
@click.option("--dry-run", is_flag=True,
              help="Validate recipe and checkpoint and print the plan; reads no data.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@_apply(device_option, trust_option, exports_option, cache_option)
def optimize(
    checkpoint: str, recipe_path: str, out: str | None, dry_run: bool, no_latency: bool,
    device: str, trust_checkpoint: bool, exports_dir: str, no_cache: bool,
) -> None:
    """Apply the recipe's method to CHECKPOINT; export, verify and report."""
    from fairdeploy import app

    if dry_run:
        _print_dry_run(app.dry_run(checkpoint, recipe_path, trust_checkpoint=trust_checkpoint))
        return
    _check_device(device)
    result = app.run_optimize(
        checkpoint, recipe_path, out=out, exports_dir=exports_dir, device=device,
        trust_checkpoint=trust_checkpoint, cache_dir=None if no_cache else "default",
        latency=not no_latency, echo=click.echo,
    )
    _print_report(result.report)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_apply(recipe_option)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: exports/<recipe>-compare-<hash>).")
@_apply(device_option, trust_option, exports_option, cache_option)
def compare(
    checkpoint: str, recipe_path: str, out: str | None, device: str, trust_checkpoint: bool,
    exports_dir: str, no_cache: bool,
) -> None:
    """Run every method of the recipe's compare list on CHECKPOINT: the paper's table."""
    from fairdeploy import app

    _check_device(device)
    result = app.run_compare(
        checkpoint, recipe_path, out=out, exports_dir=exports_dir, device=device,
        trust_checkpoint=trust_checkpoint, cache_dir=None if no_cache else "default",
        echo=click.echo,
    )
    _print_report(result.report)


@main.command()
@_apply(recipe_option)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the trained checkpoint.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override train.epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Override train.lr.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override train.batch_size.")
@click.option("--seed", type=int, default=None, help="Override train.seed.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming <output>.train.")
@_apply(device_option)
def train(
    recipe_path: str, output: str, epochs: int | None, lr: float | None,
    batch_size: int | None, seed: int | None, no_resume: bool, device: str,
) -> None:
    """Pre-train the recipe's model on its training split (the paper's schedule)."""
    from fairdeploy import app

    _check_device(device)
    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    result = app.run_train(
        recipe_path, output, overrides={k: v for k, v in overrides.items() if v is not None},
        resume=not no_resume, device=device,
    )
    last = result.history[-1] if result.history else {}
    if last:
        acc = last.get("val_accuracy", float("nan"))
        click.echo(f"epoch {last['epoch']}: val accuracy {acc:.4f}")
    click.echo(f"checkpoint: {output}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: exports/demo).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the demo recipe's training epochs.")
@_apply(exports_option)
def demo(out: str | None, epochs: int | None, exports_dir: str) -> None:
    """FairLRF end to end on CelebA's attribute table (needs the demo extra)."""
    from fairdeploy import app

    result = app.run_demo(exports_dir=exports_dir, out=out, epochs=epochs, echo=click.echo)
    _print_report(result.report)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True,
              help="Classes to print per input.")
@_apply(provider_option, json_option)
def predict(
    model: str, inputs: tuple[str, ...], top: int, provider: str, json_path: str | None
) -> None:
    """Classify INPUTS (images, or .npy/.csv feature rows) with MODEL, using only its metadata."""
    from fairdeploy.serve import predict_files

    results = predict_files(model, list(inputs), top=top, provider=provider)
    for r in results:
        classes = ", ".join(f"{c['class']} {c['probability']:.3f}" for c in r["top"])
        click.echo(f"{r['input']}: {classes}")
    _write_json(json_path, {"predictions": results})


if __name__ == "__main__":  # pragma: no cover
    main()
