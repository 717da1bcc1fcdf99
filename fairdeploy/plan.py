"""What a method does to a model, as plain values (no weights): the plan.

A :class:`Plan` is the validated, self-contained description of one method run: the
method's name and every setting it reads (target layers, rank, sr, rr, β, ratios, how
the scoring sets are drawn). Each registered method (:mod:`fairdeploy.methods`) defines
its plan as a subclass of :class:`Plan` with its own fields, so a setting a method does
not read is refused, never ignored. ``Plan("fairlrf", layers, beta=0.5)`` builds the
registered method's plan; a recipe's ``method:`` section and each ``compare:`` entry
become one. Plans are frozen and compare by value; ``plan.to_dict()`` is what export
metadata, reports and resolved recipes record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from fairdeploy._method_table import RegisteredMethod, find_method
from fairdeploy._schema import Fraction01, NonNegFloat, PosInt, Seed, Strict, schema_error
from fairdeploy._schema_errors import format_validation_error
from fairdeploy.errors import FairDeployError
from fairdeploy.fraction import kept_entries, num_selected

__all__ = [
    "AUTO_SAMPLES_PER_GROUP",
    "SAMPLE_COUNT_WORDS",
    "LayerPlan",
    "Plan",
    "SamplingSpec",
    "ScoringSpec",
    "kept_entries",
    "nested_validation",
    "num_selected",
]


def _positional(fields: tuple[str, ...], args: tuple[Any, ...], data: dict[str, Any]) -> None:
    if len(args) > len(fields):
        raise TypeError(f"at most {len(fields)} positional arguments ({', '.join(fields)})")
    for name, value in zip(fields, args, strict=False):
        if name in data:
            raise TypeError(f"{name!r} given twice")
        data[name] = value


# Set while a plan is being validated as part of something larger (a recipe, or an
# enclosing plan): errors then stay pydantic errors, so the outer validation reports them
# with their full key path; the outermost constructor turns them into FairDeployError.
_NESTED: ContextVar[bool] = ContextVar("fairdeploy_plan_nested", default=False)


@contextlib.contextmanager
def nested_validation() -> Iterator[None]:
    """Validate plans inside a larger schema: their errors stay ``ValidationError``s."""
    token = _NESTED.set(True)
    try:
        yield
    finally:
        _NESTED.reset(token)


def _validate(init: Callable[..., None], data: dict[str, Any], what: str) -> None:
    if _NESTED.get():
        init(**data)
        return
    with nested_validation():
        try:
            init(**data)
        except ValidationError as exc:
            raise FairDeployError(format_validation_error(exc, what)) from None


class LayerPlan(Strict):
    """Settings for one target ``nn.Linear`` of a low-rank method.

    ``LayerPlan("classifier.3", 64, 0.4, 0.0, 5/9)`` or by keyword. Which fields a
    method reads is its plan's business: ``truncated_svd`` refuses sr/rr/β, the SLR
    methods refuse β, ``fairlrf`` fills a missing β from its plan's ``beta``.

    Attributes
    ----------
    layer : str
        Qualified module name of an ``nn.Linear`` (e.g. ``classifier.3``).
    rank : int
        Truncated-SVD rank k, ``1 ≤ k ≤ min(Din, Dout)``.
    sr : float
        Fraction of rows of U and of columns of V that are sparsified.
    rr : float
        Fraction of the k entries a sparsified row/column KEEPS (``⌊rr·k⌋``);
        ``rr = 0`` zeroes the selected rows/columns entirely.
    beta : float or None
        FairLRF trade-off β in ``½θ²(h0 − β h1)`` (None: not set).
    """

    model_config = ConfigDict(frozen=True)

    layer: str
    rank: PosInt
    sr: Fraction01 = 0.0
    rr: Fraction01 = 0.0
    beta: NonNegFloat | None = None

    def __init__(self, *args: Any, **data: Any) -> None:
        _positional(("layer", "rank", "sr", "rr", "beta"), args, data)
        _validate(super().__init__, data, "LayerPlan")


#: The words ``samples_per_group`` takes besides a count.
SAMPLE_COUNT_WORDS = ("all", "auto")
#: ``samples_per_group: auto`` on data whose training inputs are not held in memory.
AUTO_SAMPLES_PER_GROUP = 1024


def _sample_count(value: Any) -> Any:
    """``samples_per_group``: an integer ≥ 1, ``all`` or ``auto``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in SAMPLE_COUNT_WORDS:
            return text
        try:
            value = int(text)
        except ValueError:
            raise ValueError("use an integer ≥ 1, all or auto") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("use an integer ≥ 1, all or auto")
    return value


SampleCount = Annotated[int | str, BeforeValidator(_sample_count)]


