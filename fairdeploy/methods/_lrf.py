"""What the low-rank methods share: target layers, the factorized head, accounting.

Truncated SVD, SLR-w, SLR-a and FairLRF all replace each target ``nn.Linear`` by its
truncated SVD (factors cached per layer and rank); the sparse ones then select, layer
by layer in plan order, rows of U and columns of V to sparsify. Accounting (DESIGN §4,
the paper's): a factorized layer counts ``Din·k + k·k + k·Dout`` (S as a k×k matrix) plus
its bias, minus every entry the sparsification zeroes:
``(⌊sr·Din⌋ + ⌊sr·Dout⌋) · (k − ⌊rr·k⌋)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import field_serializer, field_validator, model_validator
from torch import nn

from fairdeploy._schema import schema_error
from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import (
    FactorizedLinear,
    SelectionInputs,
    break_even_rank,
    linear_layers,
    select_rows_cols,
    sparsify,
)
from fairdeploy.lrf._apply import _linear_or_error
from fairdeploy.methods._base import Method, Processed, count_parameters
from fairdeploy.plan import LayerPlan, Plan, kept_entries, num_selected

if TYPE_CHECKING:
    from fairdeploy.context import Context

__all__ = ["LowRankMethod", "LowRankPlan", "SLRMethod", "SparseLowRankMethod", "SparsePlan"]


class LowRankPlan(Plan):
    """A plan that factorizes ``layers`` (truncated SVD at each layer's rank)."""

    layers: tuple[LayerPlan, ...]

    # Which LayerPlan fields the method reads besides layer and rank.
    _layer_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _layers_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "layers" not in data:
            raise schema_error(
                "fd_layers_required",
                "layers: required for {name} (list the target nn.Linear layers, e.g. "
                "[{{layer: classifier.3, rank: 64}}])",
                {"name": data.get("method", data.get("name"))},
            )
        return data

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_as_dicts(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [
                v.model_dump(exclude_defaults=True) | {"layer": v.layer, "rank": v.rank}
                if isinstance(v, LayerPlan)
                else v
                for v in value
            ]
        return value

    @field_serializer("layers")
    def _dump_layers(self, layers: tuple[LayerPlan, ...]) -> list[dict[str, Any]]:
        # Only the keys the method reads: a resolved recipe lists nothing it ignores.
        keys = ("layer", "rank", *self._layer_keys)
        return [{k: getattr(lp, k) for k in keys} for lp in layers]

    @model_validator(mode="after")
    def _check_layers(self) -> LowRankPlan:
        if not self.layers:
            raise schema_error(
                "fd_no_layers",
                "layers: [] is not allowed ({name} needs at least one target layer)",
                {"name": self.method},
            )
        names = [lp.layer for lp in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise schema_error(
                "fd_dup_layer",
                "layers: {layer!r} is listed twice (list each layer once)",
                {"layer": dupes[0]},
            )
        defaults = {"sr": 0.0, "rr": 0.0, "beta": None}
        for i, lp in enumerate(self.layers):
            for key, default in defaults.items():
                value = getattr(lp, key)
                if key not in self._layer_keys and value != default:
                    readers = {"sr": "slr_w, slr_a and fairlrf do",
                               "rr": "slr_w, slr_a and fairlrf do", "beta": "fairlrf does"}[key]
                    raise schema_error(
                        "fd_layer_key_unused",
                        "layers[{i}].{key}: {value} is not allowed for {name} (it does not read "
                        "{key}; {readers})",
                        {"i": i, "key": key, "value": value, "name": self.method,
                         "readers": readers},
                    )
        return self


class SparsePlan(LowRankPlan):
    """A low-rank plan whose layers also select rows/columns to sparsify (sr, rr)."""

    _layer_keys: ClassVar[tuple[str, ...]] = ("sr", "rr")


LP = TypeVar("LP", bound=LowRankPlan)
SP = TypeVar("SP", bound=SparsePlan)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """The plan's target layer, or one line naming the recipe key and the model's Linears."""
    try:
        return _linear_or_error(model, name)
    except FairDeployError as exc:
        raise FairDeployError(f"method.layers: {exc}") from None


class LowRankMethod(Method[LP]):
    """Truncated SVD of every target layer; the base of the sparse methods."""

    factorizes: ClassVar[bool] = True
    #: Whether rows/columns are sparsified after the SVD (the layer table counts them).
    sparsifies: ClassVar[bool] = False

    def target_layers(self, plan: LP) -> tuple[str, ...]:
        return tuple(lp.layer for lp in plan.layers)

    def ranks(self, plan: LP) -> tuple[tuple[str, int], ...]:
        return tuple((lp.layer, lp.rank) for lp in plan.layers)

    def derive_layers(self, main: Plan, given: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        layers = getattr(main, "layers", None)
        if not layers or not all(isinstance(lp, LayerPlan) for lp in layers):
            raise FairDeployError(
                f"layers: required for {self.name} because the main method {main.method!r} "
                "lists no low-rank layers (give each layer and its rank)"
            )
        return [self.derived_layer(lp, main, given) for lp in layers]

    def derived_layer(
        self, lp: LayerPlan, main: Plan, given: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One layer of a compare entry derived from the main method's layer ``lp``."""
        if main.method == self.name:
            out = lp.model_dump()
            if "beta" in given:
                out["beta"] = None  # the entry's own β, not the main method's
            return out
        return {"layer": lp.layer, "rank": lp.rank}

    def example(self, model: nn.Module) -> Plan:
        """Rank 4 (or less) on the model's first Linear layer; sr 0.25, rr 0.5 if sparse."""
        name = linear_layers(model)[0]
        linear = model.get_submodule(name)
        layer = {"layer": name, "rank": min(4, linear.in_features, linear.out_features)}
        if self.sparsifies:
            layer |= {"sr": 0.25, "rr": 0.5}
        return self.plan_class(method=self.name, layers=[layer])

    def check(self, plan: LP, model: nn.Module) -> None:
        for lp in plan.layers:
            mod = _linear(model, lp.layer)
            limit = min(mod.in_features, mod.out_features)
            if lp.rank > limit:
                raise FairDeployError(
                    f"method.layers: rank {lp.rank} for layer {lp.layer!r} "
                    f"({mod.in_features}→{mod.out_features}) is too large: use 1 ≤ rank ≤ {limit}"
                )

    def warnings(self, plan: LP, model: nn.Module) -> list[str]:
        out = []
        for lp in plan.layers:
            mod = _linear(model, lp.layer)
            even = break_even_rank(mod.in_features, mod.out_features)
            if lp.rank > even:
                out.append(
                    f"layer {lp.layer}: rank {lp.rank} is above the break-even rank {even:.0f} of "
                    f"a {mod.in_features}×{mod.out_features} layer: the factorized layer is "
                    "larger than the dense one (theoretical C.R. below 1 for this layer)"
                )
        return out

    def describe(self, plan: LP) -> str:
        layers = plan.layers
        parts = [self.describe_layer(lp) for lp in layers]
        if len(layers) > 1:
            parts = [f"{lp.layer}: {part}" for lp, part in zip(layers, parts, strict=True)]
        return f"{self.label} ({'; '.join(parts)})"

    def describe_layer(self, lp: LayerPlan) -> str:
        """One layer's settings in a table label."""
        return f"k={lp.rank}"

    # ------------------------------------------------------------------ doing it

    def apply(self, plan: LP, ctx: Context) -> Processed:
        return Processed(plan, head=self.factorized_head(plan, ctx))

    def factorized_head(self, plan: LP, ctx: Context) -> nn.Module:
        """A copy of the vanilla head with every target layer replaced by its truncated
        SVD (factors from the experiment's cache: a sweep decomposes once per rank)."""
        layers = plan.layers
        factorized = {lp.layer: ctx.factorized(lp.layer, lp.rank) for lp in layers}
        # Copy the head without the dense layers being replaced (4096×4096 is 64 MB: a
        # sweep pays this copy once per point).
        memo = {id(ctx.head.get_submodule(name)): f for name, f in factorized.items()}
        head = copy.deepcopy(ctx.head, memo=memo)
        for name, f in factorized.items():
            head.set_submodule(name, f)
        return head

    # ------------------------------------------------------------------ accounting

    def layer_table(self, plan: LP, model: nn.Module) -> list[dict[str, Any]]:
        """Per target layer: Din, Dout, k, rows/cols sparsified, entries kept per
        row/col, parameters before (dense weight + bias), after (paper: S as k×k) and
        stored (S as k values, what an exported graph holds)."""
        self.check(plan, model)
        return [self._layer_row(model, lp) for lp in plan.layers]

    def _layer_row(self, model: nn.Module, lp: LayerPlan) -> dict[str, Any]:
        linear = _linear(model, lp.layer)
        din, dout, k = linear.in_features, linear.out_features, lp.rank
        bias = 0 if linear.bias is None else linear.bias.numel()
        if self.sparsifies:
            rows, cols = num_selected(lp.sr, din), num_selected(lp.sr, dout)
            keep = kept_entries(lp.rr, k)
        else:
            rows, cols, keep = 0, 0, k
        zeroed = (rows + cols) * (k - keep)
        factors = din * k + k * dout + bias - zeroed
        return {
            "name": lp.layer,
            "din": din,
            "dout": dout,
            "k": k,
            "rows_sparsified": rows,
            "cols_sparsified": cols,
            "keep": keep,
            "params_before": din * dout + bias,
            "params_after": factors + k * k,
            "params_stored": factors + k,
        }

    def theoretical_cr(self, plan: LP, model: nn.Module) -> float:
        total = count_parameters(model)
        rows = self.layer_table(plan, model)
        return total / (total - sum(r["params_before"] - r["params_after"] for r in rows))

    def stored_parameters(self, plan: LP, model: nn.Module) -> int:
        rows = self.layer_table(plan, model)
        return count_parameters(model) - sum(r["params_before"] - r["params_stored"] for r in rows)


class SparseLowRankMethod(LowRankMethod[SP]):
    """A truncated SVD whose target layers then lose their lowest-scoring rows of U and
    columns of V (``sr``, ``rr``), scored by the selection strategy ``strategy``."""

    sparsifies: ClassVar[bool] = True
    #: The selection strategy of :mod:`fairdeploy.lrf` that scores rows and columns. Unset,
    #: it is the name of the first class that names itself (FairLRF's ``fairlrf``), so a
    #: subclass registered under another name keeps scoring as its parent does.
    strategy: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.strategy is None and "name" in cls.__dict__:
            cls.strategy = cls.name
    #: The paper's sr/rr for this method when a compare entry derives its layers.
    paper_sr_rr: ClassVar[tuple[float, float] | None] = None

    def derived_layer(
        self, lp: LayerPlan, main: Plan, given: Mapping[str, Any]
    ) -> dict[str, Any]:
        if main.method == self.name:
            return super().derived_layer(lp, main, given)
        if self.paper_sr_rr is not None:
            sr, rr = self.paper_sr_rr
        else:  # compared against another main method: keep that method's sr/rr
            sr, rr = lp.sr, lp.rr
        return {"layer": lp.layer, "rank": lp.rank, "sr": sr, "rr": rr}

    def describe_layer(self, lp: LayerPlan) -> str:
        return f"k={lp.rank}, sr={lp.sr:g}, rr={lp.rr:g}"

    def apply(self, plan: SP, ctx: Context) -> Processed:
        head = self.factorized_head(plan, ctx)
        selections: dict[str, dict[str, list[int]]] = {}
        for i, lp in enumerate(plan.layers):
            if lp.sr == 0:
                continue
            layer = head.get_submodule(lp.layer)
            assert isinstance(layer, FactorizedLinear)
            inputs = self.selection_inputs(plan, ctx, head, i, selections)
            rows, cols = select_rows_cols(
                self.strategy or self.name, layer, sr=lp.sr, rr=lp.rr, inputs=inputs
            )
            # ``head`` is this call's own copy (factorized_head): replaced in place.
            head.set_submodule(lp.layer, sparsify(layer, lp.sr, lp.rr, rows, cols))
            selections[lp.layer] = {"rows": rows.tolist(), "cols": cols.tolist()}
        return Processed(plan, head=head, selections=selections)

    def selection_inputs(
        self,
        plan: SP,
        ctx: Context,
        head: nn.Module,
        index: int,
        selections: Mapping[str, Mapping[str, list[int]]],
    ) -> SelectionInputs:
        """What the strategy reads to score layer ``plan.layers[index]``.

        ``head`` is the head as processed so far (every target layer factorized, the
        earlier ones already sparsified); ``selections`` what the earlier layers chose.
        Which state a method scores is its own decision, stated in its docstring. By
        default the VANILLA model (:meth:`vanilla_inputs`: the original weights, the
        trained network's activations), as SLR-w and SLR-a do after their paper, so a
        layer's selection does not depend on the layers listed before it; FairLRF
        overrides this to score ``head``."""
        return self.vanilla_inputs(plan, ctx, plan.layers[index].layer)

    def vanilla_inputs(self, plan: SP, ctx: Context, layer: str) -> SelectionInputs:
        """What the strategy reads to score ``layer``, from the vanilla model."""
        raise NotImplementedError


class SLRMethod(SparseLowRankMethod[SP]):
    """SLR (Yang et al.): SLR-w and SLR-a, scored on the vanilla model (the default
    :meth:`~SparseLowRankMethod.selection_inputs`). Compare entries derived from another
    main method use the paper's sr = rr = 0.5; SLR rows are in ``compare`` by default."""

    paper_sr_rr: ClassVar[tuple[float, float] | None] = (0.5, 0.5)
    default_compare: ClassVar[bool] = True
