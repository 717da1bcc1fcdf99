"""int8 weights for any exported model, with ONNX Runtime's own quantization tools.

Three steps, each a function on files and arrays so the pipeline can call them after any
method's float export:

- :func:`quantize_int8` writes an int8 copy of a float ONNX model with
  ``onnxruntime.quantization``: ``static`` inserts QuantizeLinear / DequantizeLinear pairs
  (QDQ format) with activation ranges calibrated on inputs the caller takes from the
  training split; ``dynamic`` quantizes the weights only and activations per batch at run
  time; ``auto`` (default) picks static for graphs with convolutions, dynamic otherwise.
  Every weight-carrying node is quantized, the two MatMuls of a factorized layer and the
  blocks of a structured-sparse one included; the result says which weights stayed float.
- :func:`verify_int8` compares the int8 model in ONNX Runtime with the float PyTorch
  model's outputs under int8 tolerances that it states and returns (default: a fraction
  of the logits' spread), with the smallest tolerances that would pass and the argmax
  agreement.
- :func:`int8_fairness` runs the float and the int8 exports on the test split and returns
  both models' group metrics and the paired bootstrap difference int8 − float, so a user
  sees whether int8 moved EOdd.

:func:`int8_compression` gives the measured and theoretical compression of "method +
int8 weights" against the vanilla float export.

Why ``auto`` chooses so (``bench/bench_int8.py``, same-run measurements in the README):
dynamic quantization turns every Conv into ``ConvInteger``, which ONNX Runtime's CPU
provider ran 3.6–7× slower than float (vgg11_paper, a small CNN), while QDQ convolutions ran
as int8 kernels (vgg11_paper 2.4–3.5× faster than float); without convolutions the two run
alike and dynamic is the more accurate (no fixed activation ranges to clip). Static ranges
are fixed at calibration time, which is one more reason the artifact is verified against
PyTorch and its group metrics are re-measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fairdeploy._json import JsonRecord
from fairdeploy.comparison import (
    DEFAULT_INT8_ARGMAX_AGREEMENT,
    DEFAULT_INT8_ATOL_SCALE,
    DEFAULT_INT8_RTOL,
    compare_outputs,
)
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.export._sizes import _load_header, onnx_sizes, size_ratios

__all__ = [
    "DEFAULT_INT8_ARGMAX_AGREEMENT",
    "DEFAULT_INT8_ATOL_SCALE",
    "DEFAULT_INT8_RTOL",
    "QUANT_MODES",
    "Int8Compression",
    "Int8Export",
    "Int8Fairness",
    "Int8Verification",
    "int8_compression",
    "int8_fairness",
    "quantize_int8",
    "verify_int8",
]

#: ``auto`` (default): ``static`` for graphs with convolutions, ``dynamic`` otherwise.
#: ``static``: QDQ with calibrated activation ranges; ``dynamic``: int8 weights,
#: activations quantized per batch at run time.
QUANT_MODES = ("auto", "static", "dynamic")
#: Ops whose constant inputs are weights.
_WEIGHT_OPS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,)}
# Ops quantized in static mode: the weight-carrying ones and the data movement between
# them (so consecutive int8 ops need no float round trip). Add (biases of factorized
# layers, residuals) stays float. Concat stays float too: a Q/DQ pair after the Concat
# that joins a structured-sparse layer's output blocks (before its bias Add) crashes
# OpenVINO 2026.4's CPU plugin (a segfault while compiling); without it the blocks'
# MatMul outputs are de-quantized and joined in float, and every runtime agrees.
_STATIC_OPS = [
    "MatMul",
    "Gemm",
    "Conv",
    "Relu",
    "MaxPool",
    "Reshape",
    "Flatten",
    "Slice",
    "Gather",
    "Transpose",
]
_CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(frozen=True)
class Int8Export(JsonRecord):
    """What :func:`quantize_int8` wrote.

    Attributes
    ----------
    path, source : Path
        The int8 model and the float model it was made from.
    mode : str
        The mode used: ``"static"`` (QDQ, calibrated) or ``"dynamic"`` (``auto`` resolved).
    per_channel, reduce_range : bool
        Weight quantization per output channel; 7-bit weights.
    calibration_samples : int
        Inputs the activation ranges were calibrated on (0 for ``dynamic``).
    calibrate_method : str
        ``minmax``, ``entropy`` or ``percentile`` (static only).
    int8_weights : tuple of str
        Weight initializers of the float graph (MatMul/Gemm/Conv constant inputs) that are
        stored as int8 in the output.
    float_weights : tuple of str
        Weight initializers left in float, with the op that uses them (``name (op)``).
    int8_weight_params, float_weight_params : int
        Elements of those two sets of weights.
    sizes, float_sizes : dict
        :func:`fairdeploy.export.onnx_sizes` of the int8 and of the float model.
    """

    path: Path
    source: Path
    mode: str
    per_channel: bool
    reduce_range: bool
    calibration_samples: int
    calibrate_method: str
    int8_weights: tuple[str, ...]
    float_weights: tuple[str, ...]
    int8_weight_params: int
    float_weight_params: int
    sizes: dict[str, int] = field(default_factory=dict)
    float_sizes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = super().to_dict()
        out["path"], out["source"] = str(self.path), str(self.source)
        out["int8_weights"], out["float_weights"] = list(self.int8_weights), list(
            self.float_weights
        )
        return out


@dataclass(frozen=True)
class Int8Verification(JsonRecord):
    """The int8 model against the float PyTorch model's outputs; truthy on pass.

    Attributes
    ----------
    passed : bool
        The ONNX checker passed, every output is within ``atol + rtol·|ref|`` and the
        argmax agreement is ≥ the required fraction.
    checker_message : str
        ``onnx.checker.check_model(full_check=True)``'s error, empty when it passed.
    atol, rtol : float
        The tolerances used.
    atol_basis : str
        How ``atol`` was chosen (a multiple of the reference logits' standard deviation,
        or "given").
    logit_std : float
        Standard deviation of the reference logits (over samples and classes).
    max_abs_error, max_rel_error : float
        Largest |int8 − reference| and that divided by |reference|.
    mean_abs_error : float
        Mean |int8 − reference|.
    min_atol : float
        Smallest atol that passes with ``rtol``.
    min_rtol : float
        Smallest rtol that passes with ``atol``.
    argmax_agreement : float
        Fraction of samples whose predicted class is unchanged.
    required_argmax_agreement : float
        The fraction required.
    n_samples : int
        Samples compared.
    runtime : str
        The runtime that ran the int8 model (:mod:`fairdeploy.runtimes`).
    """

    passed: bool
    checker_message: str
    atol: float
    rtol: float
    atol_basis: str
    logit_std: float
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    min_atol: float
    min_rtol: float
    argmax_agreement: float
    required_argmax_agreement: float
    n_samples: int
    runtime: str = "onnxruntime"

    def __bool__(self) -> bool:
        return self.passed

    def summary_lines(self) -> list[str]:
        """Human-readable lines, ending with PASSED/FAILED."""
        return [
            f"checker: {'ok' if not self.checker_message else 'FAILED: ' + self.checker_message}",
            f"int8 in {self.runtime} vs PyTorch float ({self.n_samples} samples): "
            f"max|Δ|={self.max_abs_error:.3g} "
            f"mean|Δ|={self.mean_abs_error:.3g} argmax agreement={self.argmax_agreement:.2%}",
            f"tolerances: atol={self.atol:.3g} ({self.atol_basis}), rtol={self.rtol:g}, "
            f"agreement ≥ {self.required_argmax_agreement:.1%}; would pass with atol ≥ "
            f"{self.min_atol:.3g} or rtol ≥ {self.min_rtol:.3g}",
            "PASSED" if self.passed else "FAILED",
        ]


@dataclass(frozen=True)
class Int8Fairness:
    """Group metrics of the float and the int8 artifact on the same test samples.

    Attributes
    ----------
    float_metrics, int8_metrics : GroupMetrics
        :func:`fairdeploy.metrics.group_metrics` of each model's ONNX Runtime predictions.
    bootstrap : BootstrapMetrics
        Intervals for both and the paired difference int8 − float (baseline ``"float"``).
    changed_predictions : int
        Test samples whose predicted class differs between the two models.
    n_samples : int
        Test samples scored.
    """

    float_metrics: Any
    int8_metrics: Any
    bootstrap: Any
    changed_predictions: int
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``float``, ``int8`` (group metrics), ``bootstrap``, counts."""
        return {
            "float": self.float_metrics.to_dict(),
            "int8": self.int8_metrics.to_dict(),
            "bootstrap": self.bootstrap.to_dict(),
            "changed_predictions": self.changed_predictions,
            "n_samples": self.n_samples,
        }

    def eodd_change(self) -> Any:
        """The paired bootstrap difference of EOdd, int8 − float."""
        return self.bootstrap.differences["int8"]["eodd"]


