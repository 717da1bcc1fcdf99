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
import os
from collections.abc import Iterable, Mapping, Sequence
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
from fairdeploy.context import Context, HessianCompute, ScoringSet
from fairdeploy.errors import FairDeployError
from fairdeploy.features import compute_features, layers_in_call_order, split_model
from fairdeploy.lrf import linear_layers
from fairdeploy.methods import Processed
from fairdeploy.metrics import GroupMetrics, group_metrics, privileged_group
from fairdeploy.plan import Plan, SamplingSpec
from fairdeploy.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Context", "Experiment", "HessianCompute", "ScoringSet"]


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
    """A content hash of a model's parameters and buffers (names, dtypes, shapes, bytes) and
    of any module's extra state (FactorizedLinear's ``keep``; nested dicts, lists, numbers,
    strings, tensors and arrays by their bytes): the cache key of an in-memory model, as a
    checkpoint's file hash is for a file.

    Raises
    ------
    FairDeployError
        Extra state of another type (it has no content hash: save the model to a
        checkpoint and give that file).
    """
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        _hash_value(h, name, value)
    return h.hexdigest()


def _hash_value(h: Any, name: str, value: Any) -> None:
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        t = torch.as_tensor(value).detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(f"{name}\0dict\0{len(value)}\n".encode())
        for k in sorted(value, key=repr):
            _hash_value(h, f"{name}.{k}", value[k])
    elif isinstance(value, list | tuple):
        h.update(f"{name}\0{type(value).__name__}\0{len(value)}\n".encode())
        for i, v in enumerate(value):
            _hash_value(h, f"{name}[{i}]", v)
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        h.update(f"{name}\0{type(value).__name__}\0{value!r}\n".encode())
    else:
        raise FairDeployError(
            f"the model's state {name!r} holds a value of type {type(value).__name__}, which "
            "has no content hash for the cache key: save the model to a checkpoint and give "
            "that file"
        )


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
