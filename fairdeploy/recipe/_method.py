"""``method:`` and ``compare:`` entries — what is done to the model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from fairdeploy.plan import LRF_METHODS, METHODS, LayerPlan, Plan
from fairdeploy.recipe._fields import (
    Fraction01,
    NonNegFloat,
    NonNegInt,
    PosInt,
    Seed,
    _fail,
    _Strict,
)

__all__ = ["DEFAULT_COMPARE", "LayerSpec", "MethodSpec", "ScoringSpec"]


#: Methods ``fairdeploy compare`` runs when a recipe has no ``compare`` list.
DEFAULT_COMPARE = ("vanilla", "truncated_svd", "slr_w", "slr_a", "fairlrf")
#: The paper's SLR-w / SLR-a setting (Tables 1 and 2).
_SLR_SR, _SLR_RR = 0.5, 0.5



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




def _derived_layer(lp: LayerSpec, method: str, beta: float) -> LayerSpec:
    """A compare entry's layer settings derived from the recipe's own method layer."""
    if method == "truncated_svd":
        sr, rr = 0.0, 0.0
    elif method in ("slr_w", "slr_a"):
        sr, rr = _SLR_SR, _SLR_RR
    else:  # fairlrf compared against another main method: keep that method's sr/rr
        sr, rr = lp.sr, lp.rr
    return LayerSpec(layer=lp.layer, rank=lp.rank, sr=sr, rr=rr, beta=beta)
