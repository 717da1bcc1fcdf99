"""The experiment's shared context: what every method receives and shares.

:class:`Context` holds the cut vanilla model, the cached trunk features and the keyed
services (:meth:`Context.svd`, :meth:`Context.hessians`, :meth:`Context.activations`)
that build every cache key in one place. It sits below :mod:`fairdeploy.methods`, which
types every ``apply(plan, ctx)`` with it, and below :mod:`fairdeploy.experiment`, which
builds it: one class, no interface copied beside it, and no import cycle.
:class:`ScoringSet` is one draw's per-group scoring samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fairdeploy.cache import FeatureCache, dataset_fingerprint
from fairdeploy.errors import FairDeployError
from fairdeploy.features import SPILL_SUPPORTED, FeatureSet, compute_features
from fairdeploy.lrf import FactorizedLinear, factorize
from fairdeploy.plan import AUTO_SAMPLES_PER_GROUP, SamplingSpec
from fairdeploy.scoring import scoring_indices

__all__ = ["Context", "HessianCompute", "ScoringSet"]


@dataclass(frozen=True)
class ScoringSet:
    """The per-group scoring sets of one draw, as cached trunk features.

    Attributes
    ----------
    features : FeatureSet
        Features, labels and groups of the scoring samples (group 0's set, then 1's).
    positions : dict
        Group id → positions of that group's samples in ``features``.
    indices : ndarray
        Positions of the samples in the training split, in ``features`` order.
    key : dict
        What identifies the draw (samples per group, seed, sizes), for cache keys.
    """

    features: FeatureSet
    positions: dict[int, np.ndarray]
    indices: np.ndarray
    key: dict[str, Any]

    @property
    def per_group(self) -> int:
        """Samples in the smaller group's set (all sets have this size unless every
        training sample of each group was taken)."""
        return min(len(p) for p in self.positions.values())

    @property
    def sizes(self) -> tuple[int, int]:
        """Samples in group 0's and group 1's set."""
        return len(self.positions[0]), len(self.positions[1])


#: ``compute(data, group_ids)`` of :meth:`Context.hessians`: per group id, name → tensor.
HessianCompute = Callable[[ScoringSet, tuple[int, int]], Mapping[int, Mapping[str, torch.Tensor]]]


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
        The experiment's :class:`~fairdeploy.recipe.Recipe` (typed ``Any`` here: the
        context sits below the recipe loader, which imports the methods).
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

    recipe: Any
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
        def compute(spill: Path | None = None) -> FeatureSet:
            return compute_features(
                self.trunk,
                dataset,
                device=self.device,
                num_workers=self.recipe.data.num_workers,
                progress=self.progress,
                description=f"trunk pass: {description}",
                spill=spill,
            )

        if self.cache is None:
            return compute(), False
        parts = {**self.cache_key, **key, "content": dataset_fingerprint(dataset)}
        # Through a file in the cache folder: the first pass holds no features in memory.
        return self.cache.get_or_compute(parts, compute, spill=SPILL_SUPPORTED)
