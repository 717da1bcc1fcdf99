"""Latency of ONNX models in ONNX Runtime: whole models and a factorized layer's sub-graph.

Method (DESIGN.md §6): warm-up runs, then many timed iterations; the candidate and the
baseline are timed interleaved (one run of each per iteration, so drift in machine load
hits both alike) with worker-thread spinning turned off
(``session.intra_op.allow_spinning = 0``), because a spinning session steals cores from
the next one and distorts the ratio; median and p90 per model and batch size, with the
thread count and provider recorded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy._json import JsonRecord
from fairdeploy._text import plural
from fairdeploy.errors import FairDeployError
from fairdeploy.progress import phase

__all__ = [
    "DEFAULT_BENCH_SECONDS",
    "LatencyResult",
    "Timing",
    "default_baseline",
    "extract_layer",
    "layer_nodes",
    "measure_latency",
    "measure_layer_latency",
]


@dataclass(frozen=True)
class Timing(JsonRecord):
    """Latency of one model at one batch size, in milliseconds."""

    model: str
    batch: int
    median_ms: float
    p90_ms: float
    iters: int


@dataclass(frozen=True)
class LatencyResult:
    """Timings of a candidate (and optionally a baseline) per batch size.

    Attributes
    ----------
    timings : list of Timing
        One per (model, batch); model is ``"candidate"`` or ``"baseline"``.
    ratios : dict
        Batch → baseline median ÷ candidate median (speed-up), when a baseline was given.
    threads : int or None
        Intra-op threads (None: ONNX Runtime's default).
    provider : str
        The provider that actually ran.
    spinning : bool
        Whether worker threads were allowed to spin.
    mode : str
        ``"interleaved"`` (one run of each model in turn, so a change in machine load hits
        both alike) or ``"blocks"`` (each model timed alone, one after the other).
    label : str
        What was timed (``model``, ``layer classifier.3``).
    skipped : dict
        Batch → why it was not timed (a time budget too small for a model this slow).
    """

    timings: list[Timing]
    ratios: dict[int, float] = field(default_factory=dict)
    threads: int | None = None
    provider: str = "CPUExecutionProvider"
    spinning: bool = False
    mode: str = "interleaved"
    label: str = ""
    skipped: dict[int, str] = field(default_factory=dict)

    def timing(self, model: str, batch: int) -> Timing:
        """The timing of ``model`` (``candidate``/``baseline``) at ``batch``."""
        for t in self.timings:
            if t.model == model and t.batch == batch:
                return t
        raise KeyError((model, batch))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for report.json)."""
        return {
            "label": self.label,
            "timings": [t.to_dict() for t in self.timings],
            "ratios": {str(b): r for b, r in self.ratios.items()},
            "threads": self.threads,
            "provider": self.provider,
            "spinning": self.spinning,
            "mode": self.mode,
            "skipped": {str(b): why for b, why in self.skipped.items()},
        }

    def summary_lines(self, names: dict[str, str] | None = None) -> list[str]:
        """Human-readable lines, in plain words.

        ``names`` maps ``candidate``/``baseline`` to what to call them (default: the
        model's file name and ``baseline``).
        """
        names = {"candidate": "model", "baseline": "baseline", **(names or {})}
        how = (
            "timed interleaved: one run of each model in turn, so load changes hit both"
            if self.mode == "interleaved"
            else "each model timed alone"
        )
        threads = plural(self.threads, "thread") if self.threads else "default threads"
        scope = "whole model" if self.label in ("", "model") else self.label
        lines = [
            f"{scope}: {self.provider}, {threads}, {how}, "
            f"worker-thread spinning {'on' if self.spinning else 'off'}"
        ]
        width = max(len(n) for n in names.values())
        for t in self.timings:
            lines.append(
                f"  {names.get(t.model, t.model):<{width}}  batch {t.batch:<4} median "
                f"{t.median_ms:9.3f} ms  p90 {t.p90_ms:9.3f} ms  ({plural(t.iters, 'run')})"
            )
        for b, r in self.ratios.items():
            # A ratio below 1 is a slowdown: "0.94× as fast" reads as a gain at a glance.
            speed = (f"{r:.2f}× as fast as {names['baseline']}" if r >= 1 else
                     f"{1 / r:.2f}× slower than {names['baseline']} ({r:.2f}× its speed)")
            lines.append(f"  at batch {b}: {names['candidate']} is {speed}")
        for b, why in self.skipped.items():
            lines.append(f"  batch {b}: not timed ({why})")
        return lines


def _input_array(sess: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = {}
    rng = np.random.default_rng(seed)
    for inp in sess.get_inputs():
        shape = [batch if i == 0 else d for i, d in enumerate(inp.shape)]
        if any(not isinstance(d, int) for d in shape):
            raise FairDeployError(
                f"input {inp.name!r} has a symbolic non-batch dimension {inp.shape}: only the "
                "batch axis may be dynamic for bench"
            )
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# Timed runs per model that a time budget never cuts below.
_MIN_ITERS = 5

#: ``fairdeploy bench``'s default time budget per batch size (and per layer sub-graph):
#: without one, 100 runs of a whole VGG at batch 32 took 7 silent minutes on a 2-core CPU.
DEFAULT_BENCH_SECONDS = 20.0


def _check_batches(batches: Any) -> tuple[int, ...]:
    out = tuple(int(b) for b in batches)
    if not out or any(b < 1 for b in out):
        raise FairDeployError(f"--batch {batches!r} is not allowed: use sizes ≥ 1, e.g. 1,32")
    return out


def _predicted_overrun(per_sample: float, batch: int, min_iters: int, budget: float) -> str:
    """Why ``batch`` cannot fit in ``budget`` seconds, predicted from the seconds per
    sample of one round of runs at the last batch size timed ("" when it may fit).

    Time grows at most linearly with the batch (the per-sample cost falls as the batch
    grows), so the prediction is pessimistic: a batch size is skipped unseen only when
    even a single round is predicted to take the whole budget; otherwise one warm-up
    round decides (see :func:`_time_sessions`).
    """
    if per_sample * batch <= budget:
        return ""
    return (
        f"one run of each model would take about {per_sample * batch:.2f} s (from the "
        f"smaller batch): {min_iters} runs do not fit the {budget:.2f} s budget"
    )


def _time_sessions(
    sessions: dict[str, Any],
    batches: tuple[int, ...],
    *,
    warmup: int,
    iters: int,
    interleaved: bool,
    max_seconds: float | None = None,
    min_iters: int = _MIN_ITERS,
    skip_over_budget: bool = False,
    on_runs: Any = None,
) -> tuple[list[Timing], dict[int, str]]:
    """Time every batch size; ``on_runs(n)`` is told of every timed round (and of the
    rounds a batch size will not run: the budget cut them or it was skipped), so a
    progress bar over ``len(batches) × iters × blocks`` rounds moves and ends full."""
    advance = on_runs if on_runs is not None else (lambda n: None)
    planned = iters * (1 if interleaved else len(sessions))
    timings: list[Timing] = []
    skipped: dict[int, str] = {}
    budget = float("inf") if max_seconds is None else max_seconds
    per_sample = 0.0  # seconds of one round of runs per sample, from the last batch size
    for batch in batches:
        why = _predicted_overrun(per_sample, batch, min_iters, budget)
        if skip_over_budget and why:
            skipped[batch] = why
            advance(planned)
            continue
        feeds = {name: _input_array(s, batch) for name, s in sessions.items()}
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        order = list(sessions)
        start = time.perf_counter()
        last = dict.fromkeys(order, 0.0)
        for name in order:
            for i in range(max(warmup, 1 if skip_over_budget else 0)):
                if i and time.perf_counter() - start > budget / 4:
                    break  # one warm-up run is enough for a model this slow
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[name])
                last[name] = time.perf_counter() - t0
        per_round = sum(last.values())
        per_sample = per_round / batch
        if skip_over_budget and per_round * min_iters > budget:
            skipped[batch] = (
                f"one run of each model takes {per_round:.2f} s: {min_iters} runs do not fit "
                f"the {budget:.2f} s budget"
            )
            advance(planned)
            continue
        blocks = [order] if interleaved else [[n] for n in order]
        for block in blocks:
            start = time.perf_counter()
            for i in range(iters):
                if i >= min_iters and time.perf_counter() - start > budget / len(blocks):
                    advance(iters - i)
                    break
                for name in block:
                    t0 = time.perf_counter()
                    sessions[name].run(None, feeds[name])
                    samples[name].append(time.perf_counter() - t0)
                advance(1)
        for name in order:
            a = np.asarray(samples[name]) * 1e3
            timings.append(
                Timing(name, batch, float(np.median(a)), float(np.percentile(a, 90)), len(a))
            )
    return timings, skipped


def measure_latency(
    candidate: str | os.PathLike[str] | bytes,
    baseline: str | os.PathLike[str] | bytes | None = None,
    *,
    batches: tuple[int, ...] | list[int] = (1, 32),
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    iters: int = 100,
    interleaved: bool = True,
    spinning: bool = False,
    label: str = "",
    max_seconds: float | None = None,
    min_iters: int = _MIN_ITERS,
    skip_over_budget: bool = False,
    progress: bool = False,
) -> LatencyResult:
    """Time ONNX models in ONNX Runtime.

    Parameters
    ----------
    candidate, baseline : path-like or bytes
        The models (bytes: a serialized ModelProto, e.g. an extracted sub-graph).
    batches : sequence of int
        Batch sizes (the model's batch axis must be dynamic).
    threads : int, optional
        Intra-op threads per session.
    provider : {"auto", "cpu", "cuda"}
        Execution provider.
    warmup, iters : int
        Untimed and timed runs per model and batch.
    interleaved : bool
        Alternate candidate and baseline runs (default) or time each in its own block.
    spinning : bool
        Allow worker threads to spin (off by default; see the module docstring).
    max_seconds : float, optional
        Time budget per batch size: timed runs stop when it is spent (never below
        ``min_iters`` per model; each Timing records how many ran), warm-up after a
        quarter of it. A whole VGG at batch 128 takes seconds per run on a small CPU.
    min_iters : int
        Timed runs per model that the budget never cuts below (default 5).
    skip_over_budget : bool
        Skip a batch size (recorded in ``skipped``) when one warm-up run of each model
        shows that ``min_iters`` runs would not fit in ``max_seconds``; keeps a quick
        measurement quick on a slow model.
    progress : bool
        Report progress per batch size (:mod:`fairdeploy.progress`).

    Returns
    -------
    LatencyResult
        Median and p90 per model and batch, and the baseline/candidate ratio.
    """
    from fairdeploy.providers import make_session, session_provider

    batches = _check_batches(batches)
    if warmup < 0 or iters < 1 or min_iters < 1:
        raise FairDeployError(
            f"warmup={warmup}, iters={iters}, min_iters={min_iters}: use warmup ≥ 0 and "
            "iters, min_iters ≥ 1"
        )
    sessions = {"candidate": _session(candidate, provider, threads, spinning, make_session)}
    if baseline is not None:
        sessions["baseline"] = _session(baseline, provider, threads, spinning, make_session)
    what = f"latency: {'whole model' if label in ('', 'model') else label}"
    blocks = 1 if interleaved or baseline is None else 2
    with phase(what, total=len(batches) * iters * blocks, unit="timed round",
               enabled=progress) as bar:
        if max_seconds is not None:
            bar.status(f"at most {max_seconds:g} s per batch size")
        timings, skipped = _time_sessions(
            sessions, batches, warmup=warmup, iters=iters, interleaved=interleaved,
            max_seconds=max_seconds, min_iters=min_iters, skip_over_budget=skip_over_budget,
            on_runs=bar.advance,
        )
    result = LatencyResult(
        timings=timings,
        threads=threads,
        provider=session_provider(sessions["candidate"]),
        spinning=spinning,
        mode="interleaved" if interleaved and baseline is not None else "blocks",
        label=label,
        skipped=skipped,
    )
    if baseline is not None:
        for b in batches:
            if b in skipped:
                continue
            ratio = result.timing("baseline", b).median_ms / result.timing("candidate", b).median_ms
            result.ratios[b] = ratio
    return result


def default_baseline(model: str | os.PathLike[str]) -> tuple[Path | None, str]:
    """The baseline ``optimize`` keeps beside a model: ``vanilla.onnx``, named (with its
    SHA-256) in the model's ``fairdeploy.baseline`` metadata.

    Returns the path, or None and why not (empty when the model names no baseline).
    """
    from fairdeploy.cache import file_sha256
    from fairdeploy.export import read_metadata

    try:
        entry = read_metadata(model).get("baseline")
    except FairDeployError:  # not a readable model: timing it says so
        return None, ""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None, ""
    path = Path(model).parent / entry["path"]
    if not path.is_file():
        return None, (
            f"the model's metadata names {entry['path']!r} as its baseline, but {str(path)!r} "
            "does not exist; give --baseline FILE"
        )
    if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
        return None, (
            f"{str(path)!r} is not the file the model's metadata names (its SHA-256 differs); "
            "give --baseline FILE"
        )
    return path, ""


def _session(model, provider, threads, spinning, make_session):
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FairDeployError(f"ONNX model {str(model)!r} does not exist: give a .onnx file")
    return make_session(model, provider=provider, threads=threads, spinning=spinning)


def layer_nodes(model: Any, layer: str) -> list[Any]:
    """Nodes of an exported graph that belong to module ``layer`` (e.g. ``classifier.3``).

    The TorchScript exporter names nodes by module scope (``/classifier/classifier.3/MatMul``);
    the dynamo exporter records ``pkg.torch.onnx.name_scopes``. Both are read.
    """
    parts = layer.split(".")
    scope = "/" + "/".join(".".join(parts[: i + 1]) for i in range(len(parts))) + "/"
    # A Sequential child at the top level is scoped by its index alone ("/2/MatMul").
    out = []
    for node in model.graph.node:
        if node.name.startswith(scope):
            out.append(node)
            continue
        for p in node.metadata_props:
            # Protobuf strings must be UTF-8: a damaged one comes back as bytes.
            value = p.value if isinstance(p.value, str) else bytes(p.value).decode(
                "utf-8", "replace")
            if p.key == "pkg.torch.onnx.name_scopes" and f"'{layer}'" in value:
                out.append(node)
                break
    return out


def extract_layer(path: str | os.PathLike[str], layer: str) -> bytes:
    """The sub-graph of one layer as a standalone model (dynamic batch), serialized.

    Constants the layer's nodes use (Slice bounds) are carried along; the input is the
    one tensor entering the layer from outside, the output the one leaving it.
    """
    import onnx
    from onnx import utils as onnx_utils

    model = onnx.load(os.fspath(path))
    nodes = layer_nodes(model, layer)
    if not nodes:
        raise FairDeployError(
            f"layer {layer!r} has no nodes in {str(path)!r}: give a module name such as "
            "classifier.3 (see the model's fairdeploy.layers metadata)"
        )
    inits = {t.name for t in model.graph.initializer}
    produced = {o for n in nodes for o in n.output}
    const_out = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ins = [
        i for n in nodes for i in n.input
        if i and i not in produced and i not in inits and i not in const_out
    ]
    ins = list(dict.fromkeys(ins))
    consumed_outside = {
        i for n in model.graph.node if n not in nodes for i in n.input
    } | {o.name for o in model.graph.output}
    outs = [o for o in dict.fromkeys(produced) if o in consumed_outside]
    if len(ins) != 1 or len(outs) != 1:
        raise FairDeployError(
            f"layer {layer!r} in {str(path)!r} has inputs {ins} and outputs {outs}: only "
            "single-input, single-output layers can be benchmarked alone"
        )
    model = onnx.shape_inference.infer_shapes(model)
    sub = onnx_utils.Extractor(model).extract_model(ins, outs)
    # Make the batch axis dynamic whatever shape inference recorded.
    for vi in list(sub.graph.input) + list(sub.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return sub.SerializeToString()


def measure_layer_latency(
    candidate: str | os.PathLike[str],
    layer: str,
    baseline: str | os.PathLike[str] | None = None,
    *,
    baseline_layer: str | None = None,
    **kwargs: Any,
) -> LatencyResult:
    """Latency of one layer's sub-graph (e.g. the factorized FC-2), optionally against the
    same layer of a baseline model. Keyword arguments go to :func:`measure_latency`.

    Convolutions dominate a VGG's total latency on the CPU, so the layer's own latency is
    where the factorization's speed-up shows.
    """
    cand = extract_layer(candidate, layer)
    base = None if baseline is None else extract_layer(baseline, baseline_layer or layer)
    kwargs.setdefault("label", f"layer {layer}")
    return measure_latency(cand, base, **kwargs)