@dataclass(frozen=True)
class Int8Compression(JsonRecord):
    """Compression of "method + int8 weights" against the vanilla float model.

    Attributes
    ----------
    measured_initializer_cr, measured_file_cr : float
        Vanilla float export ÷ int8 export: initializer bytes (int8 counted as 1 byte,
        scales, zero points and int32 biases included) and file bytes.
    float_to_int8_initializer_ratio : float
        The processed float export ÷ its int8 export (what int8 alone saved).
    int8_fraction : float
        q: elements stored as int8 ÷ all parameter elements of the processed float export.
    theoretical_cr : float or None
        ``method_cr · 32 / (32 − 24·q)``: the method's theoretical C.R. (the paper's
        accounting) with a fraction q of the parameters at 8 of 32 bits, FairQuantize's
        rule; scales and zero points are not counted (they are in the measured figure).
        None when ``method_cr`` was not given.
    quantization_overhead_bytes : int
        Bytes of scales and zero points in the int8 export.
    """

    measured_initializer_cr: float
    measured_file_cr: float
    float_to_int8_initializer_ratio: float
    int8_fraction: float
    theoretical_cr: float | None
    quantization_overhead_bytes: int


class _ArrayReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        self._name, self._x, self._batch = name, x, batch
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        x, b = self._x, self._batch
        self._it = iter({self._name: x[i : i + b]} for i in range(0, len(x), b))


