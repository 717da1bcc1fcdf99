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
and :func:`deployed_params` (for ``--dry-run``) runs the same :func:`apply_elimination` on
a copy of the model on the meta device, so the count from shapes cannot drift from what
the export does (one junction code, not two).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export._record import LayerLayout, layer_record
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.structure import Link, ModelStructure, analyze_structure

__all__ = ["DeployedParams", "deployed_params"]

#: The two ways to store a structured-sparse factor (``export.sparse_layout``).
SPARSE_LAYOUTS = ("blocks", "zeros")


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
    structure: ModelStructure | None, specs: Mapping[str, LayerLayout], untraced: str = ""
) -> EliminationPlan:
    """Decide, from the structure and the sparsity counts, what can be eliminated.

    Parameters
    ----------
    structure : ModelStructure or None
        The analysis of the model (None when it could not be traced; ``untraced`` says
        why).
    specs : mapping of str to LayerLayout
        The factorized layers' records (their shapes and sparsity counts are read).
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    refused_in: dict[str, str] = {}
    refused_out: dict[str, str] = {}
    for name, spec in specs.items():
        for side, dead, count, width in (
            ("input", spec.dead_inputs, spec.sparse_rows, spec.din),
            ("output", spec.constant_outputs, spec.sparse_cols, spec.dout),
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
    # Whether each layer had a bias before any folding: a bias that folding creates is
    # exactly zero on the layer's own constant outputs (their row of the layer's weight
    # is zero), so those constants are φ(0) as for a layer without bias.
    had_bias = {
        name: ready.get_submodule(name).bias is not None
        for j in plan.junctions
        for name in (j.producer, j.consumer)
    }
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
                _fold_constants(
                    producer, consumer, j, torch.tensor(const, dtype=torch.long),
                    producer_had_bias=had_bias[j.producer],
                )
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
    producer: nn.Module,
    consumer: nn.Module,
    j: Junction,
    const: torch.Tensor,
    *,
    producer_had_bias: bool,
) -> None:
    """``consumer.bias += W[:, const] · φ(b_producer)[const]``, creating the bias if needed
    (``producer_had_bias``: whether the producer had a bias before folding gave it one)."""
    width = _width(producer, "out")
    p = next(producer.parameters())
    b = producer.bias.detach() if producer.bias is not None else p.new_zeros(width)
    # The whole pre-activation vector through the real modules (per-feature ones
    # included), exactly as the model computes it, then the constant features.
    c = j.link.apply(b.reshape(1, width).clone())[0, const.to(b.device)]
    if not needs_bias(j, producer_had_bias):
        return  # φ(0) = 0 for every step: the constants are exactly zero
    w = _dense_columns(consumer, const.to(p.device))
    add = (w @ c.double()).to(p.dtype)
    if consumer.bias is None:
        consumer.bias = nn.Parameter(add.clone())
    else:
        consumer.bias = nn.Parameter(consumer.bias.detach() + add)


# --------------------------------------------------------------------- shape only


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
    layers : tuple of LayerLayout
        Per factorized layer: its record from shapes (``stored_params`` as stored after
        elimination, ``eliminated_*_range`` the fewest and most features removed).
    """

    vanilla_params: int
    params: int
    params_min: int
    sparse_layout: str
    eliminate: bool
    layers: tuple[LayerLayout, ...] = ()

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
                    "name": lay.layer,
                    "input_elimination": lay.input_elimination,
                    "output_elimination": lay.output_elimination,
                    "eliminated_inputs": list(lay.eliminated_inputs_range or ()),
                    "eliminated_outputs": list(lay.eliminated_outputs_range or ()),
                }
                for lay in self.layers
            ],
        }


_ROW_KEYS = ("name", "din", "dout", "k", "rows_sparsified", "cols_sparsified", "keep")


def _specs_from_rows(
    model: nn.Module, layers: Sequence[Mapping[str, Any]]
) -> dict[str, LayerLayout]:
    modules = dict(model.named_modules())
    specs: dict[str, LayerLayout] = {}
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
        specs[name] = layer_record(
            name,
            din=din,
            dout=dout,
            rank=k,
            keep=int(row["keep"]),
            rows=int(row["rows_sparsified"]),
            cols=int(row["cols_sparsified"]),
            bias=linear.bias is not None,
        )
    return specs


