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
from pathlib import Path
from typing import Any

import click

from fairdeploy.comparison import DEFAULT_ATOL, DEFAULT_RTOL
from fairdeploy.errors import FairDeployError


class _Number(click.ParamType):
    """A number option read by the one number grammar (:mod:`fairdeploy.grammar`: 0.5,
    1e-3, 1/2.5, 50%), within ``[min, max]`` (``min_open``: above ``min``). ``nan``,
    ``inf``, ``1/0`` and huge exponents are usage errors, as everywhere numbers are text."""

    name = "number"

    def __init__(self, min: float = 0.0, max: float | None = None, *, min_open: bool = False):
        self.min, self.max, self.min_open = min, max, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from fairdeploy.grammar import NumberError, parse_number

        if isinstance(value, float):
            return value
        try:
            number = parse_number(str(value), what="number")
        except NumberError as exc:
            self.fail(f"{exc.text!r} {exc.problem}", param, ctx)
        low_ok = number > self.min if self.min_open else number >= self.min
        if not low_ok or (self.max is not None and number > self.max):
            low = f"> {self.min:g}" if self.min_open else f"≥ {self.min:g}"
            high = "" if self.max is None else f" and ≤ {self.max:g}"
            self.fail(f"{value!r} is not allowed: use a number {low}{high}", param, ctx)
        return number


class _Group(click.Group):
    """A click group that turns FairDeployError into ``Error: ...`` and exit code 1.

    Operating-system errors (a full disk, a folder without write permission) are the
    user's environment, not a bug: they get the same one-line treatment.
    """

    def invoke(self, ctx: click.Context) -> Any:
        import warnings

        default_format = warnings.formatwarning
        warnings.formatwarning = _warning_format(default_format)
        try:
            return super().invoke(ctx)
        except FairDeployError as exc:
            # One line, whatever a message quoted: its lines joined with "; ".
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise click.ClickException("; ".join(lines) or type(exc).__name__) from None
        except OSError as exc:
            import errno

            where = f" ({exc.filename})" if exc.filename else ""
            if not exc.filename and exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
                where = (" while writing a file: check the free disk space and the file "
                         "size limit (ulimit -f)")
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        finally:
            warnings.formatwarning = default_format


def _warning_format(default: Callable[..., str]) -> Callable[..., str]:
    """``warnings.formatwarning`` for the CLI: a warning raised inside fairdeploy (it is
    written for the user) as one ``warning: ...`` line, without Python's ``file:line``
    prefix and source line; any other library's as ``default`` formats it. (Only the
    format is replaced: warnings are still filtered, shown once and recordable.)"""
    from fairdeploy import __file__ as package_init

    package = Path(package_init).resolve().parent

    def format_warning(message: Warning | str, category: type[Warning], filename: str,
                       lineno: int, line: str | None = None) -> str:
        if Path(filename).resolve().is_relative_to(package):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


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