def _weights(model: onnx.ModelProto) -> dict[str, str]:
    """Weight initializers of a float graph: name → op type of the node using it."""
    inits = {t.name for t in model.graph.initializer if t.data_type in _FLOAT_TYPES}
    out: dict[str, str] = {}
    for node in model.graph.node:
        for pos in _WEIGHT_OPS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos] in inits:
                out[node.input[pos]] = node.op_type
    return out


def _float_weight_sources(model: onnx.ModelProto) -> set[str]:
    """Weights still used in float by a MatMul/Gemm/Conv of a quantized graph, by the name
    they had in the float graph (dynamic mode stores Gemm weights as ``<name>_Transposed``)."""
    return {re.sub(r"_Transposed(_\d+)?$", "", w) for w in _weights(model)}


def _input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise FairDeployError(
            f"the model has inputs {names}: int8 calibration needs a single-input model"
        )
    return names[0]


def _load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    _load_header(path)  # a user-facing error for a missing or corrupt file
    return onnx.load(str(path))


def quantize_int8(
    float_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    calibration_inputs: np.ndarray | None = None,
    mode: str = "auto",
    per_channel: bool = True,
    reduce_range: bool = False,
    calibrate_method: str = "minmax",
    calibration_batch: int = 64,
    exclude_weights: Sequence[str] = (),
) -> Int8Export:
    """Write an int8 copy of a float ONNX model with ``onnxruntime.quantization``.

    Parameters
    ----------
    float_path : path-like
        The float model (e.g. what :func:`fairdeploy.export.export_onnx` wrote, for any
        method).
    path : path-like
        Where to write the int8 model (``.onnx``; written atomically, one file when under
        2 GB). fairdeploy metadata of the float model is carried over, with an ``int8``
        entry describing the quantization.
    calibration_inputs : ndarray, optional
        Model inputs the activation ranges are calibrated on; required for ``static``.
        Take them from the training split (never the test split the report scores).
    mode : {"auto", "static", "dynamic"}
        ``static``: QDQ format, weights int8 (symmetric), activations uint8 with ranges
        from the calibration inputs. ``dynamic``: weights int8, activations quantized per
        batch at run time (no calibration). ``auto`` (default): ``static`` when the graph
        has a convolution, else ``dynamic`` — measured (``bench/bench_int8.py``):
        ONNX Runtime runs dynamic ``ConvInteger`` several times slower than float while
        QDQ convolutions run faster than float; on convolution-free models the two run
        alike and dynamic is the more accurate (no fixed activation ranges to clip).
    per_channel : bool
        One scale per output channel of each weight (default; more accurate than one per
        tensor at a small cost).
    reduce_range : bool
        7-bit weights: avoids integer saturation of u8·s8 products on x86 CPUs without
        VNNI (``Int8Export`` records nothing about the CPU: verify on the serving machine
        when in doubt).
    calibrate_method : {"minmax", "entropy", "percentile"}
        How activation ranges are chosen from the calibration inputs (static only).
    calibration_batch : int
        Inputs per calibration run.
    exclude_weights : sequence of str
        Weight initializer names whose nodes stay float.

    Returns
    -------
    Int8Export
        Paths, settings, which weights are int8 and which stayed float, sizes.
    """
    from onnxruntime.quantization import QuantType

    from fairdeploy.export._metadata import save_atomic, set_metadata

    path, source = Path(path), Path(float_path)
    _check_int8_options(mode, calibrate_method, path, source)
    model = _load(source)
    if mode == "auto":
        mode = "static" if any(n.op_type == "Conv" for n in model.graph.node) else "dynamic"
    weights = _weights(model)
    excluded_nodes = _excluded_nodes(model, weights, exclude_weights, source)
    x = _calibration_batch(calibration_inputs) if mode == "static" else None
    n_cal = 0 if x is None else len(x)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        out = Path(tmp) / "int8.onnx"
        common = {
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "weight_type": QuantType.QInt8,
            "nodes_to_exclude": excluded_nodes,
        }
        with _quiet_root_logger():
            _run_quantizer(mode, source, out, model, x, calibration_batch, calibrate_method,
                           common)
        q = onnx.load(str(out))
    float_left = _float_weight_sources(q)
    int8_w = tuple(sorted(w for w in weights if w not in float_left))
    float_w = tuple(sorted(f"{w} ({weights[w]})" for w in weights if w in float_left))
    numel = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    # The settings used, recorded once: in the model's int8 metadata and in the result.
    settings = {"mode": mode, "per_channel": per_channel, "reduce_range": reduce_range,
                "calibration_samples": n_cal}
    method = calibrate_method if mode == "static" else None
    info = {
        **settings,
        "format": "QDQ" if mode == "static" else "dynamic",
        "calibrate_method": method,
        "float_weights": list(float_w),
        "tool": "onnxruntime.quantization " + _ort_version(),
    }
    set_metadata(q, {"fairdeploy.int8": json.dumps(info, sort_keys=True)})
    save_atomic(q, path)
    return Int8Export(
        path=path,
        source=source,
        **settings,
        calibrate_method=method or "",
        int8_weights=int8_w,
        float_weights=float_w,
        int8_weight_params=sum(numel[w] for w in int8_w),
        float_weight_params=sum(numel[w.split(" (")[0]] for w in float_w),
        sizes=onnx_sizes(path),
        float_sizes=onnx_sizes(source),
    )


