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
    """A click group that turns FairDeployError into ``Error: ...`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FairDeployError as exc:
            raise click.ClickException(str(exc)) from None


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


def _apply(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for d in reversed(decorators):
            f = d(f)
        return f

    return deco


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".json", delete=False) as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        tmp = f.name
    os.replace(tmp, target)


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
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@_apply(provider_option, json_option)
def verify(
    model: str, reference: str | None, atol: float, rtol: float, provider: str,
    json_path: str | None,
) -> None:
    """Check MODEL and compare ONNX Runtime's outputs with a reference; exit 1 on failure."""
    from fairdeploy.verify import verify as run_verify

    result = run_verify(model, reference=reference, atol=atol, rtol=rtol, provider=provider)
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
@click.option("--layer", "layers", multiple=True,
              help="Also time this layer's sub-graph (repeatable; default: the factorized "
                   "layers in MODEL's metadata).")
@_apply(threads_option, provider_option, json_option)
def bench(
    model: str, baseline: str | None, batches: tuple[int, ...], iters: int, warmup: int,
    layers: tuple[str, ...], threads: int | None, provider: str, json_path: str | None,
) -> None:
    """Time MODEL (and BASELINE) in ONNX Runtime: median and p90 per batch size."""
    from fairdeploy.bench import measure_latency, measure_layer_latency
    from fairdeploy.export import read_metadata

    common = {"batches": batches, "threads": threads, "provider": provider,
              "warmup": warmup, "iters": iters}
    results = [measure_latency(model, baseline, label="model", **common)]
    if not layers:
        layers = tuple(row["layer"] for row in read_metadata(model).get("layers", []))
    for layer in layers:
        results.append(measure_layer_latency(model, layer, baseline, **common))
    for r in results:
        for line in r.summary_lines():
            click.echo(line)
    _write_json(json_path, {"results": [r.to_dict() for r in results]})


if __name__ == "__main__":  # pragma: no cover
    main()
