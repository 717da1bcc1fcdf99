"""Does the ONNX model that ships compute what the PyTorch model computed?

:func:`verify` runs the ONNX checker, runs the model in a runtime (ONNX Runtime by default;
OpenVINO or the ONNX reference evaluator, :mod:`fairdeploy.runtimes`) on real inputs,
compares with reference outputs (per output: max absolute and relative error, argmax
agreement, the smallest tolerance that would pass) and, when the reference carries labels
and groups, reports group fairness of the ONNX model's own predictions. The result is
truthy on pass (Polygraphy's comparator style). :func:`verify_runtimes` does it in several
runtimes, one verdict per runtime (Polygraphy's ``run --onnxrt --trt``).

Reference sources:

- ``<name>.verify.npz`` written by :func:`fairdeploy.export.export_onnx` beside the model
  (arrays ``inputs``, ``outputs``, optionally ``labels``, ``groups``), the default;
- any ``.npz`` with those arrays (``--reference FILE``);
- a PyTorch model and inputs: :func:`reference_from_model` (the hook for "checkpoint +
  recipe": load the model with the recipe, pick the split, call this).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy._text import plural
from fairdeploy.comparison import (
    DEFAULT_ARGMAX_AGREEMENT,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    OutputComparison,
    compare_outputs,
    tolerance_text,
)
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.progress import phase

__all__ = [
    "OutputComparison",
    "Reference",
    "RuntimesResult",
    "VerifyResult",
    "load_reference",
    "reference_from_model",
    "verify",
    "verify_runtimes",
]

@dataclass(frozen=True)
class Reference:
    """Inputs and the outputs the ONNX model must reproduce.

    Attributes
    ----------
    inputs : ndarray
        Model inputs, shape (N, ...).
    outputs : ndarray
        Reference outputs (logits), shape (N, C).
    labels, groups : ndarray or None
        Targets and group ids, for fairness of the ONNX predictions.
    source : str
        Where the reference came from (a file path or ``"pytorch model"``).
    """

    inputs: np.ndarray
    outputs: np.ndarray
    labels: np.ndarray | None = None
    groups: np.ndarray | None = None
    source: str = ""
    #: How many samples the full reference had, when this one keeps only the first
    #: (``model.verify.npz`` is capped by size); None when it is complete.
    total: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; truthy when everything passed.

    Attributes
    ----------
    passed : bool
        Checker OK and every output within ``atol + rtol·|ref|`` with argmax agreement ≥
        the required fraction.
    checker_ok : bool
        ``onnx.checker.check_model(full_check=True)`` passed.
    checker_message : str
        The checker's error, empty when it passed.
    outputs : list of OutputComparison
        Per-output comparison.
    n_samples : int
        Reference samples compared.
    provider : str
        What actually ran it: the ONNX Runtime execution provider, OpenVINO's device, or
        ``numpy`` for the reference evaluator.
    reference : str
        Where the reference came from.
    fairness : dict or None
        ``fairdeploy.metrics.group_metrics`` of the ONNX predictions (when the reference
        has labels and groups), else None.
    fairness_note : str
        Why fairness is missing, when it is.
    runtime : str
        The runtime the outputs come from (:data:`fairdeploy.runtimes.RUNTIMES`).
    runtime_version : str
        Its version.
    """

    passed: bool
    checker_ok: bool
    checker_message: str
    outputs: list[OutputComparison]
    n_samples: int
    provider: str
    reference: str
    fairness: dict[str, Any] | None = None
    fairness_note: str = ""
    required_argmax_agreement: float = DEFAULT_ARGMAX_AGREEMENT
    #: What a reader must know to interpret the result (a subset, a reference that is
    #: expected to differ), one sentence each.
    notes: tuple[str, ...] = ()
    runtime: str = "onnxruntime"
    runtime_version: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for report.json)."""
        return {
            "passed": self.passed,
            "checker_ok": self.checker_ok,
            "checker_message": self.checker_message,
            "outputs": [o.to_dict() for o in self.outputs],
            "n_samples": self.n_samples,
            "provider": self.provider,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "reference": self.reference,
            "fairness": self.fairness,
            "fairness_note": self.fairness_note,
            "required_argmax_agreement": self.required_argmax_agreement,
            "notes": list(self.notes),
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines, ending with the PASSED/FAILED line."""
        lines = [
            f"checker: {'ok' if self.checker_ok else 'FAILED: ' + self.checker_message}",
            f"reference: {self.reference} ({plural(self.n_samples, 'sample')}), "
            f"runtime: {self.runtime} {self.runtime_version} ({self.provider})",
        ]
        for o in self.outputs:
            lines.append(
                f"output {o.name}: max |Δ| {o.max_abs_error:.3g}, max relative "
                f"{o.max_rel_error:.3g}, argmax agreement {o.argmax_agreement:.2%} "
                f"(required {self.required_argmax_agreement:.2%}): "
                f"{'ok' if o.passed else 'FAILED'}"
            )
            lines.append(f"  {tolerance_text(o)}")
        if self.fairness is not None:
            fair = self.fairness.get("fairness", self.fairness)
            labels = {"eopp1": "EOpp1", "eopp0": "EOpp0", "eodd": "EOdd"}
            shown = [f"{label} {fair[k]:.3f}" for k, label in labels.items()
                     if fair.get(k) is not None]
            for k in ("precision", "recall", "f1"):
                v = self.fairness.get(k)
                if isinstance(v, dict) and v.get("avg") is not None:
                    shown.append(f"{k} avg {v['avg']:.3f} diff {v['diff']:.3f}")
            lines.append(
                f"group metrics of the ONNX predictions ({self.runtime}) on these "
                f"{plural(self.n_samples, 'sample')}: {', '.join(shown)}"
            )
        elif self.fairness_note:
            lines.append(f"fairness: {self.fairness_note}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(("PASSED" if self.passed else "FAILED") + f" in {self.runtime}: "
                     f"{self.reference}")
        return lines