def _check_int8_options(mode: str, calibrate_method: str, path: Path, source: Path) -> None:
    """A FairDeployError for an unknown mode or calibration method, an output that is not
    ``.onnx``, or one that would overwrite the float source."""
    if mode not in QUANT_MODES:
        raise FairDeployError(f"mode={mode!r} is unknown: use one of {', '.join(QUANT_MODES)}")
    if calibrate_method not in _CALIBRATION_METHODS:
        raise FairDeployError(
            f"calibrate_method={calibrate_method!r} is unknown: use one of "
            f"{', '.join(_CALIBRATION_METHODS)}"
        )
    if path.suffix != ".onnx":
        raise FairDeployError(f"output path {str(path)!r} must end in .onnx")
    if path.resolve() == source.resolve():
        raise FairDeployError(
            f"the int8 model would overwrite its float source {str(source)!r}: give another path"
        )


def _excluded_nodes(
    model: onnx.ModelProto, weights: Mapping[str, str], exclude_weights: Sequence[str],
    source: Path,
) -> list[str]:
    """Names of the nodes that consume an excluded weight (they stay float), under both
    names a node may have when the quantizer meets it; an unknown weight is refused."""
    unknown = sorted(set(exclude_weights) - set(weights))
    if unknown:
        raise FairDeployError(
            f"exclude_weights names {unknown}, which are not weights of {str(source)!r} "
            f"(weights: {', '.join(sorted(weights)) or 'none'})"
        )
    return [
        name
        for n in model.graph.node
        if any(i in set(exclude_weights) for i in n.input) and n.op_type in _WEIGHT_OPS
        # Dynamic mode rewrites Gemm as "<name>_MatMul" before quantizing.
        for name in (n.name, n.name + "_MatMul")
    ]