def _span(counts: Sequence[int]) -> tuple[int, int]:
    """``(fewest, most)`` of ``counts``."""
    return min(counts), max(counts)


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
    :mod:`fairdeploy.export._eliminate`): the export's own :func:`apply_elimination` runs
    on a meta-device copy with index sets of the planned sizes (every overlap between
    adjacent selections that changes the count). Works on the meta device.

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
    """The deployed count for given overlaps between adjacent selections, from shapes.

    It runs the export's own junction code (:func:`apply_elimination`, the constant
    folding included) on a copy of the model on the meta device, with each planned layer
    a :class:`~fairdeploy.lrf.FactorizedLinear` whose sparsified rows/columns are index
    sets realizing the overlaps, then counts what remains as the export stores it.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: dict[str, LayerLayout],
        plan: EliminationPlan,
        layout: str,
        eliminate: bool,
    ) -> None:
        self.model, self.specs, self.plan = model, specs, plan
        self.layout, self.eliminate = layout, eliminate
        self.modules = dict(model.named_modules())
        self.shapes = _meta_copy(model, specs)
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
        return s.sparse_cols if s is not None else 0

    def _effective_rows(self, name: str) -> int:
        s = self.specs.get(name)
        return s.sparse_rows if s is not None else 0

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
            dataclasses.replace(
                spec.with_elimination(
                    records[name]["input"],
                    records[name]["output"],
                    inputs_range=_span(elim_ranges[(name, "input")]),
                    outputs_range=_span(elim_ranges[(name, "output")]),
                ),
                stored_params=records[name]["stored"],
            )
            for name, spec in self.specs.items()
        )
        return DeployedParams(
            vanilla_params=vanilla,
            params=total,
            params_min=low,
            sparse_layout=self.layout,
            eliminate=self.eliminate,
            layers=layers,
        )

    def _index_sets(self, overlaps: dict[int, int]) -> dict[str, dict[str, list[int]]]:
        """Sparsified rows/columns of every planned layer, realizing ``overlaps``: the
        producer's columns are ``0 … cp−1`` and the consumer's rows start at ``cp − o``."""
        sets = {n: {"rows": list(range(s.sparse_rows)), "cols": list(range(s.sparse_cols))}
                for n, s in self.specs.items()}
        for i, o in overlaps.items():
            j = self.plan.junctions[i]
            cp, rq = self.specs[j.producer].sparse_cols, self.specs[j.consumer].sparse_rows
            sets[j.producer]["cols"] = list(range(cp))
            sets[j.consumer]["rows"] = list(range(cp - o, cp - o + rq))
        return sets

    def _evaluate(self, overlaps: dict[int, int]) -> tuple[int, dict[str, dict]]:
        shapes = copy.deepcopy(self.shapes)
        for name, chosen in self._index_sets(overlaps).items():
            layer = shapes.get_submodule(name)
            assert isinstance(layer, FactorizedLinear)
            layer.sparse_rows = torch.tensor(chosen["rows"], dtype=torch.long)
            layer.sparse_cols = torch.tensor(chosen["cols"], dtype=torch.long)
        done = apply_elimination(shapes, _rebind(self.plan, shapes))
        total = 0
        for module in shapes.modules():
            if isinstance(module, FactorizedLinear):
                total += _stored_factor_params(module, blocks=self.layout == "blocks")
            else:
                total += sum(p.numel() for p in module.parameters(recurse=False))
        records: dict[str, dict[str, Any]] = {
            name: {side: self._status(name, side, done.get(name, {}))
                   for side in ("input", "output")}
            for name in self.specs
        }
        for name in self.specs:  # what the export stores of the layer after elimination
            layer = shapes.get_submodule(name)
            assert isinstance(layer, FactorizedLinear)
            records[name]["stored"] = _stored_factor_params(layer, blocks=self.layout == "blocks")
        return total, records

    def _status(self, name: str, side: str, done: Mapping[str, Any]) -> tuple[str, int]:
        s = self.specs[name]
        if side in done:
            return done[side]
        dead = s.dead_inputs if side == "input" else s.constant_outputs
        if f"refused_{side}" in done:
            reason = done[f"refused_{side}"]
        elif not self.eliminate:
            return "off", 0
        elif not dead:
            return "none", 0
        else:
            refused = self.plan.refused_inputs if side == "input" else self.plan.refused_outputs
            reason = refused.get(name, "")
        if side == "input" and self.layout == "blocks" and s.sparse_rows < s.din:
            return f"dropped at input: {reason}", s.sparse_rows
        return f"refused: {reason}", 0


def _meta_copy(model: nn.Module, specs: Mapping[str, LayerLayout]) -> nn.Module:
    """``model`` on the meta device (no data copied), each planned layer a
    :class:`~fairdeploy.lrf.FactorizedLinear` of its spec's shapes."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    shapes = copy.deepcopy(model, memo)
    for name, s in specs.items():
        bias = torch.empty(s.dout, device="meta") if s.has_bias else None
        layer = FactorizedLinear(
            torch.empty(s.din, s.rank, device="meta"),
            torch.empty(s.rank, device="meta"),
            torch.empty(s.rank, s.dout, device="meta"),
            bias,
        )
        layer.keep = s.keep
        shapes.set_submodule(name, layer)
    return shapes


def _rebind(plan: EliminationPlan, model: nn.Module) -> EliminationPlan:
    """``plan`` with the modules of its links' steps taken from ``model`` (a copy of the
    model it was planned on), so applying it changes ``model`` only."""
    junctions = []
    for j in plan.junctions:
        steps = tuple(
            s if s.module is None else dataclasses.replace(s, module=model.get_submodule(s.target))
            for s in j.link.steps
        )
        junctions.append(dataclasses.replace(j, link=dataclasses.replace(j.link, steps=steps)))
    return dataclasses.replace(plan, junctions=tuple(junctions))


def _stored_factor_params(layer: FactorizedLinear, *, blocks: bool) -> int:
    """What the export stores of a factorized layer: U with S folded in, V, the bias;
    in the ``blocks`` layout without the zeroed tails of its sparsified rows/columns."""
    k = layer.rank
    stored = layer.U.shape[0] * k + k * layer.V.shape[1]
    stored += 0 if layer.bias is None else layer.bias.numel()
    if blocks:
        stored -= (layer.sparse_rows.numel() + layer.sparse_cols.numel()) * (k - layer.keep)
    return int(stored)
