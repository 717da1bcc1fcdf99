"""The optimize pipeline (DESIGN §1), as steps on values.

``prepare`` loads the recipe's model and data, runs the frozen trunk once per split
(features entering the first target layer, optionally from the persisted cache) and
evaluates the vanilla model on them. ``process_head`` applies a :class:`~fairdeploy.Plan`
to the head alone (factorize, score, select, sparsify); ``evaluate`` scores a head on
cached features. Only export and its parity check run the full model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fairdeploy import __version__
from fairdeploy._probe import check_model_takes_inputs
from fairdeploy.cache import FeatureCache, dataset_fingerprint, file_sha256
from fairdeploy.errors import FairDeployError
from fairdeploy.features import FeatureSet, compute_features, layers_in_call_order, split_model
from fairdeploy.lrf import (
    FactorizedLinear,
    SelectionInputs,
    activation_abs_sums,
    factorize,
    following_activation,
    replace_module,
    select_rows_cols,
    sparsify,
)
from fairdeploy.metrics import GroupMetrics, group_metrics, privileged_group
from fairdeploy.plan import Plan
from fairdeploy.scoring import group_hessians, scoring_indices

__all__ = [
    "Prepared",
    "ProcessedHead",
    "evaluate",
    "predict_features",
    "prepare",
    "process_head",
    "processed_model",
]


@dataclass
class Prepared:
    """Everything the methods share: the vanilla model, the cut, cached features.

    Attributes
    ----------
    model : nn.Module
        The vanilla model, eval mode.
    first_layer : str
        The first target layer in execution order; the trunk/head cut is at its input.
    head : nn.Module
        The vanilla head (the model from ``first_layer`` on).
    features : dict
        ``"scoring"`` (balanced per-group scoring sets from the training split),
        ``"val"`` and ``"test"`` :class:`~fairdeploy.features.FeatureSet` s.
    scoring_groups : dict
        Group id → positions in ``features["scoring"]`` of that group's scoring set.
    privileged : int
        Id of the privileged group; the other one is group 0 of the FairLRF score.
    privileged_info : dict
        How the privileged group was chosen (``auto`` from the vanilla model's macro
        recall on the validation split, or named by the recipe), for the report.
    """

    recipe: Any
    checkpoint: Path
    checkpoint_sha256: str
    model: nn.Module
    first_layer: str
    head: nn.Module
    splits: dict[str, Any]
    features: dict[str, FeatureSet]
    scoring_groups: dict[int, np.ndarray]
    class_names: list[str]
    group_names: list[str]
    privileged: int
    privileged_info: dict[str, Any]
    cache_hits: dict[str, bool] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    cache: FeatureCache | None = None
    cache_key: dict[str, Any] = field(default_factory=dict)

    @property
    def unprivileged(self) -> int:
        """Id of the unprivileged group (group 0 of the FairLRF score)."""
        return 1 - self.privileged


@dataclass
class ProcessedHead:
    """A head after a plan was applied, with what the selection chose."""

    plan: Plan
    head: nn.Module
    selections: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def predict_features(
    head: nn.Module, features: torch.Tensor, *, batch_size: int = 1024
) -> np.ndarray:
    """Predicted class ids of ``head`` on cached features (eval mode, batched)."""
    return logits_of(head, features, batch_size=batch_size).argmax(1).numpy()


def logits_of(head: nn.Module, features: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The head's logits on cached features, eval mode, without changing its mode."""
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            out = [head(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(
    prepared: Prepared, head: nn.Module, *, split: str = "test"
) -> tuple[GroupMetrics, np.ndarray]:
    """Group metrics of ``head`` on a split's cached features, and its predictions."""
    fs = prepared.features[split]
    pred = predict_features(head, fs.features)
    metrics = group_metrics(
        fs.targets.numpy(),
        pred,
        fs.groups.numpy(),
        privileged=prepared.privileged,
        num_classes=len(prepared.class_names),
        group_names=prepared.group_names,
    )
    return metrics, pred


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise FairDeployError if a plan layer is missing, not Linear, or its rank too large."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for lp in plan.layers:
        try:
            mod = model.get_submodule(lp.layer)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            found = "not found" if mod is None else f"a {type(mod).__name__}"
            raise FairDeployError(
                f"method.layers: layer {lp.layer!r} is {found} in the model; the nn.Linear "
                f"layers are: {', '.join(linear) or '(none)'}"
            )
        limit = min(mod.in_features, mod.out_features)
        if lp.rank > limit:
            raise FairDeployError(
                f"method.layers: rank {lp.rank} for layer {lp.layer!r} "
                f"({mod.in_features}→{mod.out_features}) is too large: use 1 ≤ rank ≤ {limit}"
            )


def prepare(
    recipe: Any,
    model: nn.Module,
    splits: Mapping[str, Any],
    checkpoint: str | Path,
    *,
    plan: Plan,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Prepared:
    """Cut the model at the first target layer and cache features for scoring, val, test.

    Parameters
    ----------
    recipe : fairdeploy.recipe.Recipe
        The resolved recipe (data, sensitive attribute, scoring settings).
    model : nn.Module
        The vanilla model (not modified).
    splits : mapping
        ``train``, ``val`` and ``test`` datasets yielding ``(x, y, group)`` with
        ``.targets``, ``.groups``, ``.class_names`` and ``.group_names``.
    checkpoint : path
        The checkpoint file; its content hash keys the persisted feature cache.
    plan : Plan
        Its layers decide the cut (the first one the forward pass reaches).
    cache_dir : path, optional
        Persist features there (keyed by checkpoint, data, preprocessing, split and
        layer); None computes them in memory only.
    """
    model = copy.deepcopy(model).eval()
    layers = [lp.layer for lp in plan.layers]
    test_ds = splits["test"]
    if not layers:
        raise FairDeployError("the plan has no target layers: name at least one in method.layers")
    check_plan(model, plan)
    if not len(test_ds):
        raise FairDeployError("the test split is empty: check data.split")
    check_model_takes_inputs(
        model, test_ds, what="the test split", num_classes=recipe.model.num_classes
    )
    first = layers_in_call_order(model, layers)[0]
    trunk, head = split_model(model, first)

    scoring_spec = recipe.method.scoring
    train_groups = np.asarray(splits["train"].groups)
    idx = scoring_indices(
        train_groups, per_group=scoring_spec.samples_per_group, seed=scoring_spec.seed
    )
    order = np.concatenate([idx[0], idx[1]])
    idx_key = {"per_group": scoring_spec.samples_per_group, "seed": scoring_spec.seed}
    scoring_groups = {0: np.arange(len(idx[0])), 1: np.arange(len(idx[0]), len(order))}

    sha = file_sha256(checkpoint)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    # num_workers changes how the data is read, not what it is.
    data_cfg = recipe.data.model_dump(mode="json", exclude={"num_workers"})
    sensitive_cfg = recipe.sensitive.model_dump(mode="json")
    features: dict[str, FeatureSet] = {}
    hits: dict[str, bool] = {}
    jobs = {
        "scoring": (splits["train"].subset(order), order.tolist()),
        "val": (splits["val"], None),
        "test": (test_ds, None),
    }
    # What every cached value depends on. The data's content is fingerprinted per split,
    # so data regenerated at the same path is not served from a stale cache.
    base_key = {
        "fairdeploy": __version__,
        "torch": torch.__version__,
        "device": str(device),
        "checkpoint": sha,
        "arch": recipe.model.model_dump(mode="json"),
        "data": data_cfg,
        "sensitive": sensitive_cfg,
        "cut": first,
    }
    for name, (ds, subset) in jobs.items():

        def compute(ds: Any = ds, name: str = name) -> FeatureSet:
            return compute_features(
                trunk, ds, device=device, progress=progress, description=f"trunk pass ({name})"
            )

        if cache is None:
            features[name], hits[name] = compute(), False
        else:
            parts = {
                **base_key,
                "split": name,
                "subset": subset,
                "content": dataset_fingerprint(ds),
            }
            features[name], hits[name] = cache.get_or_compute(parts, compute)

    class_names = list(getattr(test_ds, "class_names", None) or range(recipe.model.num_classes))
    class_names = [str(c) for c in class_names]
    group_names = [str(g) for g in getattr(test_ds, "group_names", ("group 0", "group 1"))]
    if len(group_names) != 2:
        raise FairDeployError(
            f"sensitive.groups defines {len(group_names)} groups ({group_names}); FairLRF and "
            "its metrics need exactly two: merge the values into two groups"
        )

    val = features["val"]
    val_pred = predict_features(head, val.features)
    named = recipe.sensitive.privileged
    if named == "auto":
        priv = privileged_group(
            val.targets.numpy(), val_pred, val.groups.numpy(), num_classes=len(class_names)
        )
        how = "auto: higher macro recall of the vanilla model on the validation split"
    else:
        if named not in group_names:
            raise FairDeployError(
                f"sensitive.privileged: {named!r} is not a group; use auto or one of {group_names}"
            )
        priv = group_names.index(named)
        how = "named in the recipe"
    val_metrics = group_metrics(
        val.targets.numpy(),
        val_pred,
        val.groups.numpy(),
        privileged=priv,
        num_classes=len(class_names),
        group_names=group_names,
    )
    if named == "auto" and val_metrics.recall[0] == val_metrics.recall[1]:
        how = (
            "auto: the vanilla model's macro recall on the validation split is tied "
            f"({val_metrics.recall[0]:.4f}); the tie goes to the second group listed — "
            "name the privileged group in the recipe (sensitive.privileged)"
        )
    info = {
        "id": int(priv),
        "name": group_names[priv],
        "how": how,
        "val_recall": {group_names[g]: val_metrics.recall[g] for g in (0, 1)},
    }
    return Prepared(
        recipe=recipe,
        checkpoint=Path(checkpoint),
        checkpoint_sha256=sha,
        model=model,
        first_layer=first,
        head=head,
        splits=dict(splits),
        features=features,
        scoring_groups=scoring_groups,
        class_names=class_names,
        group_names=group_names,
        privileged=int(priv),
        privileged_info=info,
        cache_hits=hits,
        preprocessing=getattr(test_ds, "preprocessing", None),
        cache=cache,
        cache_key={
            **base_key,
            "scoring": idx_key,
            "content": {n: dataset_fingerprint(d) for n, d in splits.items()},
        },
    )


def process_head(prepared: Prepared, plan: Plan, *, seed: int = 0) -> ProcessedHead:
    """Apply ``plan`` to the vanilla head: factorize, then score, select and sparsify.

    ``vanilla`` returns a copy of the head. LRF methods factorize every plan layer by
    truncated SVD; the sparse methods then select, layer by layer in plan order, the
    rows of U / columns of V to sparsify: ``slr_w`` from the original weight,
    ``slr_a`` from activation sums over the scoring sets, ``fairlrf`` from per-group
    Hessian diagonals on the scoring sets of the head as processed so far.
    """
    if plan.method == "vanilla":
        return ProcessedHead(plan, copy.deepcopy(prepared.head))
    if not plan.is_lrf:
        raise FairDeployError(
            f"method {plan.method!r} is not available in optimize yet: use one of "
            "vanilla, truncated_svd, slr_w, slr_a, fairlrf"
        )
    spec = prepared.recipe.method.scoring
    scoring = prepared.features["scoring"]
    head = _factorized_head(prepared, plan, seed=seed)
    selections: dict[str, dict[str, list[int]]] = {}
    if plan.method == "truncated_svd":
        return ProcessedHead(plan, head)
    for lp in plan.layers:
        if lp.sr == 0:
            continue
        layer = head.get_submodule(lp.layer)
        assert isinstance(layer, FactorizedLinear)
        inputs: dict[str, Any] = {"beta": lp.beta, "row_score": spec.row_score}
        if plan.method == "slr_w":
            inputs["weight"] = prepared.head.get_submodule(lp.layer).weight.detach()
        elif plan.method == "slr_a":
            # The head keeps the model's qualified names but not its containers, so
            # find the activation after the layer in the full model.
            inputs["input_abs_sum"], inputs["output_abs_sum"] = activation_abs_sums(
                prepared.head,
                lp.layer,
                scoring.features.split(1024),
                activation=following_activation(prepared.model, lp.layer),
            )
        elif plan.method == "fairlrf":
            # Group ids in the data → 0 (unprivileged) and 1 (privileged) of the score.
            ids = (prepared.unprivileged, prepared.privileged)

            def hessians(
                layer_name: str = lp.layer, head: nn.Module = head, ids: tuple = ids
            ) -> dict[str, torch.Tensor]:
                h = group_hessians(
                    head,
                    layer_name,
                    scoring.features,
                    scoring.targets,
                    scoring.groups,
                    group_ids=ids,
                    estimator=spec.estimator,
                    batch_size=spec.batch_size,
                    seed=spec.seed,
                )
                return {f"{g}.{p}": t for g, d in h.items() for p, t in d.items()}

            # The head's state so far: every layer's rank, the earlier layers' settings and
            # selections (not this layer's sr/rr/β: a sweep over them reuses the Hessians).
            earlier = [p for p in plan.layers[: plan.layers.index(lp)]]
            state = {"settings": [dataclasses.asdict(p) for p in earlier], "rows": selections}
            key = {
                "ranks": [(p.layer, p.rank) for p in plan.layers],
                "before": hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest(),
                "method": plan.method,
                "layer": lp.layer,
                "estimator": spec.estimator,
                "batch_size": spec.batch_size,
                "seed": spec.seed,
                "svd_seed": seed,
            }
            h = _cached(prepared, "hessian", key, hessians)
            inputs["hessians"] = {
                role: {p: h[f"{g}.{p}"] for p in ("U", "V")} for role, g in enumerate(ids)
            }
        rows, cols = select_rows_cols(
            plan.method, layer, sr=lp.sr, rr=lp.rr, inputs=SelectionInputs(**inputs)
        )
        head = replace_module(head, lp.layer, sparsify(layer, lp.sr, lp.rr, rows, cols))
        selections[lp.layer] = {"rows": rows.tolist(), "cols": cols.tolist()}
    return ProcessedHead(plan, head, selections)


def _cached(
    prepared: Prepared, kind: str, key: dict[str, Any], compute: Any
) -> dict[str, torch.Tensor]:
    """``compute()`` through the persisted cache (keyed by checkpoint, data and cut too)."""
    if prepared.cache is None:
        return compute()
    parts = {**prepared.cache_key, **key}
    return prepared.cache.get_or_compute_tensors(kind, parts, compute)[0]


def _factorized_head(prepared: Prepared, plan: Plan, *, seed: int) -> nn.Module:
    """A copy of the vanilla head with every plan layer replaced by its truncated SVD.

    The factors are cached: a sweep over (sr, rr, β) at one rank decomposes once.
    """
    head = copy.deepcopy(prepared.head)
    for lp in plan.layers:
        linear = prepared.head.get_submodule(lp.layer)

        def svd(linear: nn.Module = linear, rank: int = lp.rank) -> dict[str, torch.Tensor]:
            f = factorize(linear, rank, seed=seed)
            return {"U": f.U.detach(), "S": f.S.detach(), "V": f.V.detach()}

        try:
            t = _cached(prepared, "svd", {"layer": lp.layer, "rank": lp.rank, "seed": seed}, svd)
        except FairDeployError as exc:
            raise FairDeployError(f"layer {lp.layer!r}: {exc}") from None
        bias = None if linear.bias is None else linear.bias.detach()
        head.set_submodule(lp.layer, FactorizedLinear(t["U"], t["S"], t["V"], bias))
    return head


def processed_model(prepared: Prepared, processed: ProcessedHead) -> nn.Module:
    """The full model with the processed head's target layers swapped in (a copy)."""
    model = prepared.model
    for lp in processed.plan.layers:
        model = replace_module(model, lp.layer, processed.head.get_submodule(lp.layer))
    return model.eval()