def _calibration_batch(calibration_inputs: np.ndarray | None) -> np.ndarray:
    """The static mode's calibration inputs as contiguous float32; at least one needed."""
    if calibration_inputs is None or len(calibration_inputs) == 0:
        raise FairDeployError(
            "static int8 quantization needs calibration_inputs (inputs from the "
            "training split); or use mode='dynamic'"
        )
    return np.ascontiguousarray(calibration_inputs, dtype=np.float32)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger
    at WARNING level for every model; silence it while it runs. Pre-processing (symbolic
    shape inference and ORT graph optimizations) is skipped on purpose: the exported graph
    already carries its shapes, the optimizer would rename nodes that ``exclude_weights``
    refers to, and the result is verified against PyTorch anyway."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _run_quantizer(
    mode: str,
    source: Path,
    out: Path,
    model: onnx.ModelProto,
    x: np.ndarray | None,
    calibration_batch: int,
    calibrate_method: str,
    common: dict[str, Any],
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode == "static":
        reader = _ArrayReader(_input_name(model), x, max(1, int(calibration_batch)))
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[calibrate_method]
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            calibrate_method=method,
            # Biases of factorized layers are Add inputs: keep them float rather than
            # squeezing them into an 8-bit activation range.
            op_types_to_quantize=_STATIC_OPS,
            **common,
        )
    else:
        quantize_dynamic(str(source), str(out), **common)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _ort_outputs(path: str | os.PathLike[str], x: np.ndarray, batch: int) -> np.ndarray:
    from fairdeploy.providers import make_session

    try:
        sess = make_session(Path(path), provider="cpu")
    except Exception as exc:  # onnxruntime refuses a model it cannot load
        raise FairDeployError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from None
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def verify_int8(
    int8_path: str | os.PathLike[str],
    inputs: np.ndarray,
    reference_outputs: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float = DEFAULT_INT8_RTOL,
    min_argmax_agreement: float = DEFAULT_INT8_ARGMAX_AGREEMENT,
    batch_size: int = 256,
    runtime: str = "onnxruntime",
) -> Int8Verification:
    """Compare an int8 model in ONNX Runtime (or another runtime) with the float PyTorch
    model's outputs.

    Parameters
    ----------
    int8_path : path-like
        The int8 model.
    inputs : ndarray
        Real inputs (e.g. the ``inputs`` of ``<model>.verify.npz``).
    reference_outputs : ndarray
        The float PyTorch model's logits for ``inputs``.
    atol : float, optional
        Absolute tolerance. Default ``DEFAULT_INT8_ATOL_SCALE`` (0.5) × the standard
        deviation of the reference logits: int8 errors scale with the spread of the
        values (see ``DEFAULT_INT8_ATOL_SCALE`` for the measured errors this admits). The
        float check's 1e-4 would fail every int8 model.
    rtol : float
        Relative tolerance on top of ``atol`` (default 0.02).
    min_argmax_agreement : float
        Fraction of samples whose predicted class must be unchanged (default 0.98).
    batch_size : int
        Samples per ONNX Runtime call.
    runtime : {"onnxruntime", "openvino", "reference"}
        The runtime that runs the int8 model (:mod:`fairdeploy.runtimes`).

    Returns
    -------
    Int8Verification
        Truthy on pass; carries the tolerances used, how atol was chosen, and the
        smallest atol/rtol that would pass.
    """
    x = np.asarray(inputs)
    ref = np.asarray(reference_outputs, dtype=np.float64)
    if len(x) == 0 or len(x) != len(ref):
        raise FairDeployError(
            f"inputs has {len(x)} rows and reference_outputs {len(ref)}: give one reference "
            "row per input, at least one"
        )
    logit_std = float(ref.std())
    if atol is None:
        atol = DEFAULT_INT8_ATOL_SCALE * logit_std
        basis = f"{DEFAULT_INT8_ATOL_SCALE:g} × std of the reference logits ({logit_std:.4g})"
    else:
        basis = "given"
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(tol, int | float) and tol >= 0 and math.isfinite(tol)):
            raise FairDeployError(f"{name}={tol!r} is not allowed: use a number ≥ 0")
    _load(int8_path)  # a user-facing error for a missing or corrupt file
    try:
        onnx.checker.check_model(str(int8_path), full_check=True)
        checker_message = ""
    except Exception as exc:  # ValidationError, shape-inference errors
        checker_message = first_line(exc, limit=None)
    if runtime == "onnxruntime":
        got = _ort_outputs(int8_path, x, batch_size)
    else:
        from fairdeploy.runtimes import load_runtime, run_batched

        got = run_batched(load_runtime(int8_path, runtime),
                          np.ascontiguousarray(x, np.float32), batch_size=batch_size)[0]
    comp = compare_outputs("logits", got, ref, float(atol), float(rtol), min_argmax_agreement)
    return Int8Verification(
        passed=comp.passed and not checker_message,
        checker_message=checker_message,
        atol=float(atol),
        rtol=float(rtol),
        atol_basis=basis,
        logit_std=logit_std,
        max_abs_error=comp.max_abs_error,
        max_rel_error=comp.max_rel_error,
        mean_abs_error=float(np.abs(got.astype(np.float64) - ref).mean()),
        min_atol=comp.min_atol,
        min_rtol=comp.min_rtol,
        argmax_agreement=comp.argmax_agreement,
        required_argmax_agreement=min_argmax_agreement,
        n_samples=len(x),
        runtime=runtime,
    )