def _trust_recipe(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # for this command only: ends with its context
        from fairdeploy._trust import trusting_recipes

        ctx.with_resource(trusting_recipes())


recipe_trust_option = click.option(
    "--trust-recipe", is_flag=True, expose_value=False, callback=_trust_recipe,
    help="Allow the recipe to import code of its own (a package.module:Class method or "
         "package.module:factory architecture; runs that module: only for recipes you "
         "trust). Same as FAIRDEPLOY_TRUST_RECIPE=1.",
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

    # Strict JSON: every number that is not finite was written as null by its record.
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="fairdeploy")
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
@click.option("--atol", type=_Number(min=0), default=None,
              help=f"Absolute tolerance (default {DEFAULT_ATOL:g}; model.int8.onnx: the one its "
                   "metadata records).")
@click.option("--rtol", type=_Number(min=0), default=None,
              help=f"Relative tolerance (default {DEFAULT_RTOL:g}; model.int8.onnx: recorded).")
@click.option("--runtime", "runtimes", multiple=True, default=("onnxruntime",),
              show_default=True,
              help="Runtime(s) to run MODEL in: onnxruntime, openvino (pip install "
                   "'fairdeploy[openvino]'), reference (onnx.reference, slow); repeat or "
                   "comma-separate for several.")
@_apply(provider_option, trust_option, recipe_trust_option, json_option)
def verify(
    model: str, reference: str | None, checkpoint: str | None, recipe_path: str | None,
    split: str, samples: int | None, atol: float | None, rtol: float | None,
    runtimes: tuple[str, ...], provider: str, trust_checkpoint: bool, json_path: str | None,
) -> None:
    """Check MODEL and compare a runtime's outputs with a reference; exit 1 on failure.

    The reference is REFERENCE, or MODEL's <name>.verify.npz, or --checkpoint with
    --recipe (then the group fairness of the ONNX model's predictions on that split is
    reported too). With several --runtime, each gives its own verdict.
    """
    from fairdeploy.runtimes import load_runtime_check, parse_runtimes
    from fairdeploy.verification import verify_runtimes

    runtimes = parse_runtimes(runtimes)
    for rt in runtimes:  # refused before the reference is computed
        load_runtime_check(rt)

    privileged = None
    notes: list[str] = []
    if (checkpoint is None) != (recipe_path is None):
        raise click.UsageError("--checkpoint and --recipe go together")
    if checkpoint is not None:
        if reference is not None:
            raise click.UsageError("give either --reference or --checkpoint/--recipe")
        from fairdeploy.commands import verify as command

        notes = command.reference_notes(model, checkpoint)
        reference, privileged = command.reference_from_checkpoint(
            model, checkpoint, recipe_path, split=split, samples=samples,
            trust_checkpoint=trust_checkpoint, progress=True,
        )
    result = verify_runtimes(model, runtimes, reference=reference, atol=atol, rtol=rtol,
                             provider=provider, privileged=privileged, notes=notes,
                             progress=True)
    for line in result.summary_lines():
        click.echo(line)
    _write_json(json_path, result.to_dict())
    if not result:
        click.get_current_context().exit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write (default: <name>.unpacked.onnx beside MODEL).")
def unpack(model: str, output: str | None) -> None:
    """Write packed MODEL with its weights rebuilt once: a dense file that loads as fast
    as a dense export (and is as large); it computes bit for bit what MODEL computes."""
    from pathlib import Path

    from fairdeploy.export import unpack_weights, verify_npz_path

    src = Path(model)
    out = Path(output) if output else src.with_name(src.stem + ".unpacked.onnx")
    rep = unpack_weights(src, out)
    click.echo(f"{out}: {len(rep.initializers)} packed weights written dense, "
               f"{rep.nodes_removed} rebuild nodes removed, {rep.file_bytes_before:,} -> "
               f"{rep.file_bytes_after:,} bytes")
    if verify_npz_path(src).is_file():
        click.echo(f"check it: fairdeploy verify {out} --reference {verify_npz_path(src)}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Model to compare with, timed interleaved with MODEL (default: the "
                   "vanilla.onnx that optimize keeps beside MODEL, named in its metadata).")
@click.option("--no-baseline", is_flag=True, help="Time MODEL alone.")
@click.option("--batch", "batches", default="1,32", show_default=True, callback=_batch_list,
              help="Comma-separated batch sizes.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--max-seconds", type=_Number(min=0, min_open=True), default=20.0,
              show_default=True,
              help="Time budget per batch size and scope (at least 5 timed runs per model; "
                   "--iters caps the runs).")
@click.option("--layer", "layers", multiple=True,
              help="Also time this layer's sub-graph (repeatable; default: the factorized "
                   "layers in MODEL's metadata).")
@_apply(threads_option, provider_option, json_option)
def bench(
    model: str, baseline: str | None, no_baseline: bool, batches: tuple[int, ...], iters: int,
    warmup: int, layers: tuple[str, ...], threads: int | None, provider: str,
    json_path: str | None, max_seconds: float | None,
) -> None:
    """Time MODEL (against a baseline) in ONNX Runtime: median and p90 per batch size.

    Without --baseline, the vanilla export that optimize keeps beside MODEL
    (vanilla.onnx, named in MODEL's metadata) is the baseline.
    """
    from fairdeploy.bench import default_baseline, measure_latency, measure_layer_latency
    from fairdeploy.export import read_metadata

    if baseline is not None and no_baseline:
        raise click.UsageError("give either --baseline or --no-baseline")
    if baseline is None and not no_baseline:
        found, why = default_baseline(model)
        if found is not None:
            baseline = str(found)
            click.echo(f"baseline: {baseline} (the vanilla export named in the model's "
                       "metadata; --baseline FILE for another, --no-baseline for none)")
        elif why:
            click.echo(f"no baseline: {why}")
    common = {"batches": batches, "threads": threads, "provider": provider,
              "warmup": warmup, "iters": iters, "max_seconds": max_seconds, "progress": True}
    results = [measure_latency(model, baseline, label="model", **common)]
    if not layers:
        layers = tuple(row["layer"] for row in read_metadata(model).get("layers", []))
    for layer in layers:
        results.append(measure_layer_latency(model, layer, baseline, **common))
    from pathlib import Path

    names = {"candidate": Path(model).name}
    if baseline is not None:
        names["baseline"] = Path(baseline).name
        if names["baseline"] == names["candidate"]:
            names = {"candidate": "model", "baseline": "baseline"}
    for r in results:
        for line in r.summary_lines(names):
            click.echo(line)
    _write_json(json_path, {"baseline": baseline, "results": [r.to_dict() for r in results]})


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
                                   "params after (S as k×k)"], tablefmt="simple",
                            disable_numparse=True))
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
            tablefmt="simple", disable_numparse=True,
        ))
    if info.export_check:
        click.echo(f"ONNX export: {info.export_check}")
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
    click.echo(f"run folder: {report['run_dir']}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_apply(recipe_option)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: exports/<recipe>-<method>-<hash>).")
