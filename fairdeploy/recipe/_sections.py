"""``model``, ``sensitive``, ``export``, ``report`` and ``train`` sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from fairdeploy._schema import (
    Fraction01,
    NonNegFloat,
    NonNegInt,
    PosInt,
    Seed,
    Strict,
    no_bool,
    schema_error,
)
from fairdeploy.comparison import (
    DEFAULT_ARGMAX_AGREEMENT,
    DEFAULT_ATOL,
    DEFAULT_INT8_ARGMAX_AGREEMENT,
    DEFAULT_INT8_ATOL_SCALE,
    DEFAULT_INT8_RTOL,
    DEFAULT_RTOL,
)

__all__ = [
    "ExportSpec",
    "Int8Spec",
    "ModelSpec",
    "ReportSpec",
    "SweepSpec",
    "Tolerances",
    "TrainSpec",
]


class ModelSpec(Strict):
    """``model:`` — the architecture the checkpoint was trained with."""

    arch: str = Field(description="registry name, torchvision name or package.module:factory")
    num_classes: Annotated[int, BeforeValidator(no_bool), Field(ge=2)]
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the factory")




class Tolerances(Strict):
    """ORT-vs-PyTorch parity: ``max|Δ| ≤ atol + rtol·|ref|`` and argmax agreement."""

    atol: NonNegFloat = DEFAULT_ATOL
    rtol: NonNegFloat = DEFAULT_RTOL
    argmax_agreement: Fraction01 = DEFAULT_ARGMAX_AGREEMENT


class Int8Spec(Strict):
    """``export.int8:`` — how ``export.quantize: int8`` makes ``model.int8.onnx``.

    ``mode``: ``auto`` (static QDQ for graphs with convolutions, dynamic otherwise),
    ``static`` (activation ranges calibrated on ``calibration_samples`` training inputs,
    drawn with ``seed``) or ``dynamic`` (weights only). ``atol_scale``/``rtol``/
    ``argmax_agreement``: the int8 verification's tolerances (atol = ``atol_scale`` × the
    standard deviation of the float logits).
    """

    mode: Literal["auto", "static", "dynamic"] = "auto"
    calibration_samples: PosInt = 256
    seed: Seed = 0
    atol_scale: Annotated[
        float, BeforeValidator(no_bool), Field(gt=0, allow_inf_nan=False)
    ] = DEFAULT_INT8_ATOL_SCALE
    rtol: NonNegFloat = DEFAULT_INT8_RTOL
    argmax_agreement: Fraction01 = DEFAULT_INT8_ARGMAX_AGREEMENT


class ExportSpec(Strict):
    """``export:`` — ONNX opset, simplification, parity tolerances, sparse layout and
    dead-neuron elimination (``fairdeploy.export.export_onnx``'s options).

    ``verify_samples`` test inputs are compared (ONNX Runtime vs PyTorch) when the
    model is exported; ``model.verify.npz`` keeps the first of them that fit in
    ``verify_npz_max_mb`` megabytes (all of them for tabular data; about 55 images of
    3×112×112), for a later ``fairdeploy verify``. ``verify_runtimes`` lists the
    runtimes each exported file is verified in (``onnxruntime``, ``openvino`` with
    ``pip install 'fairdeploy[openvino]'``, ``reference``: the ONNX reference evaluator,
    slow on images); the report says in which it passed.
    """

    opset: Annotated[int, BeforeValidator(no_bool), Field(ge=13, le=25)] = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    simplify: bool = True
    tolerances: Tolerances = Field(default_factory=Tolerances)
    verify_samples: PosInt = 1024
    sparse_layout: Literal["blocks", "zeros"] = "blocks"
    eliminate_dead: bool = True
    verify_npz_max_mb: Annotated[float, BeforeValidator(no_bool), Field(gt=0)] = 8.0
    verify_runtimes: list[Literal["onnxruntime", "openvino", "reference"]] = Field(
        default_factory=lambda: ["onnxruntime"], min_length=1,
        description="runtimes every exported file (and the int8 copy) is verified in: "
        "`optimize`/`compare` fail when one disagrees; `openvino` needs `pip install "
        "'fairdeploy[openvino]'`",
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: also ship model.int8.onnx (ONNX Runtime's quantization)"
    )
    int8: Int8Spec = Field(default_factory=Int8Spec)

    @model_validator(mode="after")
    def _int8_read(self) -> ExportSpec:
        # Settings that nothing reads are refused, not ignored (the defaults, as a resolved
        # recipe spells them out, change nothing and load back).
        if self.quantize == "none" and self.int8 != Int8Spec():
            raise schema_error(
                "fd_int8_unused",
                "int8: only read with quantize: int8 (add export.quantize: int8, or remove "
                "export.int8)",
                {},
            )
        return self

    @field_validator("verify_runtimes")
    @classmethod
    def _runtimes_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise schema_error(
                "fd_runtimes_twice",
                "{value} names a runtime twice (list each once)",
                {"value": value},
            )
        return value

    @model_validator(mode="after")
    def _exporter_supports(self) -> ExportSpec:
        # Checked when the recipe loads, not after the trunk pass, when export would fail.
        low, high = opset_range(self.exporter)
        if not low <= self.opset <= high:
            other = "torchscript" if self.exporter == "dynamo" else "dynamo"
            raise schema_error(
                "fd_opset",
                "opset: {opset} is not allowed with exporter {exporter} (use an opset from "
                "{low} to {high}, or exporter: {other})",
                {"opset": self.opset, "exporter": self.exporter, "low": low, "high": high,
                 "other": other},
            )
        return self


def max_export_opset() -> int:
    """The highest ONNX opset the installed torch's TorchScript exporter writes."""
    return opset_range("torchscript")[1]


def opset_range(exporter: str) -> tuple[int, int]:
    """The ONNX opsets an exporter of the installed torch writes: the dynamo exporter
    builds opset-18 graphs and converts them up to ``ONNX_MAX_OPSET``; the TorchScript
    one writes 13 to ``ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``."""
    try:
        from torch.onnx import _constants
    except ImportError:  # pragma: no cover - torch without its ONNX exporter
        return (18, 18) if exporter == "dynamo" else (13, 17)
    top = int(_constants.ONNX_MAX_OPSET)
    if exporter == "dynamo":
        return 18, top
    return 13, int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", top))


class ReportSpec(Strict):
    """``report:`` — latency measurement settings.

    ``latency``: ``quick`` (default) times every scope and batch size within
    ``latency_quick_seconds`` in all, at least 3 runs per model, and skips a batch size
    whose runs do not fit (a whole VGG at batch 128); ``full`` uses
    ``latency_seconds`` per batch size and at least 5 runs; ``off`` measures nothing.
    """

    latency: Literal["quick", "full", "off"] = "quick"
    latency_quick_seconds: Annotated[float, BeforeValidator(no_bool), Field(gt=0)] = Field(
        5.0, description="total time budget of the quick latency measurement"
    )
    latency_batches: list[PosInt] = Field(default_factory=lambda: [1, 32, 128])
    latency_warmup: NonNegInt = 10
    latency_iterations: PosInt = 100
    latency_seconds: Annotated[float, BeforeValidator(no_bool), Field(gt=0)] = Field(
        20.0,
        description="latency: full — time budget per batch size and model pair (at least 5 "
        "runs each)",
    )
    threads: PosInt | None = None

    @field_validator("latency_batches")
    @classmethod
    def _non_empty(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one batch size, e.g. [1, 32]")
        return value


class TrainSpec(Strict):
    """``train:`` — settings of ``fairdeploy train`` (the paper's pre-training, §3.1.2).

    SGD with ``momentum`` and ``weight_decay``, learning rate ``lr`` multiplied by
    ``gamma`` every ``step_epochs`` epochs. ``augment``: random horizontal flip and
    colour jitter on training images (ignored for tabular data).
    """

    epochs: PosInt = 100
    lr: Annotated[float, BeforeValidator(no_bool), Field(gt=0)] = 0.01
    momentum: Annotated[float, BeforeValidator(no_bool), Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    step_epochs: PosInt = 10
    gamma: Annotated[float, BeforeValidator(no_bool), Field(gt=0, le=1)] = 0.57
    batch_size: PosInt = 128
    seed: Seed = 0
    augment: bool = True


class SweepSpec(Strict):
    """``sweep:`` — the grid ``fairdeploy sweep`` evaluates, and how it chooses.

    ``grid`` maps keys of ``layer``, ``rank``, ``sr``, ``rr``, ``beta`` to a list of
    values, a comma-separated string, an inclusive range ``start:stop:step``, or (layer)
    ``all``; ``--grid KEY=VALUES`` on the command line replaces the same key. ``methods``:
    the low-rank methods to sweep (default: the recipe's method). ``repeats``: scoring
    draws per point (default: the method's ``scoring.repeats``). ``select``: the rule
    (``min eodd s.t. avg_precision >= vanilla - 0.01``; grammar in
    :mod:`fairdeploy.sweep`). ``guard``: the collapse guard; ``guard_tolerance``: its
    tolerance (default: from the rule, else 0.01). ``plots``: write the PNG plots.
    """

    grid: dict[str, Any] = Field(default_factory=dict)
    methods: list[str] | None = None
    repeats: PosInt | None = None
    select: str | None = None
    guard: bool = True
    guard_tolerance: Annotated[float, BeforeValidator(no_bool), Field(ge=0, le=1)] | None = None
    plots: bool = True

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict[str, Any]) -> dict[str, Any]:
        from fairdeploy.errors import FairDeployError
        from fairdeploy.grammar import parse_grid

        try:
            parsed = parse_grid(grid)
        except FairDeployError as exc:
            raise ValueError(str(exc).removeprefix("--grid ")) from None
        return {k: list(v) for k, v in parsed.items()}

    @field_validator("select")
    @classmethod
    def _check_select(cls, rule: str | None) -> str | None:
        from fairdeploy.errors import FairDeployError
        from fairdeploy.grammar import parse_selection

        if rule is None:
            return None
        try:
            parse_selection(rule)
        except FairDeployError as exc:
            raise ValueError(str(exc).removeprefix("--select ")) from None
        return rule

    @model_validator(mode="after")
    def _tolerance_needs_the_guard(self) -> SweepSpec:
        if self.guard_tolerance is not None and not self.guard:
            raise schema_error(
                "fd_guard_tolerance_unread",
                "guard_tolerance: read only by the collapse guard, which guard: false turns "
                "off: remove one of them",
                {},
            )
        return self