def load_reference(path: str | os.PathLike[str]) -> Reference:
    """Read a reference ``.npz`` (arrays ``inputs``, ``outputs``, optional ``labels``,
    ``groups``)."""
    p = Path(path)
    if not p.is_file():
        raise FairDeployError(
            f"reference file {str(p)!r} does not exist: export with reference inputs "
            "(it writes <name>.verify.npz) or pass --reference FILE"
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile/pickle errors for a file that is not an npz
        raise FairDeployError(f"reference file {str(p)!r} is not a readable .npz ({exc})") from None
    missing = [k for k in ("inputs", "outputs") if k not in arrays]
    if missing:
        raise FairDeployError(
            f"reference file {str(p)!r} lacks array(s) {', '.join(missing)}: it needs "
            "'inputs' and 'outputs' (optionally 'labels', 'groups')"
        )
    for k, arr in arrays.items():
        if k in ("inputs", "outputs", "labels", "groups") and (
            arr.ndim == 0 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr)
        ):
            raise FairDeployError(
                f"reference file {str(p)!r}: '{k}' is a {arr.dtype} array of shape {arr.shape}: "
                "it must hold real numbers, one row per sample"
            )
    n = len(arrays["inputs"])
    if n == 0:
        raise FairDeployError(f"reference file {str(p)!r} holds no samples ('inputs' is empty)")
    for k in ("outputs", "labels", "groups"):
        if k in arrays and len(arrays[k]) != n:
            raise FairDeployError(
                f"reference file {str(p)!r}: '{k}' has {len(arrays[k])} rows, 'inputs' has {n}"
            )
    total = arrays.get("samples_total")
    return Reference(
        inputs=arrays["inputs"],
        outputs=arrays["outputs"],
        labels=arrays.get("labels"),
        groups=arrays.get("groups"),
        source=str(p),
        total=int(total) if total is not None and total.ndim == 0 else None,
    )