def int8_fairness(
    float_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    inputs: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    privileged: int = 1,
    num_classes: int | None = None,
    group_names: Sequence[str] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 256,
) -> Int8Fairness:
    """Group fairness of the int8 artifact next to the float one, on the same test samples.

    Both models run in ONNX Runtime on ``inputs`` (the test split); predictions are the
    argmax of the logits. Returns :func:`fairdeploy.metrics.group_metrics` of each and
    :func:`fairdeploy.metrics.bootstrap_metrics` with ``baseline="float"``: the paired
    difference int8 − float of EOpp0, EOpp1, EOdd and Avg. precision on the same
    resamples, marked not significant when its interval contains 0.

    Parameters
    ----------
    float_path, int8_path : path-like
        The float export and its int8 copy.
    inputs : ndarray
        Test inputs, shape (N, ...).
    labels, groups : ndarray
        Class ids and group ids (0/1, −1 unknown) of ``inputs``.
    privileged, num_classes, group_names
        As in :func:`fairdeploy.metrics.group_metrics`; ``num_classes`` defaults to the
        models' number of logits.
    n_resamples, confidence, seed
        As in :func:`fairdeploy.metrics.bootstrap_metrics`.
    batch_size : int
        Samples per ONNX Runtime call.

    Returns
    -------
    Int8Fairness
    """
    from fairdeploy.metrics import bootstrap_metrics, group_metrics

    x = np.asarray(inputs)
    if len(x) != len(labels) or len(x) != len(groups):
        raise FairDeployError(
            f"inputs ({len(x)}), labels ({len(labels)}) and groups ({len(groups)}) must have "
            "one entry per test sample"
        )
    logits_f = _ort_outputs(float_path, x, batch_size)
    logits_q = _ort_outputs(int8_path, x, batch_size)
    k = num_classes if num_classes is not None else int(logits_f.shape[-1])
    pred_f, pred_q = logits_f.argmax(-1), logits_q.argmax(-1)
    common = {"privileged": privileged, "num_classes": k}
    float_m = group_metrics(labels, pred_f, groups, group_names=group_names, **common)
    int8_m = group_metrics(labels, pred_q, groups, group_names=group_names, **common)
    boot = bootstrap_metrics(
        labels,
        {"float": pred_f, "int8": pred_q},
        groups,
        baseline="float",
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        **common,
    )
    return Int8Fairness(
        float_metrics=float_m,
        int8_metrics=int8_m,
        bootstrap=boot,
        changed_predictions=int(np.sum(pred_f != pred_q)),
        n_samples=len(x),
    )