@click.option("--dry-run", is_flag=True,
              help="Validate recipe and checkpoint, print the plan and check that the model "
                   "exports to ONNX; reads no data.")
@click.option("--latency", "latency", type=click.Choice(["quick", "full", "off"]),
              default=None,
              help="Latency measurement: quick (a few seconds in all), full (the recipe's "
                   "report.latency_seconds per batch size), off. Default: the recipe's "
                   "report.latency (quick).")
@click.option("--no-latency", is_flag=True, help="Same as --latency off (kept for scripts).")
@_apply(device_option, trust_option, recipe_trust_option, exports_option, cache_option)
def optimize(
    checkpoint: str, recipe_path: str, out: str | None, dry_run: bool, latency: str | None,
    no_latency: bool, device: str, trust_checkpoint: bool, exports_dir: str, no_cache: bool,
) -> None:
    """Apply the recipe's method to CHECKPOINT; export, verify and report."""
    from fairdeploy.commands import optimize as command

    _check_device(device)  # a dry run checks the device the real run would use, too
    if dry_run:
        _print_dry_run(command.dry_run(checkpoint, recipe_path, trust_checkpoint=trust_checkpoint,
                                       progress=True))
        return
    if no_latency and latency not in (None, "off"):
        raise click.UsageError("give either --no-latency or --latency")
    result = command.run_optimize(
        checkpoint, recipe_path, out=out, exports_dir=exports_dir, device=device,
        trust_checkpoint=trust_checkpoint, cache_dir=None if no_cache else "default",
        latency="off" if no_latency else (latency or True), echo=click.echo,
    )
    _print_report(result.report)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_apply(recipe_option)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: exports/<recipe>-compare-<hash>).")
