"""Dead-neuron elimination: what a whole zeroed row of U or column of V leaves dead.

With ``rr = 0`` (the paper's Table 2 setting) a sparsified row i of U is zero whole, so
the factorized layer never reads its input feature i; a sparsified column j of V is zero
whole, so its output j is the constant ``b_j``. Where the layer's neighbour is a Linear
joined to it by elementwise operations only (:class:`fairdeploy.structure.Link`: no
fan-out, each layer called once), both can go from the deployed graph, exactly:

- input i: output neuron i of the Linear before it (its weight row and bias entry), the
  matching entries of any per-feature module in between (PReLU weights, BatchNorm1d
  statistics) and row i of U are removed;
- output j: the constant ``c_j = φ(b_j)`` after the elementwise operations φ is folded
  into the next Linear's bias (``b' = b + W[:, j] c_j``), and column j of V, ``b_j``, the
  per-feature entries in between and input column j of the next Linear are removed.

Between two factorized layers both happen at once on the union of the two sets. The
outputs of the model keep their number (a last layer's constant outputs stay, from the
bias) and so does its input: a first layer's dead inputs are dropped at its input with a
Slice (when they form one range) or a Gather, in the ``blocks`` layout.

:func:`plan_elimination` decides, from the structure alone, which junctions can be
eliminated; the export applies the plan to its private copy (:func:`apply_elimination`)
and :func:`deployed_params` counts the result from shapes (for ``--dry-run``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.structure import Link, ModelStructure, analyze_structure

__all__ = ["DeployedLayer", "DeployedParams", "deployed_params"]

#: The two ways to store a structured-sparse factor (``export.sparse_layout``).
SPARSE_LAYOUTS = ("blocks", "zeros")


@dataclass(frozen=True)
class LayerSpec:
    """A factorized layer as the elimination sees it: shapes and sparsity counts."""

    name: str
    din: int
    dout: int
    rank: int
    keep: int
    rows: int
    cols: int
    bias: bool

    @property
    def sparse(self) -> bool:
        """Sparsified rows/columns hold zeros (keep < k)."""
        return self.keep < self.rank

    @property
    def dead_inputs(self) -> bool:
        """Whole rows of U are zero: the layer ignores those inputs."""
        return self.keep == 0 and self.rows > 0

    @property
    def constant_outputs(self) -> bool:
        """Whole columns of V are zero: those outputs are the bias."""
        return self.keep == 0 and self.cols > 0


@dataclass(frozen=True, eq=False)
class Junction:
    """Two layers joined by elementwise operations, with features to remove between.

    ``dead_from`` is the consumer when it ignores the inputs its sparsified rows name;
    ``const_from`` the producer when its sparsified columns are constants.
    """

    producer: str
    consumer: str
    link: Link
    dead_from: str | None = None
    const_from: str | None = None


@dataclass(frozen=True)
class EliminationPlan:
    """Which junctions are eliminated, and why the other dead sides are not."""

    junctions: tuple[Junction, ...] = ()
    refused_inputs: dict[str, str] = field(default_factory=dict)
    refused_outputs: dict[str, str] = field(default_factory=dict)


def plan_elimination(
    structure: ModelStructure | None, specs: Mapping[str, LayerSpec], untraced: str = ""
) -> EliminationPlan:
    """Decide, from the structure and the sparsity counts, what can be eliminated.

    Parameters
    ----------
    structure : ModelStructure or None
        The analysis of the model (None when it could not be traced; ``untraced`` says
        why).
    specs : mapping of str to LayerSpec
        The factorized layers.
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    refused_in: dict[str, str] = {}
    refused_out: dict[str, str] = {}
    for name, spec in specs.items():
        for side, dead, count, width in (
            ("input", spec.dead_inputs, spec.rows, spec.din),
            ("output", spec.constant_outputs, spec.cols, spec.dout),
        ):
            if not dead:
                continue
            refused = refused_in if side == "input" else refused_out
            if structure is None:
                refused[name] = untraced or "the model could not be traced"
                continue
            if count >= width:
                refused[name] = f"every {side} feature is sparsified (sr = 1)"
                continue
            link = structure.preceding(name) if side == "input" else structure.following(name)
            if link.neighbour is None:
                refused[name] = link.reason
                continue
            pair = (link.neighbour, name) if side == "input" else (name, link.neighbour)
            entry = found.setdefault(pair, {"link": link})
            entry["dead_from" if side == "input" else "const_from"] = name
    order = {} if structure is None else {p: structure.call_order(p[0]) for p in found}
    junctions = tuple(
        Junction(
            producer=p,
            consumer=q,
            link=found[(p, q)]["link"],
            dead_from=found[(p, q)].get("dead_from"),
            const_from=found[(p, q)].get("const_from"),
        )
        for p, q in sorted(found, key=lambda pq: order[pq])
    )
    return EliminationPlan(junctions, refused_in, refused_out)


