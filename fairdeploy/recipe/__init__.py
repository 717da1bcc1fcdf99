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

from fairdeploy.data_specs import (
    CELEBA_ATTRIBUTES,
    DATA_KINDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CelebAAttributesData,
    CelebAData,
    DataSpec,
    Fitzpatrick17kData,
    ImageCsvData,
    ImagePreprocessing,
    NpzData,
    SensitiveSpec,
    SplitSpec,
    normalize_value,
)
from fairdeploy.recipe._load import load_recipe, parse_recipe
from fairdeploy.recipe._recipe import Recipe
from fairdeploy.recipe._resolved import recipe_hash, save_resolved_recipe
from fairdeploy.recipe._sections import (
    ExportSpec,
    ModelSpec,
    ReportSpec,
    SweepSpec,
    Tolerances,
    TrainSpec,
)

__all__ = [
    "CELEBA_ATTRIBUTES",
    "DATA_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CelebAAttributesData",
    "CelebAData",
    "DataSpec",
    "ExportSpec",
    "Fitzpatrick17kData",
    "ImageCsvData",
    "ImagePreprocessing",
    "ModelSpec",
    "NpzData",
    "Recipe",
    "ReportSpec",
    "SensitiveSpec",
    "SplitSpec",
    "SweepSpec",
    "Tolerances",
    "TrainSpec",
    "load_recipe",
    "normalize_value",
    "parse_recipe",
    "recipe_hash",
    "save_resolved_recipe",
]