@_apply(device_option, trust_option, recipe_trust_option, exports_option, cache_option)
def compare(
    checkpoint: str, recipe_path: str, out: str | None, device: str, trust_checkpoint: bool,
    exports_dir: str, no_cache: bool,
) -> None:
    """Run every method of the recipe's compare list on CHECKPOINT: the paper's table."""
    from fairdeploy.commands import compare as command

    _check_device(device)
    result = command.run_compare(
        checkpoint, recipe_path, out=out, exports_dir=exports_dir, device=device,
        trust_checkpoint=trust_checkpoint, cache_dir=None if no_cache else "default",
        echo=click.echo,
    )
    _print_report(result.report)


def _print_sweep(result: Any, checkpoint: Any) -> None:
    """The sweep's outcome on the terminal: files, the choice, its test comparison, and
    the command that deploys the choice (with the sweep's own checkpoint)."""
    import shlex

    from fairdeploy.sweep import describe_settings, difference_words

    points = [r for r in result.rows if r.kind == "point"]
    click.echo(f"sweep: {len(points)} points on the validation split -> {result.out_dir}")
    for name in ("csv", "md"):
        if name in result.files:
            click.echo(f"  {result.files[name]}")
    if result.message:
        click.echo(result.message)
    test = result.test
    if test:
        click.echo("test split (read once): " + "; ".join(
            f"{test['labels'][k]}: EOdd {m['fairness']['eodd']:.4f}, avg precision "
            f"{m['precision']['avg']:.4f}" for k, m in test["metrics"].items()
        ))
        rule = [m["metric"] for m in test["verdict"].get("moves", ())]
        for against, key in (("vanilla", "vs_vanilla"), ("truncated SVD", "vs_svd")):
            click.echo(f"test split, chosen − {against} (95 % CI): "
                       + difference_words(test[key], rule))
        click.echo(test["verdict"]["text"][0].upper() + test["verdict"]["text"][1:] + ".")
        written = result.files.get("written_recipe", result.files["chosen_recipe"])
        click.echo(f"chosen recipe: {result.files['chosen_recipe']} ("
                   f"{describe_settings(result.chosen.settings)}); deploy it with "
                   f"fairdeploy optimize {shlex.quote(str(checkpoint))} --recipe "
                   f"{shlex.quote(str(written))}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_apply(recipe_option)
@click.option("--grid", "grid", multiple=True, metavar="KEY=VALUES",
              help="A grid key and its values (repeatable): sr=0:0.9:0.1 (inclusive range), "
                   "rr=0,0.25,0.5, beta=1/3,5/9,0.8, rank=16,64, layer=classifier.0,classifier.3 "
                   "or layer=all. Replaces the recipe's sweep.grid entry of that key.")
@click.option("--method", "methods", multiple=True,
              help="A low-rank method to sweep (repeatable; default: the recipe's method).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Independent scoring draws per point (overrides scoring.repeats); the tables "
                   "show the median and range over draws.")
@click.option("--select", "select", default=None, metavar="RULE",
              help="Choose a point on the validation split, e.g. "
                   "\"min eodd s.t. avg_precision >= vanilla - 0.01\" (grammar: README, "
                   "'Sweeps'); the chosen point is then evaluated once on the test split.")
@click.option("--no-guard", is_flag=True,
              help="Switch off the collapse guard (accuracy / macro recall within the tolerance "
                   "of vanilla, no group's class rate below half of vanilla's).")
@click.option("--guard-tolerance", type=_Number(min=0, max=1), default=None,
              help="The guard's tolerance (default: the rule's 'vanilla - t', else 0.01).")
@click.option("--write-recipe", type=click.Path(dir_okay=False), default=None,
              help="Also write the chosen setting as a runnable recipe here (always written as "
                   "chosen.yaml in the sweep folder).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Sweep folder (default: exports/<recipe>-sweep-<hash>); a rerun resumes it.")
@click.option("--restart", is_flag=True,
              help="Discard the folder's journal (another checkpoint's or recipe's sweep) and "
                   "start over.")
@click.option("--no-plots", is_flag=True, help="Do not write the PNG plots.")
@click.option("--yes", is_flag=True,
              help="Run a sweep over the work limits (20,000 evaluations, 100 draws per "
                   "point), which is otherwise refused before it starts.")
@_apply(device_option, trust_option, recipe_trust_option, exports_option, cache_option)
def sweep(
    checkpoint: str, recipe_path: str, grid: tuple[str, ...], methods: tuple[str, ...],
    repeats: int | None, select: str | None, no_guard: bool, guard_tolerance: float | None,
    write_recipe: str | None, out: str | None, restart: bool, no_plots: bool, yes: bool,
    device: str, trust_checkpoint: bool, exports_dir: str, no_cache: bool,
) -> None:
    """Evaluate a grid of settings on the validation split and (with --select) choose one.

    Every point is evaluated against vanilla and truncated SVD at the same rank, reusing
    cached features, SVD factors and Hessians; finished points are journaled, so an
    interrupted sweep resumes. Exit code 1 when no point satisfies --select.
    """
    from fairdeploy.commands import sweep as command

    _check_device(device)
    result = command.run_sweep(
        checkpoint, recipe_path, grid=grid, methods=methods or None, repeats=repeats,
        select=select, guard=False if no_guard else None, guard_tolerance=guard_tolerance,
        write_recipe=write_recipe, out=out, exports_dir=exports_dir, device=device,
        trust_checkpoint=trust_checkpoint, cache_dir=None if no_cache else "default",
        plots=False if no_plots else None, restart=restart, yes=yes, echo=click.echo,
    )
    _print_sweep(result, checkpoint)
    if result.message and result.chosen is None:
        click.get_current_context().exit(1)


@main.command()
@_apply(recipe_option)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the trained checkpoint.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override train.epochs.")
@click.option("--lr", type=_Number(min=0, min_open=True), default=None,
              help="Override train.lr.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override train.batch_size.")
@click.option("--seed", type=int, default=None, help="Override train.seed.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming <output>.train.")
@_apply(device_option, recipe_trust_option)
def train(
    recipe_path: str, output: str, epochs: int | None, lr: float | None,
    batch_size: int | None, seed: int | None, no_resume: bool, device: str,
) -> None:
    """Pre-train the recipe's model on its training split (the paper's schedule)."""
    from fairdeploy.commands import train as command

    _check_device(device)
    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    result = command.run_train(
        recipe_path, output, overrides={k: v for k, v in overrides.items() if v is not None},
        resume=not no_resume, device=device,
    )
    last = result.history[-1] if result.history else {}
    if last:
        acc = last.get("val_accuracy", float("nan"))
        click.echo(f"epoch {last['epoch']}: val accuracy {acc:.4f}")
    if result.unchanged:
        n = len(result.history)
        done = "its 1 epoch was" if n == 1 else f"all {n} epochs were"
        click.echo(f"checkpoint: {output} (unchanged: {done} already done; --epochs N to "
                   "train longer, --no-resume to start over)")
    else:
        click.echo(f"checkpoint: {output}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: exports/demo).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the demo recipe's training epochs.")
@click.option("--sweep", "sweep_", is_flag=True,
              help="Sweep the demo recipe's grid on the validation split, choose a point by "
                   "its rule and compare it on test with vanilla and truncated SVD "
                   "(exports/demo-sweep).")
@_apply(exports_option)
def demo(out: str | None, epochs: int | None, sweep_: bool, exports_dir: str) -> None:
    """FairLRF end to end on CelebA's attribute table (needs the demo extra)."""
    # Importing torch and the pipeline takes seconds (10 s on a busy 2-core machine).
    click.echo("fairdeploy demo: loading PyTorch and the pipeline ...")
    from fairdeploy.commands import train as command

    result = command.run_demo(exports_dir=exports_dir, out=out, epochs=epochs,
                              echo=click.echo, sweep=sweep_)
    if sweep_:
        _print_sweep(result, command.demo_checkpoint_path(exports_dir))
        if result.message and result.chosen is None:
            click.get_current_context().exit(1)
        return
    _print_report(result.report)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True,
              help="Classes to print per input.")
