"""The runtimes an exported model is run in: each one "load a file, run inputs → outputs".

A model fairdeploy writes must compute the same in every runtime a user may deploy it to
(DESIGN.md "Portable artifacts"), so :func:`fairdeploy.verification.verify` can run it in
any of these:

- ``onnxruntime``: ONNX Runtime (the execution provider from ``--provider``);
- ``openvino``: OpenVINO's CPU plugin, forced to float32 inference precision (its default
  on CPUs with bf16 support would be bf16, which is not what the file says). An optional
  dependency: ``pip install 'fairdeploy[openvino]'``;
- ``reference``: ``onnx.reference.ReferenceEvaluator``, the ONNX project's evaluator of
  the specification in numpy. Slow (a large convolutional model takes minutes), but it is
  what the specification says the file computes.

Each :func:`load_runtime` returns a :class:`RuntimeSession` with the same small surface.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fairdeploy.errors import FairDeployError, first_line

__all__ = [
    "RUNTIMES", "RuntimeSession", "load_runtime", "load_runtime_check", "parse_runtimes",
    "run_batched", "runtime_available",
]

#: The runtimes :func:`load_runtime` knows, in the order reports list them.
RUNTIMES = ("onnxruntime", "openvino", "reference")

_OPENVINO_HINT = (
    "pip install 'fairdeploy[openvino]' (or pip install openvino; about 100 MB)"
)


@dataclass(frozen=True, eq=False)
class RuntimeSession:
    """A model loaded in one runtime.

    Attributes
    ----------
    runtime : str
        One of :data:`RUNTIMES`.
    device : str
        What ran it: the ONNX Runtime execution provider, ``"CPU (f32)"`` for OpenVINO,
        ``"numpy"`` for the reference evaluator.
    version : str
        The runtime's version.
    input_names, output_names : list of str
        The graph's inputs and outputs, in order.
    input_shapes : list of list
        Per input, its dimensions: an int when fixed, a str (symbolic) or None otherwise.
    """

    runtime: str
    device: str
    version: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[list[int | str | None]]
    _run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]

    @property
    def label(self) -> str:
        """``"openvino 2026.4.1 (CPU (f32))"``: runtime, version and device in one phrase."""
        return f"{self.runtime} {self.version} ({self.device})"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs (in :attr:`output_names` order) for inputs named as the graph names
        them."""
        return self._run(feeds)


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime``'s package is importable here (ONNX Runtime and the reference
    evaluator always are)."""
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
    return runtime in RUNTIMES


def load_runtime_check(runtime: str) -> None:
    """Raise the one-line :class:`FairDeployError` :func:`load_runtime` would give when
    ``runtime`` is unknown or not installed, before any work is done."""
    (name,) = parse_runtimes(runtime, what="runtime")
    if not runtime_available(name):
        raise FairDeployError(
            f"runtime {name!r} needs the {name} package, which is not installed: "
            f"{_OPENVINO_HINT}"
        )


def parse_runtimes(values: str | Iterable[str], *, what: str = "--runtime") -> tuple[str, ...]:
    """Runtime names from repeated options and/or comma lists, in the given order, each once.

    Raises a :class:`FairDeployError` naming ``what`` for an unknown name or an empty list.
    """
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise FairDeployError(
                f"{what}: {item!r} is not a runtime name: use {', '.join(RUNTIMES)}"
            )
        for name in (p.strip().lower() for p in item.split(",")):
            if not name:
                continue
            if name not in RUNTIMES:
                raise FairDeployError(
                    f"{what}: {name!r} is not a runtime fairdeploy can verify in: use one or "
                    f"more of {', '.join(RUNTIMES)}"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise FairDeployError(f"{what}: no runtime given: use one or more of {', '.join(RUNTIMES)}")
    return tuple(out)


def load_runtime(
    model: str | os.PathLike[str] | bytes, runtime: str = "onnxruntime", *,
    provider: str = "cpu",
) -> RuntimeSession:
    """Load an ONNX model (a path, or serialized bytes) in ``runtime``.

    Parameters
    ----------
    model : path-like or bytes
        The ``.onnx`` file (external data beside it is read) or its bytes.
    runtime : {"onnxruntime", "openvino", "reference"}
        Which runtime (see the module docstring).
    provider : {"auto", "cpu", "cuda"}
        ONNX Runtime's execution provider; the other runtimes run on the CPU.

    Raises
    ------
    FairDeployError
        An unknown runtime, OpenVINO not installed (with the command that installs it), or
        a runtime that refuses the model (with its first line of complaint).
    """
    (name,) = parse_runtimes(runtime, what="runtime")
    if not isinstance(model, bytes) and not os.path.isfile(os.fspath(model)):
        raise FairDeployError(f"ONNX model {os.fspath(model)!r} does not exist: give a .onnx file")
    loader = {"onnxruntime": _onnxruntime, "openvino": _openvino, "reference": _reference}[name]
    return loader(model, provider)


def _what(model: str | os.PathLike[str] | bytes) -> str:
    return "the model" if isinstance(model, bytes) else repr(os.fspath(model))


#: Lines of an OpenVINO error that say where in its sources, not what.
_OV_NOISE = ("Exception from ", "Check '", "FrontEnd API failed", "Summary:")


def _openvino_reason(exc: BaseException) -> str:
    """OpenVINO's multi-line error in one line, without its source locations."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(_OV_NOISE)]
    return (" ".join(kept) or type(exc).__name__)[:400]