def int8_compression(
    vanilla_path: str | os.PathLike[str],
    float_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    *,
    method_cr: float | None = None,
) -> Int8Compression:
    """Measured and theoretical compression of "method + int8 weights".

    Parameters
    ----------
    vanilla_path : path-like
        The vanilla (unprocessed) float export.
    float_path : path-like
        The processed float export (any method).
    int8_path : path-like
        Its int8 copy from :func:`quantize_int8`.
    method_cr : float, optional
        The method's theoretical C.R. (the paper's accounting, e.g.
        ``fairdeploy.compression.theoretical_cr``; 1.0 for vanilla). The theoretical
        figure for the combination is ``method_cr · 32 / (32 − 24 q)`` with q the fraction
        of the processed model's parameters stored as int8 — FairQuantize's rule, scales
        and zero points not counted.

    Returns
    -------
    Int8Compression
    """
    van, flt, q8 = onnx_sizes(vanilla_path), onnx_sizes(float_path), onnx_sizes(int8_path)
    weights = _weights(_load(float_path))
    left = _float_weight_sources(onnx.load(str(int8_path), load_external_data=False))
    float_model = onnx.load(str(float_path), load_external_data=False)
    numel = {t.name: int(np.prod(t.dims)) for t in float_model.graph.initializer}
    int8_params = sum(numel[w] for w in weights if w not in left)
    q = int8_params / flt["parameters"] if flt["parameters"] else 0.0
    theory = None if method_cr is None else float(method_cr) * 32.0 / (32.0 - 24.0 * q)
    measured = size_ratios({"vanilla": van, "processed": q8})
    return Int8Compression(
        measured_initializer_cr=measured["initializer_cr"],
        measured_file_cr=measured["file_cr"],
        float_to_int8_initializer_ratio=flt["initializer_bytes"] / q8["initializer_bytes"],
        int8_fraction=q,
        theoretical_cr=theory,
        quantization_overhead_bytes=q8.get("quantization_bytes", 0),
    )