@click.option("--strict", is_flag=True,
              help="Stop at the first unreadable input instead of skipping it with a warning.")
@_apply(provider_option, json_option)
def predict(
    model: str, inputs: tuple[str, ...], top: int, strict: bool, provider: str,
    json_path: str | None,
) -> None:
    """Classify INPUTS (images or folders of them, or .npy/.csv feature rows) with MODEL,
    using only its metadata. Unreadable files are skipped with a warning (--strict stops)."""
    from fairdeploy.serve import predict as run_predict

    result = run_predict(model, list(inputs), top=top, provider=provider, strict=strict)
    for r in result.predictions:
        classes = ", ".join(f"{c['class']} {c['probability']:.3f}" for c in r["top"])
        click.echo(f"{r['input']}: {classes}")
    for path, why in result.skipped:
        click.echo(f"warning: skipped {path}: {why}", err=True)
    _write_json(json_path, {
        "predictions": result.predictions,
        "skipped": [{"input": p, "reason": why} for p, why in result.skipped],
    })


@main.group()
def cache() -> None:
    """Inspect or empty the persisted cache (features, SVD factors, Hessians, vanilla
    exports) under <exports>/.cache."""


def _cache_dir(exports_dir: str) -> Any:
    from pathlib import Path

    return Path(exports_dir) / ".cache"


