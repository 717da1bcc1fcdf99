"""The pipeline as a typed Python API: one model, one recipe, any number of plans.

>>> exp = Experiment("recipes/fitz.yaml", "ckpt.pt", cache_dir="exports/.cache")
>>> ctx = exp.prepare()                       # cut the model, cache the trunk's features
>>> fair = exp.apply(exp.recipe.method)       # -> Processed (the head, or the whole model)
>>> exp.evaluate(fair, "test").eopp1          # GroupMetrics on the test split
>>> result = exp.export(fair, "out/model.onnx")
>>> bool(exp.verify("out/model.onnx"))

:meth:`Experiment.prepare` cuts the model at the input of the first layer any plan
changes (``torch.fx``), runs the frozen trunk once per split (validation and test, and
per scoring-set draw the training samples it needs), optionally through the persisted
cache, and picks the privileged group. :meth:`Experiment.apply` hands a plan to its
method (:mod:`fairdeploy.methods`) with the shared :class:`Context`: the cut model, the
cached features, scoring sets, SVD factors and Hessians. Methods that change only the
head are evaluated on cached features; those that change the trunk run the full model
over the split once. The recipe and the model may be given as paths or in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # only for annotations: export is imported when used
    from fairdeploy.export import Exporter, ExportResult

from fairdeploy import __version__
from fairdeploy._probe import check_model_takes_inputs
from fairdeploy.cache import FeatureCache, dataset_fingerprint, file_sha256
from fairdeploy.errors import FairDeployError
from fairdeploy.features import FeatureSet, compute_features, layers_in_call_order, split_model
from fairdeploy.lrf import FactorizedLinear, linear_layers
from fairdeploy.methods import Processed
from fairdeploy.methods._context import HessianCompute, ScoringSet
from fairdeploy.metrics import GroupMetrics, group_metrics, privileged_group
from fairdeploy.plan import AUTO_SAMPLES_PER_GROUP, Plan, SamplingSpec
from fairdeploy.recipe import Recipe, load_recipe, parse_recipe
from fairdeploy.scoring import scoring_indices

__all__ = ["Context", "Experiment", "HessianCompute", "ScoringSet"]


def _scoring_set(
    fs: FeatureSet,
    idx: Mapping[int, np.ndarray],
    order: np.ndarray,
    per_group: int | str,
    seed: int | None,
) -> ScoringSet:
    n0 = len(idx[0])
    positions = {0: np.arange(n0), 1: np.arange(n0, len(order))}
    key = {"per_group": per_group, "seed": seed, "n": len(order)}
    if per_group == "all":
        key["sizes"] = [n0, len(order) - n0]
    return ScoringSet(fs, positions, order, key)


@dataclass
class Context:
    """What every method shares: the cut vanilla model, cached features and caches.

    The context owns its keyed services. A method asks for what it needs and says how to
    compute it; the context draws the data, builds the cache key (in one place, from the
    plan's settings: the draw, its seed, the estimator and whatever of its settings the
    value depends on, the privileged group) and keeps the value in memory and, with a
    cache folder, on disk:

    * :meth:`scoring_set` / :meth:`scoring_sets` / :meth:`scoring_inputs`: the per-group
      scoring samples of a draw (trunk features, or the model's own inputs);
    * :meth:`svd` and :meth:`factorized`: a layer's truncated SVD at a rank;
    * :meth:`hessians`: per-group curvature of named parameters on a draw, by role (0
      unprivileged, 1 privileged), computed by the method's ``compute(data, group_ids)``
      and keyed by ``of`` (what it is of: layers, parameters, the processed head's state);
    * :meth:`activations`: activation statistics on a draw, keyed the same way.

    ``compute`` receives the :class:`ScoringSet` whole and reads what it needs from it
    (today the head's input is one tensor, ``data.features.features``; a cut that carries
    several values gives the head a tuple of them, and only ``compute`` reads that).
    Methods never build cache keys and never touch the cache themselves.

    Attributes
    ----------
    recipe : Recipe
    model : nn.Module
        The vanilla model, eval mode (never modified: methods copy).
    first_layer : str
        The trunk/head cut is at this layer's input.
    trunk, head : nn.Module
        The model before the cut, and the vanilla head (the model from the cut on).
    splits : dict
        ``train``, ``val``, ``test`` datasets.
    features : dict
        ``val`` and ``test`` :class:`~fairdeploy.features.FeatureSet` at the cut.
    class_names, group_names : list of str
    privileged : int
        Id of the privileged group; the other one is group 0 of the fairness scores.
    privileged_info : dict
        How it was chosen (``auto`` from the vanilla model's validation macro recall, or
        named by the recipe), for the report.
    """

    recipe: Recipe
    model: nn.Module
    first_layer: str
    trunk: nn.Module
    head: nn.Module
    splits: dict[str, Any]
    features: dict[str, FeatureSet]
    class_names: list[str]
    group_names: list[str]
    privileged: int
    privileged_info: dict[str, Any]
    checkpoint_sha256: str
    preprocessing: dict[str, Any] | None = None
    device: str = "cpu"
    progress: bool = True
    cache: FeatureCache | None = None
    cache_key: dict[str, Any] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    _scoring: dict[tuple[int | str, int | None], ScoringSet] = field(
        default_factory=dict, repr=False
    )
    _scoring_raw: dict[tuple[int | str, int | None], ScoringSet] = field(
        default_factory=dict, repr=False
    )
    _tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def unprivileged(self) -> int:
        """Id of the unprivileged group (group 0 of the fairness scores)."""
        return 1 - self.privileged

    # ------------------------------------------------------------------ shared, cached

    def training_inputs_in_memory(self) -> bool:
        """Whether the training split's inputs are tensors held in memory (tabular data):
        then the trunk pass over all of them is cheap, and ``samples_per_group: auto``
        means ``all``."""
        return torch.is_tensor(getattr(self.splits["train"], "features", None))

    def resolve_sampling(self, spec: SamplingSpec) -> SamplingSpec:
        """``spec`` with ``samples_per_group: auto`` replaced by what it means here:
        ``all`` for tabular data (training inputs in memory) with ``repeats: 1``, else
        :data:`~fairdeploy.plan.AUTO_SAMPLES_PER_GROUP` (1024)."""
        if spec.samples_per_group != "auto":
            return spec
        every = self.training_inputs_in_memory() and spec.repeats == 1
        value: int | str = "all" if every else AUTO_SAMPLES_PER_GROUP
        return type(spec).model_validate(spec.model_dump() | {"samples_per_group": value})

    def _draw_indices(self, per_group: int | str, seed: int) -> dict[int, np.ndarray]:
        groups = np.asarray(self.splits["train"].groups)
        if per_group == "all":
            present = sorted({int(v) for v in np.unique(groups)})
            out = {g: np.flatnonzero(groups == g).astype(np.int64) for g in (0, 1)}
            for g, idx in out.items():
                if not idx.size:
                    raise FairDeployError(
                        f"group {g} has no samples in the training split (groups present: "
                        f"{present}); scoring needs samples of every group"
                    )
            return out
        return scoring_indices(groups, per_group=int(per_group), seed=seed)

    def _draw_key(
        self, spec: SamplingSpec
    ) -> tuple[SamplingSpec, tuple[int | str, int | None]]:
        """``spec`` resolved, and the key its draw is cached under: (samples per group,
        seed), the seed None for ``all`` (every sample: the seed draws nothing)."""
        spec = self.resolve_sampling(spec)
        per_group = spec.samples_per_group
        return spec, (per_group, None if per_group == "all" else spec.seed)

    def scoring_set(self, spec: SamplingSpec) -> ScoringSet:
        """The per-group scoring sets drawn by ``spec`` from the training split (the draw
        of ``spec.seed``), as trunk features (computed once per draw, persisted in the
        cache). ``samples_per_group: all`` takes every training sample of each group."""
        spec, wanted = self._draw_key(spec)
        per_group, seed = wanted
        if wanted not in self._scoring:
            idx = self._draw_indices(per_group, spec.seed)
            order = np.concatenate([idx[0], idx[1]])
            if per_group == "all":
                what = f"every sample of each group ({len(idx[0])} + {len(idx[1])})"
                subset: Any = "every sample of known group"
            else:
                what = f"{len(idx[0])} per group, seed {spec.seed}"
                subset = order.tolist()
            fs, hit = self._features(
                f"scoring (train, {what})",
                self.splits["train"].subset(order),
                {"split": "scoring", "subset": subset},
            )
            self.cache_hits[f"scoring:{per_group}:{seed}"] = hit
            self._scoring[wanted] = _scoring_set(fs, idx, order, per_group, seed)
        return self._scoring[wanted]

    def scoring_sets(self, spec: SamplingSpec) -> list[ScoringSet]:
        """The scoring sets of every draw of ``spec`` (``spec.repeats`` seeds from
        ``spec.seed``). Draws not computed yet get their trunk features from one pass
        over the union of their samples (cached), not one pass each."""
        spec = self.resolve_sampling(spec)
        seeds = spec.draw_seeds
        per_group = spec.samples_per_group
        todo = [s for s in seeds if (per_group, s) not in self._scoring]
        if per_group != "all" and len(todo) > 1:
            draws = {s: self._draw_indices(per_group, s) for s in todo}
            union = np.unique(np.concatenate([d[g] for d in draws.values() for g in (0, 1)]))
            fs, hit = self._features(
                f"scoring (train, {len(todo)} draws of {len(draws[todo[0]][0])} per group: "
                f"{len(union)} samples)",
                self.splits["train"].subset(union),
                {"split": "scoring", "subset": union.tolist()},
            )
            for s, idx in draws.items():
                order = np.concatenate([idx[0], idx[1]])
                self.cache_hits[f"scoring:{per_group}:{s}"] = hit
                part = fs.subset(np.searchsorted(union, order))
                self._scoring[(per_group, s)] = _scoring_set(part, idx, order, per_group, s)
        return [
            self.scoring_set(type(spec).model_validate(spec.model_dump() | {"seed": s}))
            for s in seeds
        ]

    def scoring_inputs(self, spec: SamplingSpec) -> ScoringSet:
        """The same draw as :meth:`scoring_set`, with the model's own inputs (images,
        rows) in place of trunk features: for methods that score layers of the trunk
        through the full model. Loaded once per draw and kept in memory (not persisted:
        reading the inputs costs less than the trunk pass, which this skips)."""
        spec, wanted = self._draw_key(spec)
        per_group, seed = wanted
        if wanted not in self._scoring_raw:
            idx = self._draw_indices(per_group, spec.seed)
            order = np.concatenate([idx[0], idx[1]])
            fs = compute_features(
                nn.Identity(),
                self.splits["train"].subset(order),
                device="cpu",
                num_workers=self.recipe.data.num_workers,
                progress=self.progress,
                description=f"scoring inputs (train, {len(idx[0])} + {len(idx[1])} samples)",
            )
            self._scoring_raw[wanted] = _scoring_set(fs, idx, order, per_group, seed)
        return self._scoring_raw[wanted]

    def scoring_sizes(self, spec: SamplingSpec) -> tuple[int, int]:
        """Samples of group 0 and group 1 in the draw of ``spec``, without computing
        anything for them (no trunk pass)."""
        spec = self.resolve_sampling(spec)
        idx = self._draw_indices(spec.samples_per_group, spec.seed)
        return len(idx[0]), len(idx[1])

    def scoring_per_group(self, spec: SamplingSpec) -> int:
        """Samples per group a draw of ``spec`` holds (the smaller group caps it), without
        computing anything for them."""
        return min(self.scoring_sizes(spec))

    # ------------------------------------------------------------------ keyed services
    #
    # Every cached value a method needs is asked for here, and its cache key is built
    # here, from the plan's settings: methods say WHAT they want (a layer's SVD, the
    # curvature of some parameters on a scoring draw, activation statistics) and how to
    # compute it, never how it is keyed.

    def svd(self, layer: str, rank: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """The truncated SVD of the vanilla ``layer`` at ``rank``: ``{"U", "S", "V"}``
        (cached: a sweep decomposes once per layer and rank)."""
        from fairdeploy.lrf import factorize

        linear = self.head.get_submodule(layer)

        def compute() -> dict[str, torch.Tensor]:
            f = factorize(linear, rank, seed=seed)
            return {"U": f.U.detach(), "S": f.S.detach(), "V": f.V.detach()}

        try:
            return self._cached("svd", {"layer": layer, "rank": rank, "seed": seed}, compute)
        except FairDeployError as exc:
            raise FairDeployError(f"layer {layer!r}: {exc}") from None

    def factorized(self, layer: str, rank: int, *, seed: int = 0) -> FactorizedLinear:
        """A new :class:`~fairdeploy.lrf.FactorizedLinear` of the vanilla ``layer`` at
        ``rank``, from :meth:`svd`."""
        t = self.svd(layer, rank, seed=seed)
        linear = self.head.get_submodule(layer)
        bias = None if linear.bias is None else linear.bias.detach()
        return FactorizedLinear(t["U"], t["S"], t["V"], bias)

    def hessians(
        self,
        spec: SamplingSpec,
        compute: HessianCompute,
        *,
        of: Mapping[str, Any],
        inputs: str = "features",
        kind: str = "hessian",
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Per-group curvature (Hessian diagonals or an estimate) on the scoring draw of
        ``spec``, by role: ``{0: unprivileged, 1: privileged}``, each ``{name: tensor}``.

        Parameters
        ----------
        spec : SamplingSpec
            The plan's scoring settings: the draw (samples per group, seed) and, for a
            :class:`~fairdeploy.plan.ScoringSpec`, the estimator, its batch size and
            (``mc_samples``, when the spec has it) its label draws.
        compute : callable
            ``compute(data, group_ids)`` → ``{group id: {name: tensor}}``: the curvature
            on ``data`` (a :class:`ScoringSet`) of the groups ``group_ids`` (the data's
            ids of the unprivileged and the privileged group, in that order).
        of : mapping
            What the curvature is of, as JSON-ready values: the parameters or layers,
            and the state of the module scored where it is not the vanilla head (ranks,
            earlier selections). Part of the cache key.
        inputs : {"features", "model"}
            ``features``: ``data`` holds the trunk's features (a head is scored);
            ``model``: the model's own inputs (the whole model is scored).
        kind : str
            The cache entry's kind (``hessian``, ``weight_hessian``).

        The key is built here and nowhere else: ``of``, where it ran, the estimator and
        its settings, the draw, the seed whenever the estimator draws labels (``ggn_mc``:
        also with ``samples_per_group: all``, whose draw itself has no seed) and the
        privileged group.
        """
        if inputs not in ("features", "model"):
            raise ValueError(f"inputs={inputs!r}: use 'features' or 'model'")
        data = self.scoring_inputs(spec) if inputs == "model" else self.scoring_set(spec)
        ids = (self.unprivileged, self.privileged)
        key = {"on": inputs, "scoring": data.key, "privileged": self.privileged}
        key |= self._estimator_key(spec)
        clash = sorted(set(of) & set(key))
        if clash:
            raise ValueError(f"of= must not name {clash}: the context keys those itself")
        # ``of`` at the top level: ``cache list`` describes an entry by its ``layer``.
        key = dict(of) | key

        def flat() -> dict[str, torch.Tensor]:
            h = compute(data, ids)
            return {f"{g}|{p}": t.detach().cpu() for g, d in h.items() for p, t in d.items()}

        got = self._cached(kind, key, flat)
        out: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}}
        for name, t in got.items():
            g, _, p = name.partition("|")
            out[ids.index(int(g))][p] = t
        return out

    @staticmethod
    def _estimator_key(spec: SamplingSpec) -> dict[str, Any]:
        """The estimator settings a curvature depends on (none for a plain draw)."""
        estimator = getattr(spec, "estimator", None)
        if estimator is None:
            return {}
        draws = estimator == "ggn_mc"  # the only estimator that draws labels
        return {
            "estimator": estimator,
            "batch_size": getattr(spec, "batch_size", None),
            "estimator_seed": spec.seed if draws else None,
            "mc_samples": getattr(spec, "mc_samples", None) if draws else None,
        }

    def activations(
        self,
        spec: SamplingSpec,
        compute: Callable[[ScoringSet], dict[str, torch.Tensor]],
        *,
        of: Mapping[str, Any],
    ) -> dict[str, torch.Tensor]:
        """Activation statistics on the scoring draw of ``spec`` (trunk features):
        ``compute(data)`` → ``{name: tensor}``, keyed by ``of`` (what they are of, JSON-
        ready) and the draw. Kept in memory for the experiment's life (a pass over the
        scoring features costs less than reading a cache file)."""
        data = self.scoring_set(spec)
        memo = json.dumps(["activations", dict(of), data.key], sort_keys=True, default=str)
        if memo not in self._tensors:
            self._tensors[memo] = compute(data)
        return self._tensors[memo]

    def _cached(
        self, kind: str, key: Mapping[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """``compute()`` through the persisted cache, keyed by ``key`` and by everything
        the experiment depends on (checkpoint, data, cut, versions). Kept in memory too
        (also without a cache folder), so a sweep computes each value once."""
        memo_key = json.dumps([kind, key], sort_keys=True, default=str)
        if memo_key not in self._tensors:
            if self.cache is None:
                self._tensors[memo_key] = compute()
            else:
                parts = {**self.cache_key, **key}
                self._tensors[memo_key] = self.cache.get_or_compute_tensors(kind, parts, compute)[0]
        return self._tensors[memo_key]

    def _features(
        self, description: str, dataset: Any, key: Mapping[str, Any]
    ) -> tuple[FeatureSet, bool]:
        def compute() -> FeatureSet:
            return compute_features(
                self.trunk,
                dataset,
                device=self.device,
                num_workers=self.recipe.data.num_workers,
                progress=self.progress,
                description=f"trunk pass: {description}",
            )

        if self.cache is None:
            return compute(), False
        parts = {**self.cache_key, **key, "content": dataset_fingerprint(dataset)}
        return self.cache.get_or_compute(parts, compute)


class Experiment:
    """One model and one recipe: prepare once, then apply, evaluate, export and verify.

    Parameters
    ----------
    recipe : Recipe, path or mapping
        The recipe (a :class:`~fairdeploy.recipe.Recipe`, a YAML path, or its sections
        as a mapping).
    model : nn.Module or path
        The vanilla model in memory, or a checkpoint file (loaded with
        ``torch.load(weights_only=True)``).
    cache_dir : path, optional
        Persist trunk features, SVD factors and Hessians there (e.g. ``exports/.cache``);
        None keeps them in memory only.
    device : str
        Where PyTorch runs the trunk.
    progress : bool
        Progress bars on a terminal.
    trust_checkpoint : bool
        Allow a checkpoint that pickles a whole module (runs code from the file).
    splits : mapping, optional
        ``train``/``val``/``test`` datasets to use instead of loading the recipe's data.
    """

    def __init__(
        self,
        recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any],
        model: nn.Module | str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        progress: bool = False,
        trust_checkpoint: bool = False,
        splits: Mapping[str, Any] | None = None,
    ) -> None:
        from fairdeploy.checkpoint import load_checkpoint

        if isinstance(recipe, Recipe):
            self.recipe = recipe
        elif isinstance(recipe, Mapping):
            self.recipe = parse_recipe(dict(recipe))
        else:
            self.recipe = load_recipe(recipe)
        spec = self.recipe.model
        if isinstance(model, nn.Module):
            self.model = copy.deepcopy(model).eval()
            self.checkpoint: Path | None = None
            self.checkpoint_sha256 = state_dict_sha256(self.model)
        else:
            self.checkpoint = Path(model)
            self.model = load_checkpoint(
                model,
                arch=spec.arch,
                num_classes=spec.num_classes,
                model_kwargs=spec.kwargs,
                trust_checkpoint=trust_checkpoint,
            ).eval()
            self.checkpoint_sha256 = file_sha256(model)
        self.cache = FeatureCache(cache_dir) if cache_dir is not None else None
        self.device = device
        self.progress = progress
        self._splits = dict(splits) if splits is not None else None
        self._plans: list[Plan] = []
        self._ctx: Context | None = None
        self._references: dict[int, tuple[Processed, Any]] = {}
        self._inputs: dict[tuple[str, int], tuple[Any, tuple[Any, ...]]] = {}
        self._after_cut: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------------ plans

    def check(self, plan: Plan) -> Plan:
        """``plan`` checked against the model's shapes (raises FairDeployError)."""
        plan.implementation.check(plan, self.model)
        return plan

    def _head_layers(self, plans: Iterable[Plan]) -> list[str]:
        """Layers the plans change that the head can hold (a cut precedes them)."""
        names: list[str] = []
        for plan in plans:
            impl = plan.implementation
            targets = impl.target_layers(plan)
            if "" in targets:
                continue  # the whole model: no cut serves it
            for layer in impl.resolve_layers(plan, self.model):
                if layer not in names:
                    names.append(layer)
        return names

    @property
    def context(self) -> Context:
        """The prepared :class:`Context` (prepares with the recipe's plans if needed)."""
        return self._ctx if self._ctx is not None else self.prepare()

    def prepare(self, plans: Sequence[Plan] | None = None) -> Context:
        """Cut the model before the first layer any of ``plans`` changes (default: the
        recipe's method and compare plans), cache val/test features at the cut, and
        choose the privileged group. Returns the shared :class:`Context`."""
        plans = list(plans) if plans is not None else [self.recipe.method, *self.recipe.plans]
        for plan in plans:
            self.check(plan)
        self._plans = plans
        layers = self._head_layers(plans)
        if not layers:
            # Nothing changes the head: cut before the classifier, so the vanilla model
            # and whole-model methods still evaluate on small cached features.
            layers = linear_layers(self.model)[-1:]
        if not layers:
            raise FairDeployError("the model has no nn.Linear layer: fairdeploy needs one")
        first = layers_in_call_order(self.model, layers)[0]
        self._ctx = self._build_context(first)
        return self._ctx

    def _ensure_cut(self, plan: Plan) -> Context:
        ctx = self.context
        self.check(plan)
        layers = self._head_layers([plan])
        key = (ctx.first_layer, *layers)
        if layers and key not in self._after_cut:
            # Tracing the model costs more than applying a sweep point: once per layer set.
            if layers_in_call_order(self.model, list(key))[0] != ctx.first_layer:
                # The plan changes a layer before the cut: cut earlier (features cached).
                ctx = self.prepare([*self._plans, plan])
            else:
                self._after_cut.add(key)
        return ctx

    def _splits_or_load(self) -> dict[str, Any]:
        if self._splits is None:
            from fairdeploy.data import load_splits

            self._splits = dict(load_splits(self.recipe))
        return self._splits

    def _build_context(self, first: str) -> Context:
        recipe = self.recipe
        splits = self._splits_or_load()
        test_ds = splits["test"]
        if not len(test_ds):
            raise FairDeployError("the test split is empty: check data.split")
        # Two samples through the model before any long pass: a width that does not fit,
        # wrong logits or non-finite outputs are one line now, not a traceback later.
        check_model_takes_inputs(
            self.model, test_ds, what="the test split", num_classes=recipe.model.num_classes
        )
        trunk, head = split_model(self.model, first, example_input=first_samples(test_ds, 2)[0])
        names = getattr(test_ds, "class_names", None) or range(recipe.model.num_classes)
        class_names = [str(c) for c in names]
        group_names = [str(g) for g in getattr(test_ds, "group_names", ("group 0", "group 1"))]
        if len(group_names) != 2:
            raise FairDeployError(
                f"sensitive.groups defines {len(group_names)} groups ({group_names}); FairLRF "
                "and its metrics need exactly two: merge the values into two groups"
            )
        base_key = {
            "fairdeploy": __version__,
            "torch": torch.__version__,
            "device": str(self.device),
            "checkpoint": self.checkpoint_sha256,
            "arch": recipe.model.model_dump(mode="json"),
            # num_workers changes how the data is read, not what it is.
            "data": recipe.data.model_dump(mode="json", exclude={"num_workers"}),
            "sensitive": recipe.sensitive.model_dump(mode="json"),
            "cut": first,
        }
        ctx = Context(
            recipe=recipe,
            model=self.model,
            first_layer=first,
            trunk=trunk,
            head=head,
            splits=splits,
            features={},
            class_names=class_names,
            group_names=group_names,
            privileged=1,
            privileged_info={},
            checkpoint_sha256=self.checkpoint_sha256,
            preprocessing=getattr(test_ds, "preprocessing", None),
            device=self.device,
            progress=self.progress,
            cache=self.cache,
            cache_key={
                **base_key,
                "content": {n: dataset_fingerprint(d) for n, d in splits.items()},
            },
        )
        ctx.cache_key = base_key | {"content": ctx.cache_key["content"]}
        for split in ("val", "test"):
            fs, ctx.cache_hits[split] = ctx._features(
                f"{split} split", splits[split], {"split": split, "subset": None}
            )
            ctx.features[split] = fs
        ctx.privileged, ctx.privileged_info = _choose_privileged(ctx)
        return ctx

    # ------------------------------------------------------------------ the steps

    def apply(self, plan: Plan) -> Processed:
        """Apply ``plan`` to the vanilla model; the result keeps the plan."""
        ctx = self._ensure_cut(plan)
        impl = plan.implementation
        if impl.unavailable:
            raise FairDeployError(f"method {plan.method!r}: {impl.unavailable}")
        return impl.apply(plan, ctx)

    def draws(self, plan: Plan, *, prefetch: bool = True) -> list[Plan]:
        """The plans of ``plan``'s scoring draws, the draw of ``scoring.seed`` first.

        A plan whose ``scoring`` asks for ``repeats: R`` gives R plans, each with one
        draw (``repeats: 1``, seed ``seed + r``) and ``samples_per_group: auto``
        resolved, so each is a complete, validated plan (applying the first equals
        applying ``plan``). With ``prefetch`` the draws' scoring sets are computed now,
        together (one trunk pass over the union of their samples). A plan without
        scoring sets is its own only draw.
        """
        spec = getattr(plan, "scoring", None)
        if not isinstance(spec, SamplingSpec):
            return [plan]
        ctx = self._ensure_cut(plan)
        resolved = ctx.resolve_sampling(spec)
        if prefetch and len(resolved.draw_seeds) > 1:
            ctx.scoring_sets(resolved)
        raw = plan.model_dump(mode="json", by_alias=True)
        one = resolved.model_dump(mode="json") | {"repeats": 1}
        return [Plan(**(raw | {"scoring": one | {"seed": s}})) for s in resolved.draw_seeds]

    def model_of(self, processed: Processed) -> nn.Module:
        """The full processed model (the vanilla trunk with the processed head's layers
        swapped in, or the method's own full model), eval mode."""
        if processed.model is not None:
            return processed.model.eval()
        from fairdeploy.lrf import replace_module

        ctx = self.context
        model = ctx.model
        # The head keeps the model's qualified names, but its containers are plain
        # modules: swap in the changed leaves only.
        head = processed.head
        assert head is not None
        for name, module in head.named_modules():
            leaf = not any(True for _ in module.children())
            if name and leaf and _differs(module, ctx.head, name):
                model = replace_module(model, name, module)
        return model.eval()

    def logits(self, what: Processed | nn.Module, split: str = "test") -> torch.Tensor:
        """Logits of a processed model (or a full model) on a split, float32 on the CPU.

        A processed head runs on the cached features; a whole model runs over the
        split's data (once per object and split)."""
        ctx = self.context
        if split not in ("train", "val", "test"):
            raise FairDeployError(f"split {split!r} is unknown: use train, val or test")
        if isinstance(what, Processed):
            memo = what.outputs
            if split not in memo:
                if what.head is not None and split in ctx.features:
                    memo[split] = logits_of(what.head, ctx.features[split].features)
                else:
                    memo[split] = self._run_model(self.model_of(what), split)
            return memo[split]
        return self._run_model(what, split)

    def _run_model(self, model: nn.Module, split: str) -> torch.Tensor:
        ctx = self.context
        return compute_features(
            model,
            ctx.splits[split],
            device=self.device,
            num_workers=self.recipe.data.num_workers,
            progress=self.progress,
            description=f"full model: {split} split",
        ).features

    def predictions(self, what: Processed | nn.Module, split: str = "test") -> np.ndarray:
        """Predicted class ids (argmax of :meth:`logits`)."""
        return self.logits(what, split).argmax(1).numpy()

    def evaluate(self, what: Processed | nn.Module, split: str = "test") -> GroupMetrics:
        """Group accuracy and fairness (:func:`~fairdeploy.metrics.group_metrics`) on a
        split, with the experiment's privileged group."""
        ctx = self.context
        pred = self.predictions(what, split)
        labels, groups = self.labels(split)
        return group_metrics(
            labels,
            pred,
            groups,
            privileged=ctx.privileged,
            num_classes=len(ctx.class_names),
            group_names=ctx.group_names,
        )

    def labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """True class ids and group ids of a split (in the order of :meth:`logits`)."""
        ctx = self.context
        if split in ctx.features:
            fs = ctx.features[split]
            return fs.targets.numpy(), fs.groups.numpy()
        ds = ctx.splits[split]
        return np.asarray(ds.targets), np.asarray(ds.groups)

    def test_inputs(
        self, n: int, split: str = "test"
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The first ``n`` samples of a split as a float input batch, labels and groups
        (decoded once per split and ``n`` up to ``export.verify_samples``, the exports'
        references; each call returns its own copies)."""
        ds = self.context.splits[split]
        if n > self.recipe.export.verify_samples:  # e.g. a whole split: not kept in memory
            return first_samples(ds, n)
        memo = self._inputs.get((split, n))
        if memo is None or memo[0] is not ds:
            memo = (ds, first_samples(ds, n))
            self._inputs[(split, n)] = memo
        x, labels, groups = memo[1]
        return x.clone(), labels.copy(), groups.copy()

    def exporter(self) -> Exporter:
        """A new :class:`~fairdeploy.export.Exporter` with the recipe's ``export:``
        settings (layout, dead-neuron elimination, exporter, opset, simplification,
        tolerances, the ``.verify.npz`` cap). A caller that exports several models holds
        one and passes it to :meth:`export`, so models of the same structure share one
        traced graph (``compare`` does, for its rows)."""
        from fairdeploy.export import Exporter, ExportOptions

        spec = self.recipe.export
        options = ExportOptions(
            sparse_layout=spec.sparse_layout,
            eliminate_dead=spec.eliminate_dead,
            simplify=spec.simplify,
            exporter=spec.exporter,
            opset=spec.opset,
            atol=spec.tolerances.atol,
            rtol=spec.tolerances.rtol,
        )
        return Exporter(options, reference_max_bytes=int(spec.verify_npz_max_mb * 1e6))

    def export(
        self,
        processed: Processed,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        samples: int | None = None,
        baseline: Mapping[str, int] | None = None,
        exporter: Exporter | None = None,
        defer: bool = False,
    ) -> ExportResult:
        """Export the processed model to ONNX with the recipe's ``export:`` settings.

        Writes ``path`` and ``<path stem>.verify.npz`` (the first ``samples`` test inputs
        — default ``export.verify_samples`` — with PyTorch's outputs, labels and groups;
        only the first of them that fit in ``export.verify_npz_max_mb``).
        When the method stores weights compactly (:meth:`Method.packing
        <fairdeploy.methods.Method.packing>`: FairPrune's pruned and FairQuantize's int8
        entries), the dense export is packed before it is written
        (:func:`~fairdeploy.export.pack_weights`, checked bit for bit): the model computes
        exactly what the dense export does, so the ``.verify.npz`` stays valid.
        ``baseline`` (:func:`~fairdeploy.export.onnx_sizes` of the vanilla export) puts
        the measured C.R. in the file's metadata in the same write. ``exporter``: the
        :meth:`exporter` to export with (default: a new one), so that models of the same
        structure exported through it share one traced graph. ``defer=True`` returns
        before the model file is written, leaving what :meth:`verify` repeats to the caller
        (see :meth:`fairdeploy.export.Exporter.export`; ``compare`` calls the result's
        ``finish`` and :meth:`verify` in a background thread, and exports again without
        deferring when they fail).
        Returns the :class:`~fairdeploy.export.ExportResult` (``packing`` holds the
        :class:`~fairdeploy.export.PackReport`, ``sizes`` and ``measured_cr`` the file's).
        """
        ref = self.reference(processed, samples)
        x = torch.from_numpy(ref.inputs)
        if exporter is None:
            exporter = self.exporter()
        return exporter.export(
            self.model_of(processed),
            x[:2],
            path,
            metadata=dict(metadata) if metadata is not None else self.metadata(processed),
            reference_inputs=x,
            reference_outputs=ref.outputs,
            labels=ref.labels,
            groups=ref.groups,
            packing=processed.plan.implementation.packing(processed.plan, processed) or None,
            baseline_sizes=baseline,
            defer=defer,
        )

    def reference(self, processed: Processed, samples: int | None = None) -> Any:
        """The verification reference of a processed model: the first ``samples`` test
        inputs (default ``export.verify_samples``), PyTorch's outputs, labels and groups,
        as a :class:`~fairdeploy.verification.Reference` (computed once per model)."""
        from fairdeploy.verification import Reference

        n = samples or self.recipe.export.verify_samples
        memo = self._references.get(id(processed))
        if memo is not None and memo[0] is processed and len(memo[1].inputs) == min(
            n, len(self.context.splits["test"])
        ):
            return memo[1]
        x, labels, groups = self.test_inputs(n)
        out = self.reference_outputs(processed, x)
        ref = Reference(
            inputs=x.numpy(),
            outputs=out.numpy(),
            labels=labels,
            groups=groups,
            source=f"the first {len(x)} test inputs (PyTorch outputs)",
        )
        self._references[id(processed)] = (processed, ref)
        return ref

    def reference_outputs(self, processed: Processed, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's outputs for the first ``len(x)`` test inputs ``x``: from the processed
        head on the cached trunk features (no second trunk pass) when the method changed
        only the head, else from the full processed model."""
        ctx = self.context
        if processed.head is not None:
            return logits_of(processed.head, ctx.features["test"].features[: len(x)])
        return logits_of(self.model_of(processed), x)

    def metadata(self, processed: Processed) -> dict[str, Any]:
        """The ONNX ``metadata_props`` of a processed model (DESIGN §5)."""
        from fairdeploy.compression import theoretical_cr

        ctx = self.context
        plan = processed.plan
        fairness = self.evaluate(processed, "test").to_dict()["fairness"]
        return {
            "producer": "fairdeploy",
            "version": __version__,
            "recipe_hash": _recipe_hash(self.recipe),
            "checkpoint_sha256": self.checkpoint_sha256,
            "method": plan.method,
            "plan": plan.to_dict(),
            "class_names": ctx.class_names,
            "group_names": ctx.group_names,
            "privileged": ctx.privileged_info["name"],
            "preprocessing": ctx.preprocessing,
            "theoretical_cr": theoretical_cr(ctx.model, plan),
            "fairness": {k: fairness[k] for k in ("eopp0", "eopp1", "eodd")}
            | {
                "convention": "mean over classes; EOdd halved",
                "split": "test",
                "samples": len(self.labels("test")[0]),
            },
        }

    def verify(self, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """:func:`fairdeploy.verify` of an exported model against its ``.verify.npz``,
        with the recipe's tolerances and the experiment's privileged group."""
        from fairdeploy.verification import verify

        return verify(path, **(self._verify_options() | kwargs))

    def verify_all(self, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """:meth:`verify` in every runtime of the recipe's ``export.verify_runtimes``: a
        :class:`~fairdeploy.verification.RuntimesResult`, truthy when all passed."""
        from fairdeploy.verification import verify_runtimes

        return verify_runtimes(path, self.recipe.export.verify_runtimes,
                               **(self._verify_options() | kwargs))

    def _verify_options(self) -> dict[str, Any]:
        tol = self.recipe.export.tolerances
        return {
            "atol": tol.atol,
            "rtol": tol.rtol,
            "min_argmax_agreement": tol.argmax_agreement,
            "privileged": self.context.privileged,
        }


# --------------------------------------------------------------------------- helpers


def logits_of(head: nn.Module, features: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The module's logits on a tensor of inputs, eval mode, without changing its mode."""
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            out = [head(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def first_samples(ds: Any, n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The first ``n`` items of a dataset as a float input batch, labels and groups."""
    xs, ys, gs = [], [], []
    for i in range(min(n, len(ds))):
        x, y, g = ds[i]
        xs.append(torch.as_tensor(x))
        ys.append(int(y))
        gs.append(int(g))
    if not xs:
        raise FairDeployError("the split is empty: there are no samples to export or verify")
    return torch.stack(xs).float(), np.asarray(ys), np.asarray(gs)


def state_dict_sha256(model: nn.Module) -> str:
    """A content hash of a model's parameters and buffers (names, dtypes, shapes, bytes):
    the cache key of an in-memory model, as a checkpoint's file hash is for a file."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _recipe_hash(recipe: Recipe) -> str:
    from fairdeploy.recipe import recipe_hash

    return recipe_hash(recipe)


def _choose_privileged(ctx: Context) -> tuple[int, dict[str, Any]]:
    """The privileged group: named in the recipe, or ``auto``: the group with the higher
    macro recall of the vanilla model on the validation split."""
    val = ctx.features["val"]
    pred = logits_of(ctx.head, val.features).argmax(1).numpy()
    named = ctx.recipe.sensitive.privileged
    names = ctx.group_names
    if named == "auto":
        priv = privileged_group(
            val.targets.numpy(), pred, val.groups.numpy(), num_classes=len(ctx.class_names)
        )
        how = "auto: higher macro recall of the vanilla model on the validation split"
    else:
        if named not in names:
            raise FairDeployError(
                f"sensitive.privileged: {named!r} is not a group; use auto or one of {names}"
            )
        priv = names.index(named)
        how = "named in the recipe"
    m = group_metrics(
        val.targets.numpy(),
        pred,
        val.groups.numpy(),
        privileged=priv,
        num_classes=len(ctx.class_names),
        group_names=names,
    )
    if named == "auto" and m.recall[0] == m.recall[1]:
        how = (
            "auto: the vanilla model's macro recall on the validation split is tied "
            f"({m.recall[0]:.4f}); the tie goes to the second group listed — name the "
            "privileged group in the recipe (sensitive.privileged)"
        )
    info = {
        "id": int(priv),
        "name": names[priv],
        "how": how,
        "val_recall": {names[g]: m.recall[g] for g in (0, 1)},
    }
    return int(priv), info


def _differs(module: nn.Module, head: nn.Module, name: str) -> bool:
    """Whether ``module`` (at ``name`` in a processed head) differs from the vanilla head's."""
    try:
        original = head.get_submodule(name)
    except AttributeError:
        return True
    if type(module) is not type(original):
        return True
    a, b = module.state_dict(), original.state_dict()
    return a.keys() != b.keys() or any(
        a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a
    )