def needs_bias(junction: Junction, producer_has_bias: bool) -> bool:
    """Whether folding the producer's constant outputs can give the consumer a non-zero
    bias: they are the producer's bias (or 0 without one) after the elementwise steps,
    so only a producer without bias and steps that keep 0 at 0 give exactly zero."""
    return not (not producer_has_bias and junction.link.zero_to_zero)


# --------------------------------------------------------------------------- applying


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    assert isinstance(module, FactorizedLinear)
    return module.out_features if side == "out" else module.in_features


def _remap(indices: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """``indices`` (into ``range(width)``) that survive, renumbered after removal."""
    position = torch.full((width,), -1, dtype=torch.long)
    position[keep] = torch.arange(keep.numel())
    new = position[indices.long().cpu()]
    return new[new >= 0].to(indices.device)


def _keep_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Remove the output features not in ``keep`` (in place, on the export copy)."""
    width = _width(module, "out")
    dev_keep = keep.to(next(module.parameters()).device)
    if isinstance(module, nn.Linear):
        module.weight = nn.Parameter(module.weight.detach()[dev_keep].clone())
        module.out_features = int(keep.numel())
    else:
        assert isinstance(module, FactorizedLinear)
        module.V = nn.Parameter(module.V.detach()[:, dev_keep].clone())
        module.sparse_cols = _remap(module.sparse_cols, keep, width)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach()[dev_keep].clone())


def _keep_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Remove the input features not in ``keep`` (in place, on the export copy)."""
    width = _width(module, "in")
    dev_keep = keep.to(next(module.parameters()).device)
    if isinstance(module, nn.Linear):
        module.weight = nn.Parameter(module.weight.detach()[:, dev_keep].clone())
        module.in_features = int(keep.numel())
    else:
        assert isinstance(module, FactorizedLinear)
        module.U = nn.Parameter(module.U.detach()[dev_keep].clone())
        module.sparse_rows = _remap(module.sparse_rows, keep, width)


def _keep_features(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the features ``keep`` of a per-feature module (PReLU, BatchNorm1d)."""
    if isinstance(module, nn.PReLU):
        module.weight = nn.Parameter(module.weight.detach()[keep.to(module.weight.device)].clone())
        module.num_parameters = int(keep.numel())
    elif isinstance(module, nn.BatchNorm1d):
        dev = keep.to(module.running_mean.device)  # type: ignore[union-attr]
        module.running_mean = module.running_mean[dev].clone()  # type: ignore[index]
        module.running_var = module.running_var[dev].clone()  # type: ignore[index]
        if module.weight is not None:
            module.weight = nn.Parameter(module.weight.detach()[dev].clone())
            module.bias = nn.Parameter(module.bias.detach()[dev].clone())
        module.num_features = int(keep.numel())
    else:  # the structure table marks only these two as having per-feature parameters
        raise RuntimeError(f"cannot select features of {type(module).__name__}")


def _dense_columns(module: nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of the (Dout, Din) weight the module computes, in float64."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()[:, cols].double()
    assert isinstance(module, FactorizedLinear)
    us = module.U.detach()[cols].double() * module.S.detach().double()
    return (us @ module.V.detach().double()).T


def apply_elimination(ready: nn.Module, plan: EliminationPlan) -> dict[str, dict[str, Any]]:
    """Apply ``plan`` to ``ready`` (the export's private copy, modified in place).

    Returns
    -------
    dict
        Per factorized layer touched: ``{"input": (status, removed), "output": ...}``
        for the sides a junction handled, and ``refused_*`` reasons found while applying
        (a junction whose union would remove every feature).
    """
    done: dict[str, dict[str, Any]] = {}
    for j in plan.junctions:
        producer, consumer = ready.get_submodule(j.producer), ready.get_submodule(j.consumer)
        width = _width(producer, "out")
        dead: set[int] = set()
        if j.dead_from is not None:
            assert isinstance(consumer, FactorizedLinear)
            dead |= set(consumer.sparse_rows.tolist())
        const: list[int] = []
        if j.const_from is not None:
            assert isinstance(producer, FactorizedLinear)
            cset = set(producer.sparse_cols.tolist())
            const = sorted(cset - dead)
            dead |= cset
        if len(dead) >= width:
            why = f"it would remove all {width} features between {j.producer!r} and {j.consumer!r}"
            if j.dead_from is not None:
                done.setdefault(j.dead_from, {})["refused_input"] = why
            if j.const_from is not None:
                done.setdefault(j.const_from, {})["refused_output"] = why
            continue
        keep = torch.tensor([i for i in range(width) if i not in dead], dtype=torch.long)
        with torch.no_grad():
            if const:
                _fold_constants(producer, consumer, j, torch.tensor(const, dtype=torch.long))
            _keep_outputs(producer, keep)
            _keep_inputs(consumer, keep)
            for step in j.link.feature_modules:
                assert step.module is not None
                _keep_features(step.module, keep)
        if isinstance(producer, FactorizedLinear):
            done.setdefault(j.producer, {})["output"] = (f"removed:{j.consumer}", len(dead))
        if isinstance(consumer, FactorizedLinear):
            done.setdefault(j.consumer, {})["input"] = (f"removed:{j.producer}", len(dead))
    return done


def _fold_constants(
    producer: nn.Module, consumer: nn.Module, j: Junction, const: torch.Tensor
) -> None:
    """``consumer.bias += W[:, const] · φ(b_producer)[const]``, creating the bias if needed."""
    width = _width(producer, "out")
    p = next(producer.parameters())
    b = producer.bias.detach() if producer.bias is not None else p.new_zeros(width)
    # The whole pre-activation vector through the real modules (per-feature ones
    # included), exactly as the model computes it, then the constant features.
    c = j.link.apply(b.reshape(1, width).clone())[0, const.to(b.device)]
    if not needs_bias(j, producer.bias is not None):
        return  # φ(0) = 0 for every step: the constants are exactly zero
    w = _dense_columns(consumer, const.to(p.device))
    add = (w @ c.double()).to(p.dtype)
    if consumer.bias is None:
        consumer.bias = nn.Parameter(add.clone())
    else:
        consumer.bias = nn.Parameter(consumer.bias.detach() + add)


# --------------------------------------------------------------------- shape only


@dataclass(frozen=True)
class DeployedLayer:
    """What elimination does at one factorized layer (from shapes).

    Attributes
    ----------
    name : str
        The layer.
    input_elimination, output_elimination : str
        ``"off"``, ``"none"`` (nothing dead), ``"removed:<neighbour>"``, ``"dropped at
        input: <reason>"`` (the layer drops its dead inputs with a Slice/Gather; the
        model input keeps them) or ``"refused: <reason>"``.
    eliminated_inputs, eliminated_outputs : tuple of int
        ``(fewest, most)`` features removed; equal unless two adjacent factorized layers
        both hold sparsified rows/columns (then the count depends on which were chosen).
    """

    name: str
    input_elimination: str
    output_elimination: str
    eliminated_inputs: tuple[int, int]
    eliminated_outputs: tuple[int, int]


@dataclass(frozen=True)
class DeployedParams:
    """Whole-model parameter counts of the deployed graph, from shapes.

    Attributes
    ----------
    vanilla_params : int
        Parameters (weights and biases) of the vanilla model.
    params : int
        Parameters the deployed graph stores: factorized layers as their stored blocks
        (S folded into U), minus what dead-neuron elimination removes. When the count
        depends on which rows/columns are selected (see ``exact``), the largest
        possible count (the least compression).
    params_min : int
        The smallest possible count (equal to ``params`` when ``exact``).
    sparse_layout : str
        ``"blocks"`` or ``"zeros"``.
    eliminate : bool
        Whether dead-neuron elimination was counted.
    layers : tuple of DeployedLayer
        Per factorized layer.
    """

    vanilla_params: int
    params: int
    params_min: int
    sparse_layout: str
    eliminate: bool
    layers: tuple[DeployedLayer, ...] = ()

    @property
    def exact(self) -> bool:
        """The count does not depend on which rows/columns are selected."""
        return self.params == self.params_min

    @property
    def ratio(self) -> float:
        """Deployed C.R.: vanilla parameters over deployed ones (the conservative one)."""
        return self.vanilla_params / self.params

    @property
    def ratio_max(self) -> float:
        """The largest deployed C.R. the shapes allow (equal to ``ratio`` when exact)."""
        return self.vanilla_params / self.params_min

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "vanilla_params": self.vanilla_params,
            "params": self.params,
            "params_min": self.params_min,
            "ratio": self.ratio,
            "ratio_max": self.ratio_max,
            "exact": self.exact,
            "sparse_layout": self.sparse_layout,
            "eliminate": self.eliminate,
            "layers": [
                {
                    "name": lay.name,
                    "input_elimination": lay.input_elimination,
                    "output_elimination": lay.output_elimination,
                    "eliminated_inputs": list(lay.eliminated_inputs),
                    "eliminated_outputs": list(lay.eliminated_outputs),
                }
                for lay in self.layers
            ],
        }


_ROW_KEYS = ("name", "din", "dout", "k", "rows_sparsified", "cols_sparsified", "keep")


def _specs_from_rows(
    model: nn.Module, layers: Sequence[Mapping[str, Any]]
) -> dict[str, LayerSpec]:
    modules = dict(model.named_modules())
    specs: dict[str, LayerSpec] = {}
    for row in layers:
        missing = [k for k in _ROW_KEYS if k not in row]
        if missing:
            raise FairDeployError(
                f"layer row {dict(row)!r} lacks {', '.join(missing)}: pass the rows of "
                "fairdeploy.compression.layer_table"
            )
        name = str(row["name"])
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise FairDeployError(
                f"layer {name!r} is not an nn.Linear of the model: deployed_params needs the "
                "vanilla model the layer table was made for"
            )
        din, dout, k = int(row["din"]), int(row["dout"]), int(row["k"])
        if (din, dout) != (linear.in_features, linear.out_features):
            raise FairDeployError(
                f"layer {name!r} is Linear({linear.in_features}, {linear.out_features}) but "
                f"its row says din={din}, dout={dout}"
            )
        specs[name] = LayerSpec(
            name=name,
            din=din,
            dout=dout,
            rank=k,
            keep=int(row["keep"]),
            rows=int(row["rows_sparsified"]),
            cols=int(row["cols_sparsified"]),
            bias=linear.bias is not None,
        )
    return specs


def _feature_param_count(module: nn.Module | None) -> int:
    """Parameters per feature of a per-feature module."""
    if isinstance(module, nn.PReLU):
        return 1
    if isinstance(module, nn.BatchNorm1d):
        return 2 if module.weight is not None else 0
    return 0


def _overlap_candidates(lo: int, hi: int, points: Sequence[int]) -> list[int]:
    """The ends of [lo, hi] and the breakpoints of a piecewise-linear count inside it."""
    cands = {lo, hi}
    for p in points:
        for q in (p - 1, p, p + 1):
            if lo <= q <= hi:
                cands.add(q)
    return sorted(cands)


def deployed_params(
    model: nn.Module,
    layers: Sequence[Mapping[str, Any]],
    *,
    sparse_layout: str = "blocks",
    eliminate: bool = True,
    example_input: torch.Tensor | None = None,
) -> DeployedParams:
    """Parameters the deployed ONNX graph stores, from shapes alone (``--dry-run``).

    Counts what :func:`fairdeploy.export.export_onnx` stores for the same settings:
    every parameter of the vanilla model, with each factorized layer as its stored
    blocks (``Din·k + k·Dout + bias`` with S folded into U, minus every zeroed entry in
    the ``blocks`` layout) and, with ``eliminate``, the neurons that whole zeroed rows of
    U / columns of V leave dead removed from the neighbouring Linear layers (see
    :mod:`fairdeploy.export._eliminate`). Works on the meta device.

    Parameters
    ----------
    model : nn.Module
        The vanilla model (planned layers still ``nn.Linear``); only shapes are read.
    layers : sequence of dict
        The rows of :func:`fairdeploy.compression.layer_table` (keys ``name``, ``din``,
        ``dout``, ``k``, ``rows_sparsified``, ``cols_sparsified``, ``keep``).
    sparse_layout : {"blocks", "zeros"}
        ``blocks`` stores only non-zero blocks; ``zeros`` stores the factors whole.
    eliminate : bool
        Count dead-neuron elimination (the export's ``eliminate_dead``).
    example_input : torch.Tensor, optional
        A batch the model accepts (meta is fine): needed to accept BatchNorm1d or flatten
        between layers, as the export does with its example input.

    Returns
    -------
    DeployedParams
        Counts and ratios. Parameters only (weights and biases, the paper's unit): the
        ONNX file also stores BatchNorm running statistics, so its float initializers
        exceed this count by 2 per BatchNorm feature.

    Raises
    ------
    FairDeployError
        A row that does not match the model, or an unknown layout.
    """
    if sparse_layout not in SPARSE_LAYOUTS:
        raise FairDeployError(
            f"sparse_layout={sparse_layout!r} is not allowed: use 'blocks' or 'zeros'"
        )
    specs = _specs_from_rows(model, layers)
    vanilla = sum(p.numel() for p in model.parameters())
    plan = EliminationPlan()
    if eliminate and any(s.dead_inputs or s.constant_outputs for s in specs.values()):
        try:
            structure: ModelStructure | None = analyze_structure(
                model, leaves=list(specs), example_input=example_input
            )
            untraced = ""
        except FairDeployError as exc:
            structure, untraced = None, str(exc)
        plan = plan_elimination(structure, specs, untraced)
    counter = _Counter(model, specs, plan, sparse_layout, eliminate)
    return counter.result(vanilla)


class _Counter:
    """Evaluates the deployed count for given overlaps between adjacent selections."""

    def __init__(
        self,
        model: nn.Module,
        specs: dict[str, LayerSpec],
        plan: EliminationPlan,
        layout: str,
        eliminate: bool,
    ) -> None:
        self.model, self.specs, self.plan = model, specs, plan
        self.layout, self.eliminate = layout, eliminate
        self.modules = dict(model.named_modules())
        # Overlap |C_P ∩ R_Q| ranges where both neighbours hold sparsified sets.
        self.ranges: dict[int, list[int]] = {}
        for i, j in enumerate(plan.junctions):
            cp = self._effective_cols(j.producer)
            rq = self._effective_rows(j.consumer)
            if cp and rq:
                w = self._width(j.producer)
                lo, hi = max(0, cp + rq - w), min(cp, rq)
                a = rq if j.dead_from else 0
                b = cp if j.const_from else 0
                # Breakpoints: where the constant set empties (o = b) and where the
                # union would remove every feature (o = a + b − w).
                self.ranges[i] = _overlap_candidates(lo, hi, [b, a + b - w])

    def _effective_cols(self, name: str) -> int:
        s = self.specs.get(name)
        return s.cols if s is not None and s.sparse else 0

    def _effective_rows(self, name: str) -> int:
        s = self.specs.get(name)
        return s.rows if s is not None and s.sparse else 0

    def _width(self, producer: str) -> int:
        s = self.specs.get(producer)
        if s is not None:
            return s.dout
        return int(self.modules[producer].out_features)  # type: ignore[arg-type]

    def result(self, vanilla: int) -> DeployedParams:
        keys = sorted(self.ranges)
        best: tuple[int, dict] | None = None
        low = None
        elim_ranges: dict[tuple[str, str], list[int]] = {}
        for combo in itertools.product(*(self.ranges[k] for k in keys)):
            total, records = self._evaluate(dict(zip(keys, combo, strict=True)))
            if best is None or total > best[0]:
                best = (total, records)
            low = total if low is None else min(low, total)
            for name, rec in records.items():
                for side in ("input", "output"):
                    elim_ranges.setdefault((name, side), []).append(rec[side][1])
        assert best is not None and low is not None
        total, records = best
        layers = tuple(
            DeployedLayer(
                name=name,
                input_elimination=records[name]["input"][0],
                output_elimination=records[name]["output"][0],
                eliminated_inputs=(
                    min(elim_ranges[(name, "input")]),
                    max(elim_ranges[(name, "input")]),
                ),
                eliminated_outputs=(
                    min(elim_ranges[(name, "output")]),
                    max(elim_ranges[(name, "output")]),
                ),
            )
            for name in self.specs
        )
        return DeployedParams(
            vanilla_params=vanilla,
            params=total,
            params_min=low,
            sparse_layout=self.layout,
            eliminate=self.eliminate,
            layers=layers,
        )

    def _evaluate(self, overlaps: dict[int, int]) -> tuple[int, dict[str, dict]]:
        specs = self.specs
        d_in: dict[str, int] = {}
        d_out: dict[str, int] = {}
        rows_left = {n: (s.rows if s.sparse else 0) for n, s in specs.items()}
        cols_left = {n: (s.cols if s.sparse else 0) for n, s in specs.items()}
        bias = {n: s.bias for n, s in specs.items()}
        status_in: dict[str, str] = {}
        status_out: dict[str, str] = {}
        removed = 0  # parameters the deployed graph does not store, net
        linear_rows: dict[str, int] = {}
        linear_cols: dict[str, int] = {}
        linear_bias: dict[str, bool] = {}
        for i, j in enumerate(self.plan.junctions):
            o = overlaps.get(i, 0)
            w = self._width(j.producer)
            a = specs[j.consumer].rows if j.dead_from else 0
            b = specs[j.producer].cols if j.const_from else 0
            dead = a + b - (o if a and b else 0)
            const = b - (o if a else 0)
            if dead >= w:
                why = (f"refused: it would remove all {w} features between {j.producer!r} "
                       f"and {j.consumer!r}")
                if j.dead_from:
                    status_in[j.consumer] = why
                if j.const_from:
                    status_out[j.producer] = why
                continue
            if j.producer in specs:
                d_out[j.producer] = dead
                status_out[j.producer] = f"removed:{j.consumer}"
                cols_left[j.producer] = 0 if j.const_from else cols_left[j.producer] - o
            else:
                linear_rows[j.producer] = dead
            if j.consumer in specs:
                d_in[j.consumer] = dead
                status_in[j.consumer] = f"removed:{j.producer}"
                rows_left[j.consumer] = 0 if j.dead_from else rows_left[j.consumer] - o
            else:
                linear_cols[j.consumer] = dead
            for step in j.link.feature_modules:
                removed += dead * _feature_param_count(step.module)
            if const > 0 and needs_bias(j, self._has_bias(j.producer)):
                if j.consumer in specs:
                    bias[j.consumer] = True
                else:
                    linear_bias[j.consumer] = True
        removed += self._linear_removed(linear_rows, linear_cols, linear_bias)
        removed += self._factors_removed(d_in, d_out, rows_left, cols_left, bias)
        records = {
            name: {
                "input": self._status(name, "input", status_in, d_in.get(name, 0)),
                "output": self._status(name, "output", status_out, d_out.get(name, 0)),
            }
            for name in specs
        }
        total = sum(p.numel() for p in self.model.parameters()) - removed
        return total, records

    def _has_bias(self, name: str) -> bool:
        """Whether layer ``name`` has a bias in the model as given (before folding)."""
        if name in self.specs:
            return self.specs[name].bias
        return self.modules[name].bias is not None  # type: ignore[union-attr]

    def _linear_removed(
        self, rows: dict[str, int], cols: dict[str, int], gets_bias: dict[str, bool]
    ) -> int:
        """Parameters that plain Linear layers no longer store: ``rows`` output features
        and ``cols`` input features removed, a bias where folding gives them one."""
        removed = 0
        for name in set(rows) | set(cols):
            lin = self.modules[name]
            assert isinstance(lin, nn.Linear)
            r, c = rows.get(name, 0), cols.get(name, 0)
            has_bias = lin.bias is not None
            before = lin.out_features * lin.in_features + (lin.out_features if has_bias else 0)
            after = (lin.out_features - r) * (lin.in_features - c)
            if has_bias or gets_bias.get(name):
                after += lin.out_features - r
            removed += before - after
        return removed

    def _factors_removed(
        self, d_in: dict[str, int], d_out: dict[str, int], rows_left: dict[str, int],
        cols_left: dict[str, int], bias: dict[str, bool],
    ) -> int:
        """Parameters the factorized layers no longer store, net: removed features, and
        with ``blocks`` the zeroed tails of the sparsified rows and columns left; a bias
        that folding adds counts against."""
        removed = 0
        for name, s in self.specs.items():
            k, q = s.rank, s.keep
            dense = s.din * s.dout + (s.dout if s.bias else 0)
            din, dout = s.din - d_in.get(name, 0), s.dout - d_out.get(name, 0)
            stored = din * k + k * dout + (dout if bias[name] else 0)
            if self.layout == "blocks":
                stored -= (rows_left[name] + cols_left[name]) * (k - q)
            removed += dense - stored
        return removed

    def _status(self, name: str, side: str, status: dict[str, str], count: int) -> tuple[str, int]:
        s = self.specs[name]
        dead = s.dead_inputs if side == "input" else s.constant_outputs
        if name in status:
            st = status[name]
            if st.startswith("removed:"):
                return st, count
            reason = st.removeprefix("refused: ")
        elif not self.eliminate:
            return "off", 0
        elif not dead:
            return "none", 0
        else:
            refused = self.plan.refused_inputs if side == "input" else self.plan.refused_outputs
            reason = refused.get(name, "")
        if side == "input" and self.layout == "blocks" and s.rows < s.din:
            return f"dropped at input: {reason}", s.rows
        return f"refused: {reason}", 0