def _megabytes(n: int) -> str:
    from fairdeploy._text import nbytes

    return nbytes(n)


def _files(n: int) -> str:
    from fairdeploy._text import plural

    return plural(n, "file")


@cache.command("ls")
@_apply(exports_option, json_option)
def cache_ls(exports_dir: str, json_path: str | None) -> None:
    """List the cache's entries: size, last use, and the checkpoint each belongs to."""
    import time

    from tabulate import tabulate

    from fairdeploy._text import ago, plural
    from fairdeploy.cache_files import cache_entries

    directory = _cache_dir(exports_dir)
    entries = cache_entries(directory)
    if not entries:
        click.echo(f"{directory}: empty")
    else:
        now = time.time()
        rows = []
        for e in entries:
            if e.checkpoints:
                owner = ", ".join(e.checkpoints)
            elif e.checkpoint_sha256:
                owner = f"sha256 {e.checkpoint_sha256[:12]}… (no run folder names it)"
            else:
                owner = "unknown"
            rows.append([e.kind, _megabytes(e.size), ago(now - e.last_used), owner, e.what,
                         e.path.name])
        total = sum(e.size for e in entries)
        click.echo(f"{directory}: {plural(len(entries), 'entry', 'entries')}, "
                   f"{_megabytes(total)}")
        click.echo(tabulate(rows, ["kind", "size", "last used", "checkpoint", "what", "file"],
                            tablefmt="simple", disable_numparse=True))
    _write_json(json_path, {"directory": str(directory),
                            "entries": [e.to_dict() for e in entries]})


@cache.command("clear")
@_apply(exports_option)
def cache_clear(exports_dir: str) -> None:
    """Delete every cache entry (they are recomputed when needed)."""
    from fairdeploy.cache_files import clear_cache

    directory = _cache_dir(exports_dir)
    removed = clear_cache(directory)
    click.echo(f"{directory}: removed {_files(removed.files)}, {_megabytes(removed.bytes)}")


@cache.command("prune")
@click.option("--keep-days", type=_Number(min=0), required=True,
              help="Keep entries used within this many days; delete the others.")
@_apply(exports_option)
def cache_prune(keep_days: float, exports_dir: str) -> None:
    """Delete the cache entries not used for more than --keep-days days."""
    from fairdeploy.cache_files import prune_cache

    directory = _cache_dir(exports_dir)
    removed = prune_cache(directory, keep_days=keep_days)
    click.echo(f"{directory}: removed {_files(removed.files)}, {_megabytes(removed.bytes)}; "
               f"kept {_files(removed.kept)}")


if __name__ == "__main__":  # pragma: no cover
    main()
