"""Comparing a model's outputs with reference outputs, and the default tolerances of
every such check: the float export's parity check (:func:`fairdeploy.export.export_onnx`),
``fairdeploy verify`` and the recipe's ``export.tolerances``, and the int8 check
(:func:`fairdeploy.export.verify_int8`, ``export.int8``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fairdeploy._json import JsonRecord
from fairdeploy._text import non_finite
from fairdeploy.errors import FairDeployError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_ARGMAX_AGREEMENT",
    "DEFAULT_ATOL",
    "DEFAULT_INT8_ARGMAX_AGREEMENT",
    "DEFAULT_INT8_ATOL_SCALE",
    "DEFAULT_INT8_RTOL",
    "DEFAULT_RTOL",
    "OutputComparison",
    "compare_outputs",
    "tolerance_text",
]

#: Default absolute tolerance of the float checks (ORT vs PyTorch, ``max|Δ| ≤ atol + rtol·|ref|``).
DEFAULT_ATOL = 1e-4
#: Default relative tolerance of the float checks.
DEFAULT_RTOL = 1e-3
#: Default fraction of samples whose predicted class must agree in the float checks.
DEFAULT_ARGMAX_AGREEMENT = 0.999
#: Default atol of :func:`verify_int8` as a multiple of the reference logits' standard
#: deviation: int8 rounding errors scale with the range of the values, not with each
#: logit's own magnitude, so an absolute tolerance tied to that range is the natural one.
#: Measured on healthy int8 models (``bench/bench_int8.py``, tests): the largest error is
#: 0.02–0.06 std with dynamic quantization and up to 0.25–0.40 std with static QDQ (a
#: test input beyond the calibrated activation range is clipped), the mean error ~0.01–0.02
#: std; a broken calibration gives errors of several std.
DEFAULT_INT8_ATOL_SCALE = 0.5
#: Default rtol of :func:`verify_int8` (on top of the atol).
DEFAULT_INT8_RTOL = 0.02
#: Default fraction of samples whose argmax must survive int8: samples near a decision
#: boundary may flip (measured 99.0–99.95 % on healthy int8 models), so less than the
#: float check's 99.9 %.
DEFAULT_INT8_ARGMAX_AGREEMENT = 0.98


@dataclass(frozen=True)
class OutputComparison(JsonRecord):
    """One output of the ONNX model against its reference.

    ``min_atol`` is the smallest atol that passes with the rtol used; ``min_rtol`` the
    smallest rtol that passes with the atol used (inf when a zero reference differs by
    more than atol).

    In JSON (:meth:`to_dict`) a number that is not finite is ``null``: with ``finite``
    true only ``max_rel_error`` and ``min_rtol`` can be, and mean +inf (a zero reference
    value differs by more than atol: no rtol passes); with ``finite`` false the outputs
    held NaN or ±inf and every error is ``null``.
    """

    name: str
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    min_atol: float
    min_rtol: float
    argmax_agreement: float
    within_tolerance: bool
    passed: bool
    #: Whether every output value was finite (when not, the errors are ``inf``).
    finite: bool = True


def compare_outputs(
    name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, min_agree: float
) -> OutputComparison:
    """One output against its reference: passes when every ``|got − ref| ≤ atol + rtol·|ref|``
    (and ``got`` is finite) and the argmax agrees on at least ``min_agree`` of the rows.

    Also measures the smallest atol (at ``rtol``) and the smallest rtol (at ``atol``)
    that would pass. A shape mismatch is a FairDeployError (the reference belongs to
    another model), and so is a non-finite reference (nothing can be checked against it).
    """
    import numpy as np  # here, not at the top: the CLI reads the defaults above at start-up

    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    if got.shape != ref.shape:
        raise FairDeployError(
            f"output {name!r} has shape {got.shape} but the reference has {ref.shape}: "
            "the reference belongs to another model"
        )
    bad_ref = int((~np.isfinite(ref)).sum())
    if bad_ref:
        # Every difference against NaN is NaN: no tolerance could be stated, none checked.
        raise FairDeployError(
            f"the reference output {name!r} holds {non_finite(bad_ref)} of {ref.size:,}: "
            "nothing can be verified against it; regenerate the reference from a checkpoint "
            "with finite outputs"
        )
    diff = np.abs(got - ref)
    mag = np.abs(ref)
    finite = np.isfinite(got).all()
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mag > 0, diff / mag, np.where(diff > 0, np.inf, 0.0))
        need_rtol = np.where(
            mag > 0, (diff - atol) / mag, np.where(diff > atol, np.inf, 0.0)
        )
    max_rel = float(rel.max()) if rel.size else 0.0
    min_atol = float(max(0.0, (diff - rtol * mag).max())) if diff.size else 0.0
    min_rtol = float(max(0.0, need_rtol.max())) if diff.size else 0.0
    within = bool(finite and np.all(diff <= atol + rtol * mag))
    if got.ndim >= 2 and got.shape[-1] > 1:
        agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    else:
        agree = 1.0 if within else float(np.mean(diff <= atol + rtol * mag))
    return OutputComparison(
        name=name,
        max_abs_error=max_abs if finite else math.inf,
        max_rel_error=max_rel if finite else math.inf,
        atol=atol,
        rtol=rtol,
        min_atol=min_atol if finite else math.inf,
        min_rtol=min_rtol if finite else math.inf,
        argmax_agreement=agree,
        within_tolerance=within,
        passed=within and agree >= min_agree,
        finite=bool(finite),
    )


def tolerance_text(o: OutputComparison) -> str:
    """The tolerances that would pass, in words: the smallest atol at the rtol used and
    the smallest rtol at the atol used (a pass needs |Δ| ≤ atol + rtol·|ref| everywhere)."""
    if o.max_abs_error == 0:
        return "identical outputs: any atol and rtol pass"
    if math.isinf(o.min_atol):
        return "no tolerance passes: the outputs are not finite"
    atol = f"smallest atol that passes at rtol {o.rtol:g}: {o.min_atol:.3g}"
    if o.min_atol == 0:
        atol += f" (rtol {o.rtol:g} alone covers every difference)"
    if math.isinf(o.min_rtol):
        rtol = (f"no rtol passes at atol {o.atol:g} (a reference value of 0 differs by more "
                "than atol)")
    else:
        rtol = f"smallest rtol that passes at atol {o.atol:g}: {o.min_rtol:.3g}"
        if o.min_rtol == 0:
            rtol += f" (atol {o.atol:g} alone covers every difference)"
    return f"{atol}; {rtol}"