class SamplingSpec(Strict):
    """How the per-group scoring sets are drawn from the training split.

    ``samples_per_group``: a number n gives every group ``min(n, smallest group)``
    samples, drawn with ``seed`` (DESIGN §2); ``all`` takes every training sample of
    each group (the sets then differ in size; each group's Hessian is a mean over its
    own set, so that does not bias it); ``auto`` (the default) is ``all`` when the
    training split's inputs are tensors held in memory (tabular data: the trunk pass
    over them is cheap) and ``repeats`` is 1, and 1024 otherwise (images: ``all``
    would cost one trunk pass over the whole training split). Samples of unknown
    group are left out.

    ``repeats``: R independent draws, seeds ``seed``, ``seed + 1`` … ``seed + R − 1``
    (one ``numpy.random.default_rng`` stream each). A plan is applied with the draw of
    ``seed``; ``optimize``, ``compare`` and ``sweep`` apply the other draws too and
    report the spread of the metrics over draws and the overlap of the selections.
    ``all`` has one possible draw, so it needs ``repeats: 1``.
    """

    model_config = ConfigDict(frozen=True)

    samples_per_group: SampleCount = "auto"
    seed: Seed = 0
    repeats: PosInt = 1

    @model_validator(mode="after")
    def _one_draw_of_all(self) -> SamplingSpec:
        if self.samples_per_group == "all" and self.repeats > 1:
            raise schema_error(
                "fd_repeats_all",
                "repeats: {r} is not allowed with samples_per_group: all (every draw would be "
                "the same set: use repeats: 1, or a number of samples per group to draw)",
                {"r": self.repeats},
            )
        return self

    @property
    def draw_seeds(self) -> tuple[int, ...]:
        """The seeds of the R draws: ``seed``, ``seed + 1`` … (one seed for ``all``)."""
        if self.samples_per_group == "all":
            return (self.seed,)
        return tuple(self.seed + r for r in range(self.repeats))


class ScoringSpec(SamplingSpec):
    """Per-group Hessian diagonals on the scoring sets: the estimator, its batch size and,
    for ``ggn_mc``, the labels drawn per sample (``mc_samples``; the other estimators draw
    none, so a value other than 1 with them is refused rather than ignored)."""

    estimator: Literal["exact", "fisher", "ggn_mc"] = "exact"
    batch_size: PosInt = 256
    mc_samples: PosInt = 1

    @model_validator(mode="after")
    def _mc_samples_only_with_ggn_mc(self) -> ScoringSpec:
        if self.mc_samples != 1 and self.estimator != "ggn_mc":
            raise schema_error(
                "fd_mc_samples",
                "mc_samples: {n} is read only by estimator ggn_mc (its label draws per "
                "sample); estimator {e!r} draws none: set estimator: ggn_mc, or remove "
                "mc_samples",
                {"n": self.mc_samples, "e": self.estimator},
            )
        return self


class Plan(Strict):
    """Base of every method's plan: the method's name and, in subclasses, its settings.

    ``Plan(name, ...)`` returns the plan of the registered method ``name`` (a
    subclass); its other arguments are that plan's fields (``layers`` may be given
    second, positionally). Bad values raise :class:`~fairdeploy.errors.FairDeployError`
    naming the field. The method is looked up in the table that importing
    :mod:`fairdeploy.methods` fills (``fairdeploy.Plan`` imports it); this module never
    imports a method, since every method's module imports its plan from here.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    method: str = Field(
        alias="name", description="registered method name, or package.module:Class"
    )

    def __new__(cls, *args: Any, **data: Any) -> Plan:
        name = args[0] if args else data.get("method", data.get("name"))
        if cls is Plan and name is not None:
            cls = find_method(str(name)).plan_class
        return super().__new__(cls)

    def __init__(self, *args: Any, **data: Any) -> None:
        _positional(("method", "layers"), args, data)
        _validate(super().__init__, data, f"plan {data.get('method', data.get('name'))!r}")

    @model_validator(mode="after")
    def _registered(self) -> Plan:
        try:
            impl = find_method(self.method)
        except FairDeployError as exc:
            raise schema_error("fd_method", "name: {msg}", {"msg": str(exc)}) from None
        if not isinstance(self, impl.plan_class):
            raise schema_error(
                "fd_plan_class",
                "name: {name!r} does not take a {cls} (its plan is {want})",
                {"name": self.method, "cls": type(self).__name__,
                 "want": impl.plan_class.__name__},
            )
        return self

    @model_validator(mode="after")
    def _scoring_seed_is_read(self) -> Plan:
        """``scoring.seed`` with ``samples_per_group: all`` draws nothing, unless something
        else reads it (:meth:`reads_scoring_seed_without_a_draw`): another value than 0 is
        refused there rather than ignored. (``auto`` becomes ``all`` only at run time, on
        tabular data with one draw: a seed is not refused there, as it is read on images.)"""
        scoring = getattr(self, "scoring", None)
        if (
            isinstance(scoring, SamplingSpec)
            and scoring.samples_per_group == "all"
            and scoring.seed != 0
            and not self.reads_scoring_seed_without_a_draw()
        ):
            raise schema_error(
                "fd_scoring_seed_unread",
                "scoring.seed: samples_per_group: all takes every sample, so the seed {seed} "
                "draws nothing here: remove it, or give a number of samples per group",
                {"seed": scoring.seed},
            )
        return self

    def reads_scoring_seed_without_a_draw(self) -> bool:
        """Whether ``scoring.seed`` is read when no samples are drawn: by the ``ggn_mc``
        estimator's label draws (overridden where more reads it, e.g. fine-tuning)."""
        return getattr(getattr(self, "scoring", None), "estimator", None) == "ggn_mc"

    @property
    def implementation(self) -> Any:
        """The registered :class:`~fairdeploy.methods.Method` this plan belongs to."""
        method: RegisteredMethod = find_method(self.method)
        return method

    @property
    def factorizes(self) -> bool:
        """Whether the method replaces target layers by their truncated SVD."""
        return bool(self.implementation.factorizes)

    @property
    def label(self) -> str:
        """The table label: the method's name and its settings."""
        return str(self.implementation.describe(self))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (export metadata, reports): ``{"method": ...}``."""
        return self.model_dump(mode="json")