def _shapes_of(proto: Any) -> tuple[list[str], list[list[int | str | None]]]:
    """The graph inputs that are not initializers: names and dimensions."""
    inits = {t.name for t in proto.graph.initializer}
    names, shapes = [], []
    for i in proto.graph.input:
        if i.name in inits:
            continue
        dims: list[int | str | None] = []
        for d in i.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        names.append(i.name)
        shapes.append(dims)
    return names, shapes


def _onnxruntime(model: str | os.PathLike[str] | bytes, provider: str) -> RuntimeSession:
    import onnxruntime as ort

    from fairdeploy.providers import make_session, session_provider

    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        sess = make_session(src, provider=provider)
    except FairDeployError:
        raise
    except Exception as exc:  # ORT refuses a model it cannot load
        raise FairDeployError(
            f"ONNX Runtime cannot load {_what(model)}: {first_line(exc, limit=300)}"
        ) from None
    inputs = sess.get_inputs()
    return RuntimeSession(
        runtime="onnxruntime",
        device=session_provider(sess),
        version=ort.__version__,
        input_names=[i.name for i in inputs],
        output_names=[o.name for o in sess.get_outputs()],
        input_shapes=[[d if isinstance(d, int | str) else None for d in i.shape] for i in inputs],
        _run=lambda feeds: list(sess.run(None, feeds)),
    )


def _openvino(model: str | os.PathLike[str] | bytes, provider: str) -> RuntimeSession:
    try:
        import openvino as ov
    except ImportError:
        raise FairDeployError(
            f"runtime 'openvino' needs the openvino package, which is not installed: "
            f"{_OPENVINO_HINT}"
        ) from None
    import onnx

    core = ov.Core()
    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
            ov_model = core.read_model(model=model)
        else:
            proto = onnx.load(os.fspath(model), load_external_data=False)
            ov_model = core.read_model(os.fspath(model))
        # f32: on a CPU with bf16 units OpenVINO would otherwise compute in bf16.
        compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:  # OpenVINO's RuntimeError for an op or a file it cannot take
        raise FairDeployError(
            f"OpenVINO cannot load {_what(model)}: {_openvino_reason(exc)}"
        ) from None
    names, shapes = _shapes_of(proto)
    outputs = list(compiled.outputs)
    output_names = [o.get_any_name() for o in outputs]
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.array(result[o], copy=True) for o in outputs]

    return RuntimeSession(
        runtime="openvino", device="CPU (f32)", version=ov.get_version().split("-")[0],
        input_names=names, output_names=output_names, input_shapes=shapes, _run=run,
    )


def _reference(model: str | os.PathLike[str] | bytes, provider: str) -> RuntimeSession:
    import onnx
    from onnx.reference import ReferenceEvaluator

    try:
        proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                 else onnx.load(os.fspath(model)))
        try:
            evaluator = ReferenceEvaluator(proto)
        except Exception as exc:
            if "quantizelinear" not in str(exc).lower():
                raise
            evaluator = ReferenceEvaluator(proto, new_ops=_qdq_ops())
    except Exception as exc:  # an op the evaluator does not implement, a corrupt file
        raise FairDeployError(
            f"the ONNX reference evaluator cannot load {_what(model)}: {first_line(exc, limit=300)}"
        ) from None
    names, shapes = _shapes_of(proto)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in evaluator.run(None, feeds)]

    return RuntimeSession(
        runtime="reference", device="numpy", version=f"onnx {onnx.__version__}",
        input_names=names, output_names=list(evaluator.output_names), input_shapes=shapes,
        _run=run,
    )


def _qdq_ops() -> list[type]:
    """``QuantizeLinear``/``DequantizeLinear`` for opsets 13–18.

    onnx 1.23's evaluator implements them from version 19 only ("No implementation for
    operator 'DequantizeLinear' … version 18"), although versions 19+ only add types and
    attributes whose defaults keep version 13's meaning; the newest implementation, under
    the plain name, runs them.
    """
    from onnx.reference.ops import op_dequantize_linear as dq
    from onnx.reference.ops import op_quantize_linear as q

    newest = {
        "DequantizeLinear": max((c for n, c in vars(dq).items() if n.startswith(
            "DequantizeLinear_")), key=lambda c: int(c.__name__.rsplit("_", 1)[1])),
        "QuantizeLinear": max((c for n, c in vars(q).items() if n.startswith(
            "QuantizeLinear_")), key=lambda c: int(c.__name__.rsplit("_", 1)[1])),
    }
    return [type(name, (cls,), {"op_domain": ""}) for name, cls in newest.items()]


def run_batched(
    session: RuntimeSession, x: np.ndarray, *, batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Every output of ``session`` on the rows of ``x`` (its one input), ``batch_size``
    rows per call, concatenated."""
    if len(session.input_names) != 1:
        raise FairDeployError(
            f"the model takes {len(session.input_names)} inputs "
            f"({', '.join(session.input_names)}): fairdeploy runs models with one input"
        )
    name = session.input_names[0]
    parts: list[Sequence[np.ndarray]] = []
    for i in range(0, len(x), batch_size):
        parts.append(session.run({name: x[i : i + batch_size]}))
        if on_batch is not None:
            on_batch(len(parts[-1][0]))
    return [np.concatenate([p[j] for p in parts]) for j in range(len(session.output_names))]