def reference_from_model(
    model: Any,
    inputs: Any,
    *,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    batch_size: int = 256,
) -> Reference:
    """A reference computed by a PyTorch model (eval mode, no grad) on ``inputs``.

    This is the hook for the "checkpoint + recipe" source: load the model and the split
    with the recipe, then call this.
    """
    import copy

    import torch

    from fairdeploy._probe import check_model_takes_inputs

    m = copy.deepcopy(model).eval() if model.training else model
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    check_model_takes_inputs(m, x, what="the reference inputs")
    with torch.no_grad():
        outs = [m(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    return Reference(
        inputs=x.numpy(),
        outputs=np.concatenate(outs),
        labels=None if labels is None else np.asarray(labels),
        groups=None if groups is None else np.asarray(groups),
        source="pytorch model",
    )


def _metadata(model: Any, path: Path) -> dict[str, Any]:
    """The fairdeploy metadata of a loaded model; empty when it has none readable
    (defaults apply)."""
    from fairdeploy.export._metadata import metadata_of

    try:
        return metadata_of(model, path)
    except Exception:  # a model without (readable) fairdeploy metadata
        return {}


def _groups_from_metadata(meta: dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """The privileged group id and the group names an exported model's metadata records."""
    names = meta.get("group_names")
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        return None, None
    priv = meta.get("privileged")
    return (names.index(priv) if priv in names else None), names


def _fairness(
    ref: Reference, logits: np.ndarray, privileged: int | None, group_names: list[str] | None
):
    if ref.labels is None or ref.groups is None:
        return None, "the reference has no labels and groups"
    try:
        from fairdeploy.metrics import group_metrics
    except ImportError:
        return None, "fairdeploy.metrics is not available"
    y_pred = logits.argmax(-1) if logits.ndim >= 2 and logits.shape[-1] > 1 else (logits > 0)
    groups = np.asarray(ref.groups)
    present = {int(g): int((groups == g).sum()) for g in (0, 1)}
    if not all(present.values()):
        # Group metrics are undefined without samples of both groups; parity is still
        # checked. Typical cause: too few verification samples (export.verify_samples).
        return None, (
            f"not computed: the {len(groups)} reference samples hold {present[0]} of group 0 "
            f"and {present[1]} of group 1; group metrics need both (use more samples: "
            "export.verify_samples, or --samples with --checkpoint)"
        )
    kwargs: dict[str, Any] = {} if privileged is None else {"privileged": privileged}
    if group_names is not None:
        kwargs["group_names"] = group_names
    if logits.ndim >= 2 and logits.shape[-1] > 1:
        kwargs["num_classes"] = int(logits.shape[-1])
    try:
        result = group_metrics(np.asarray(ref.labels), np.asarray(y_pred).astype(np.int64),
                               groups, **kwargs)
    except FairDeployError as exc:  # e.g. labels outside the model's classes
        return None, f"not computed: {exc}"
    return (result.to_dict() if hasattr(result, "to_dict") else dict(result)), ""


def _check_is_onnx(path: Path) -> Any:
    """The model (weights in external data not loaded): a file that does not parse as an
    ONNX model is a user mistake, said up front."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise FairDeployError(
            f"{str(path)!r} is not an ONNX model ({type(exc).__name__}): give the model.onnx "
            "written by fairdeploy optimize"
        ) from None


def recorded_tolerances(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The tolerances a model's metadata records for its own verification (an int8
    model: ``int8.verify``, written by ``optimize``: ``atol``, ``rtol``,
    ``argmax_agreement`` and the float model's ``reference`` file beside it), or None."""
    int8 = metadata.get("int8")
    found = int8.get("verify") if isinstance(int8, dict) else None
    if not isinstance(found, dict):
        return None
    keys = ("atol", "rtol", "argmax_agreement")
    if not all(isinstance(found.get(k), int | float) and found[k] >= 0 for k in keys):
        return None
    return found


def verify(
    onnx_path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | Reference | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
    min_argmax_agreement: float | None = None,
    privileged: int | None = None,
    batch_size: int = 256,
    notes: tuple[str, ...] | list[str] = (),
    progress: bool = False,
    runtime: str = "onnxruntime",
) -> VerifyResult:
    """Check an ONNX model and compare a runtime's outputs with a reference.

    Parameters
    ----------
    onnx_path : path-like
        The model.
    reference : path-like, Reference or None
        A reference ``.npz``, a :class:`Reference` (e.g. from
        :func:`reference_from_model`), or None for ``<name>.verify.npz`` beside the model
        (for an int8 model without one: the float model's reference its metadata names).
    atol, rtol : float, optional
        An output passes when ``|onnx − ref| ≤ atol + rtol·|ref|`` everywhere. None: the
        tolerances the model's metadata records (:func:`recorded_tolerances`: an int8
        model's own), else 1e-4 and 1e-3 (DESIGN.md §5).
    provider : {"auto", "cpu", "cuda"}
        ONNX Runtime's execution provider (CUDA falls back to the CPU with a warning);
        the other runtimes run on the CPU.
    min_argmax_agreement : float, optional
        Fraction of samples whose argmax must agree (None: recorded, else 0.999).
    privileged : int, optional
        Privileged group id for the fairness of the ONNX predictions; None takes the one
        named in the model's metadata (group names too), else group 1.
    batch_size : int
        Samples per ONNX Runtime call.
    notes : sequence of str
        Sentences to carry into the result (e.g. why a mismatch is expected).
    progress : bool
        Report progress (:mod:`fairdeploy.progress`).
    runtime : {"onnxruntime", "openvino", "reference"}
        The runtime that runs the model (:mod:`fairdeploy.runtimes`); ``openvino`` needs
        ``pip install 'fairdeploy[openvino]'``.

    Returns
    -------
    VerifyResult
        Truthy when the checker and every output passed.
    """
    from fairdeploy.runtimes import load_runtime

    for name, tol in (("atol", atol), ("rtol", rtol)):
        if tol is not None and not (
            isinstance(tol, int | float) and tol >= 0 and math.isfinite(tol)
        ):
            raise FairDeployError(f"--{name} {tol!r} is not allowed: use a number ≥ 0")
    path = Path(onnx_path)
    if not path.is_file():
        raise FairDeployError(
            f"ONNX model {str(path)!r} does not exist: give the path of a .onnx file"
        )
    meta = _metadata(_check_is_onnx(path), path)  # the file is parsed once here
    meta_priv, group_names = _groups_from_metadata(meta)
    if privileged is None:
        privileged = meta_priv
    notes = list(notes)
    reference, (atol, rtol, min_argmax_agreement) = _own_settings(
        path, meta, reference, (atol, rtol, min_argmax_agreement), notes
    )
    ref = _load_checked_reference(path, reference)
    checker_ok, checker_msg = _run_checker(path)
    sess = load_runtime(path, runtime, provider=provider)
    x = np.ascontiguousarray(ref.inputs, dtype=np.float32)
    names, got_all = _run_on_reference_inputs(
        sess, x, ref, path, batch_size=batch_size, progress=progress
    )
    refs = ref.outputs if isinstance(ref.outputs, list | tuple) else [ref.outputs]
    if len(refs) != len(names):
        raise FairDeployError(
            f"the model has {len(names)} outputs but the reference has {len(refs)}"
        )
    comps = [
        compare_outputs(n, g, np.asarray(r), atol, rtol, min_argmax_agreement)
        for n, g, r in zip(names, got_all, refs, strict=True)
    ]
    fairness, note = _fairness(ref, got_all[0], privileged, group_names)
    all_notes = list(notes)
    if fairness is not None:
        scope = _fairness_scope(meta, ref)
        if scope:
            all_notes.append(scope)
    return VerifyResult(
        passed=checker_ok and all(c.passed for c in comps),
        checker_ok=checker_ok,
        checker_message=checker_msg,
        outputs=comps,
        n_samples=len(x),
        provider=sess.device,
        reference=ref.source,
        fairness=fairness,
        fairness_note=note,
        required_argmax_agreement=min_argmax_agreement,
        notes=tuple(all_notes),
        runtime=sess.runtime,
        runtime_version=sess.version,
    )


def _own_settings(
    path: Path, meta: dict[str, Any], reference: Any,
    given: tuple[float | None, float | None, float | None], notes: list[str],
) -> tuple[Any, tuple[float, float, float]]:
    """The reference and (atol, rtol, argmax agreement) to use: those given, else what
    the model's metadata records for it (:func:`recorded_tolerances`), else the
    defaults; a note says when the recorded ones apply."""
    own = recorded_tolerances(meta)
    defaults = (DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_ARGMAX_AGREEMENT)
    if own is None:
        return reference, tuple(  # type: ignore[return-value]
            d if g is None else g for g, d in zip(given, defaults, strict=True))
    reference = _own_reference(path, reference, own, notes)
    if given == (None, None, None):
        notes.append(
            f"tolerances recorded in the model's metadata (int8): atol {own['atol']:.3g}, "
            f"rtol {own['rtol']:g}, argmax agreement ≥ {own['argmax_agreement']:.1%}"
        )
    recorded = (own["atol"], own["rtol"], own["argmax_agreement"])
    return reference, tuple(  # type: ignore[return-value]
        r if g is None else g for g, r in zip(given, recorded, strict=True))


def _own_reference(
    path: Path, reference: Any, own: dict[str, Any], notes: list[str]
) -> Any:
    """An int8 model's default reference: its own ``<name>.verify.npz`` if there is one,
    else the float model's, which its metadata names (PyTorch's float outputs)."""
    from fairdeploy.export import verify_npz_path

    named = own.get("reference")
    if reference is not None or verify_npz_path(path).is_file() or not isinstance(named, str):
        return reference
    notes.append(f"reference: {named} beside the model (PyTorch's outputs of the float "
                 "model it was quantized from)")
    return path.with_name(Path(named).name)


@dataclass(frozen=True)
class RuntimesResult:
    """Outcome of :func:`verify_runtimes`: one :class:`VerifyResult` per runtime; truthy
    when every runtime passed.

    Attributes
    ----------
    results : dict of str to VerifyResult
        Per runtime, in the order asked.
    """

    results: dict[str, VerifyResult]

    @property
    def passed(self) -> bool:
        """Every runtime passed."""
        return all(self.results.values())

    @property
    def verified_in(self) -> list[str]:
        """The runtimes in which the file passed."""
        return [rt for rt, r in self.results.items() if r]

    @property
    def failed_in(self) -> list[str]:
        """The runtimes in which it did not."""
        return [rt for rt, r in self.results.items() if not r]

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the first runtime's result at the top level (the shape a
        one-runtime verify always had), then ``verified_in`` and every runtime's result."""
        first = next(iter(self.results.values())).to_dict()
        return first | {
            "passed": self.passed,
            "verified_in": self.verified_in,
            "failed_in": self.failed_in,
            "runtimes": {rt: r.to_dict() for rt, r in self.results.items()},
        }

    def summary_lines(self) -> list[str]:
        """Each runtime's lines, then (with several runtimes) one verdict line."""
        if len(self.results) == 1:
            return next(iter(self.results.values())).summary_lines()
        lines: list[str] = []
        for rt, r in self.results.items():
            lines.append(f"== {rt} ==")
            lines += r.summary_lines()
        if self.passed:
            lines.append(f"PASSED in every runtime: {', '.join(self.verified_in)}")
        else:
            ok = f" (passed in {', '.join(self.verified_in)})" if self.verified_in else ""
            lines.append(f"FAILED in {', '.join(self.failed_in)}{ok}")
        return lines


def verify_runtimes(
    onnx_path: str | os.PathLike[str], runtimes: Any = ("onnxruntime",), **kwargs: Any
) -> RuntimesResult:
    """:func:`verify` in each runtime of ``runtimes`` (names, or comma lists), the same
    reference, tolerances and group fairness in each.

    Every runtime is checked to be installed before any runs (OpenVINO is optional: one
    line says how to install it).
    """
    from fairdeploy.runtimes import load_runtime_check, parse_runtimes

    names = parse_runtimes(runtimes)
    for rt in names:
        load_runtime_check(rt)
    return RuntimesResult({rt: verify(onnx_path, runtime=rt, **kwargs) for rt in names})


def _load_checked_reference(
    path: Path, reference: str | os.PathLike[str] | Reference | None
) -> Reference:
    """The reference (default ``<name>.verify.npz`` beside the model), after checking that
    neither the model nor the reference file changed since a run folder's manifest
    recorded them (:func:`fairdeploy.rundir.check_unchanged`)."""
    from fairdeploy.export import verify_npz_path
    from fairdeploy.rundir import check_unchanged

    check_unchanged(path)
    if reference is None:
        reference = verify_npz_path(path)
    if not isinstance(reference, Reference):
        check_unchanged(reference)
    return reference if isinstance(reference, Reference) else load_reference(reference)


def _run_checker(path: Path) -> tuple[bool, str]:
    """``onnx.checker`` full check: (passed, the first line of its complaint)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True, ""
    except Exception as exc:  # ValidationError, shape-inference errors, protobuf errors
        return False, str(exc).strip().splitlines()[0] if str(exc) else repr(exc)


def _run_on_reference_inputs(
    sess: Any, x: np.ndarray, ref: Reference, path: Path, *, batch_size: int, progress: bool
) -> tuple[list[str], list[np.ndarray]]:
    """The model's output names and its outputs on every reference input, run in
    batches of ``batch_size`` (``sess``: a :class:`fairdeploy.runtimes.RuntimeSession`)."""
    from fairdeploy.export._onnx import INPUT_NAME

    in_name = sess.input_names[0] if sess.input_names else INPUT_NAME
    if sess.input_names:
        _check_input_shape(x, sess.input_shapes[0], ref.source)
    with phase(f"verify: {sess.runtime} on {plural(len(x), 'reference input')}", total=len(x),
               enabled=progress) as bar:
        outs = []
        for i in range(0, len(x), batch_size):
            try:
                outs.append(sess.run({in_name: x[i : i + batch_size]}))
            except Exception as exc:  # a runtime's error for inputs it cannot take
                raise FairDeployError(
                    f"{sess.runtime} cannot run {str(path)!r} on the reference inputs from "
                    f"{ref.source} ({first_line(exc)}): the reference belongs to another model"
                ) from None
            bar.advance(len(outs[-1][0]))
    names = list(sess.output_names)
    return names, [np.concatenate([o[j] for o in outs]) for j in range(len(names))]


def _check_input_shape(x: np.ndarray, expected: list[Any], source: str) -> None:
    """The reference inputs must fit the model's input: same rank, same fixed sizes."""
    want = ["batch" if i == 0 else d for i, d in enumerate(expected)]
    shown = "(" + ", ".join(str(d) for d in want) + ")"
    if x.ndim != len(expected) or any(
        isinstance(d, int) and d != x.shape[i] for i, d in enumerate(expected) if i
    ):
        raise FairDeployError(
            f"the reference inputs ({source}) have shape {tuple(x.shape)} but the model takes "
            f"{shown}: the reference belongs to another model or was saved with another "
            "layout; give the .npz written beside this model (<name>.verify.npz) or inputs of "
            "that shape"
        )


def _fairness_scope(meta: dict[str, Any], ref: Reference) -> str:
    """Say when the group metrics above come from a subset of the data the report used
    (``meta``: the model's fairdeploy metadata)."""
    recorded = meta.get("fairness") or {}
    n = len(ref.inputs)
    full = recorded.get("samples")
    split = recorded.get("split", "test")
    if ref.total is not None and ref.total > n:
        subset = f"the first {n:,} of the {ref.total:,} reference inputs ({ref.source} is capped)"
    elif full is not None and full > n:
        subset = f"{plural(n, 'sample')}, a subset of the {full:,} {split} samples"
    else:
        return ""
    eopp1 = recorded.get("eopp1")
    their = (
        f" (EOpp1 {eopp1:.3f} on all {full:,} samples)" if eopp1 is not None and full else ""
    )
    return (
        f"the group metrics above are computed on {subset}; the model's metadata and its "
        f"report use the whole {split} split{their}: a subset's figures differ by sampling"
    )

