"""The export layout: a copy of the model whose modules compute exactly the ONNX graph we ship.

A :class:`~fairdeploy.lrf.FactorizedLinear` becomes :class:`ExportFactorized`, which holds
the factor blocks that are really stored (S folded into U, structured-sparse rows and
columns cut out as smaller blocks) and computes with ``Slice`` + ``MatMul`` + ``Concat``.
The permutations that make the sparsified rows/columns contiguous are folded into the
neighbouring ``nn.Linear`` (or factorized) layer when only elementwise operations lie
between (what lies between is read from the model's traced graph,
:mod:`fairdeploy.structure`); otherwise the layer gathers its input/output at run time.
With ``eliminate_dead``, neurons that whole zeroed rows of U / columns of V leave dead are
removed first (:mod:`fairdeploy.export._eliminate`); the permutations then act on what
remains.

Why this layout: measured on ONNX Runtime (CPU), a run-time ``Gather`` made a sparse layer
0.4–1.0× as fast as simply storing the zeros, while ``Slice`` after a folded permutation
reached the theoretical speed-up (DESIGN.md §5).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export._eliminate import (
    SPARSE_LAYOUTS,
    _keep_features,
    _keep_inputs,
    apply_elimination,
    plan_elimination,
)
from fairdeploy.export._record import LayerLayout, layer_record
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.structure import ELEMENTWISE_MODULES as _STRUCTURE_ELEMENTWISE
from fairdeploy.structure import Link, ModelStructure, analyze_structure

__all__ = [
    "ELEMENTWISE_MODULES",
    "SPARSE_LAYOUTS",
    "ExportFactorized",
    "LayerLayout",
    "prepare_for_export",
    "sparse_layout_name",
]

#: Module types of the one elementwise table (:mod:`fairdeploy.structure`); whether an
#: instance qualifies is decided there (e.g. BatchNorm1d only in eval mode on 2-D input).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = _STRUCTURE_ELEMENTWISE


class ExportFactorized(nn.Module):
    """A factorized layer in its export layout: only the stored blocks, S folded into U.

    With ``R`` the sparsified rows of U (moved last by ``input_perm``, ``n1 = Din − |R|``),
    ``C`` the sparsified columns of V (moved last by ``output_perm``, ``m1 = Dout − |C|``)
    and ``q = keep``::

        z  = concat(x @ U'[:, :q], x[..., :n1] @ U'[:n1, q:])     (U' = (U · S)[input_perm])
        o  = concat(z @ V[:, C̄], z[..., :q] @ V[:q, C]) + b[output_perm]

    (with ``q = 0`` the second block is zero-padding: no zero-size tensor is stored.)

    When nothing is sparsified it is ``(x @ U') @ V + b``: two MatMuls and the bias.
    ``input_select`` (dead inputs dropped at the layer): the layer first keeps those
    input features, with a Slice when they form one range, else a Gather.
    """

    def __init__(
        self,
        layer: FactorizedLinear,
        *,
        sparse: bool,
        gather_input: bool,
        gather_output: bool,
        input_select: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.select_range: tuple[int, int] | None = None
        sel = None if input_select is None else input_select.long().cpu()
        if sel is not None and torch.equal(sel, torch.arange(int(sel[0]), int(sel[0]) + len(sel))):
            self.select_range = (int(sel[0]), int(sel[0]) + len(sel))
            sel = None
        if sel is not None:
            self.register_buffer("input_select", sel.to(layer.U.device))
        else:
            self.input_select = None
        U = (layer.U * layer.S).detach()
        V = layer.V.detach()
        din, k = U.shape
        dout = V.shape[1]
        rows = layer.sparse_rows.detach().long()
        cols = layer.sparse_cols.detach().long()
        q = int(layer.keep)
        sparse = sparse and q < k
        rows = rows if sparse else rows[:0]
        cols = cols if sparse else cols[:0]
        in_perm = _contiguous_last(rows, din)
        out_perm = _contiguous_last(cols, dout)
        self.k, self.keep = int(k), q
        self.n1 = din - rows.numel()
        self.m1 = dout - cols.numel()
        self.row_sparse = rows.numel() > 0
        self.col_sparse = cols.numel() > 0
        # Run-time gathers only where the permutation could not be folded away.
        if self.row_sparse and gather_input:
            self.register_buffer("input_index", in_perm.clone())
        else:
            self.input_index = None
        if self.col_sparse and gather_output:
            self.register_buffer("output_index", torch.argsort(out_perm))
        else:
            self.output_index = None
        Up = U[in_perm] if self.row_sparse else U
        Vp = V[:, out_perm] if self.col_sparse else V
        if not self.row_sparse:
            self.u = nn.Parameter(Up.contiguous())
        else:
            if q > 0:
                self.u_head = nn.Parameter(Up[:, :q].contiguous())
            self.u_tail = nn.Parameter(Up[: self.n1, q:].contiguous())
        if not self.col_sparse:
            self.v = nn.Parameter(Vp.contiguous())
        else:
            self.v_kept = nn.Parameter(Vp[:, : self.m1].contiguous())
            # q = 0: those outputs are 0 before the bias. A zero-padding ``Pad``, not a
            # (0 × |C|) block and a K = 0 MatMul: OpenVINO reads a zero-size initializer
            # as a scalar and refuses the graph (DESIGN.md "Portable artifacts").
            if q > 0:
                self.v_head = nn.Parameter(Vp[:q, self.m1 :].contiguous())
            self.pad_cols = dout - self.m1 if q == 0 else 0
        if layer.bias is not None:
            b = layer.bias.detach()
            self.bias = nn.Parameter((b[out_perm] if self.col_sparse else b).contiguous())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the layer from its stored blocks."""
        if self.select_range is not None:
            x = x[..., self.select_range[0] : self.select_range[1]]
        elif self.input_select is not None:
            x = x.index_select(-1, self.input_select)
        if self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        head: torch.Tensor | None = None
        if not self.row_sparse:
            z = x @ self.u
        elif self.keep > 0:
            head = x @ self.u_head
            z = torch.cat([head, x[..., : self.n1] @ self.u_tail], dim=-1)
        else:
            z = x[..., : self.n1] @ self.u_tail
        if not self.col_sparse:
            o = z @ self.v
        elif self.keep == 0:
            o = nn.functional.pad(z @ self.v_kept, (0, self.pad_cols))
        else:
            zq = head if head is not None else z[..., : self.keep]
            o = torch.cat([z @ self.v_kept, zq @ self.v_head], dim=-1)
        if self.bias is not None:
            o = o + self.bias
        if self.output_index is not None:
            o = o.index_select(-1, self.output_index)
        return o


def _contiguous_last(selected: torch.Tensor, dim: int) -> torch.Tensor:
    """A permutation of ``range(dim)``: the unselected indices in order, then the selected."""
    mask = torch.ones(dim, dtype=torch.bool)
    mask[selected] = False
    return torch.cat([torch.nonzero(mask).flatten(), torch.sort(selected).values])


def _needs_perm(layer: FactorizedLinear, side: str) -> bool:
    idx = layer.sparse_rows if side == "in" else layer.sparse_cols
    return idx.numel() > 0 and layer.keep < layer.rank


def _check_sparsity_record(name: str, layer: FactorizedLinear) -> None:
    """The blocks drop entries the record says are zero: make sure they are."""
    k, q = layer.rank, int(layer.keep)
    if not 0 <= q <= k:
        raise FairDeployError(f"layer {name!r}: keep={q} is outside [0, rank={k}]")
    for what, idx, dim in (
        ("sparse_rows", layer.sparse_rows, layer.in_features),
        ("sparse_cols", layer.sparse_cols, layer.out_features),
    ):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= dim):
            raise FairDeployError(f"layer {name!r}: {what} has an index outside [0, {dim})")
        if idx.numel() != torch.unique(idx).numel():
            raise FairDeployError(f"layer {name!r}: {what} lists an index twice")
    if q < k:
        rows, cols = layer.sparse_rows, layer.sparse_cols
        bad_u = layer.U.detach()[rows][:, q:].abs().sum() if rows.numel() else 0
        bad_v = layer.V.detach()[q:, cols].abs().sum() if cols.numel() else 0
        if float(bad_u) > 0 or float(bad_v) > 0:
            raise FairDeployError(
                f"layer {name!r}: the sparsified rows/columns hold non-zero entries beyond "
                f"keep={q}; zero them (fairdeploy.lrf sparsification does) before export"
            )


def _record(name: str, layer: FactorizedLinear) -> LayerLayout:
    """The first stage of the layer's record: its shapes and sparsity counts."""
    return layer_record(
        name,
        din=layer.in_features,
        dout=layer.out_features,
        rank=layer.rank,
        keep=int(layer.keep),
        rows=int(layer.sparse_rows.numel()),
        cols=int(layer.sparse_cols.numel()),
        bias=layer.bias is not None,
    )


def _permute_neighbour(module: nn.Module, *, out_perm=None, in_perm=None) -> nn.Module:
    """A copy of a Linear/FactorizedLinear whose output rows / input columns are permuted."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        if isinstance(m, nn.Linear):
            if out_perm is not None:
                m.weight.copy_(m.weight[out_perm])
                if m.bias is not None:
                    m.bias.copy_(m.bias[out_perm])
            if in_perm is not None:
                m.weight.copy_(m.weight[:, in_perm])
        else:  # FactorizedLinear with no sparsity record on the permuted side
            if out_perm is not None:
                m.V.copy_(m.V[:, out_perm])
                if m.bias is not None:
                    m.bias.copy_(m.bias[out_perm])
                m.sparse_cols = torch.argsort(out_perm)[m.sparse_cols]
            if in_perm is not None:
                m.U.copy_(m.U[in_perm])
                m.sparse_rows = torch.argsort(in_perm)[m.sparse_rows]
    return m


def sparse_layout_name(sparse_layout: bool | str) -> str:
    """``"blocks"`` or ``"zeros"`` from the option's accepted spellings.

    ``True``/``"blocks"``: structured-sparse factors as real smaller blocks (Slice +
    MatMul + Concat). ``False``/``"zeros"``: the factors whole, zeros included.
    """
    if sparse_layout is True or sparse_layout == "blocks":
        return "blocks"
    if sparse_layout is False or sparse_layout == "zeros":
        return "zeros"
    raise FairDeployError(
        f"sparse_layout={sparse_layout!r} is not allowed: use 'blocks' (real smaller blocks) "
        "or 'zeros' (factors stored whole, zeros included)"
    )


def _eliminate(
    ready: nn.Module,
    specs: Mapping[str, LayerLayout],
    structure: ModelStructure | None,
    untraced: str,
    *,
    blocks: bool,
) -> tuple[dict[str, LayerLayout], dict[str, torch.Tensor]]:
    """Dead-neuron elimination on ``ready`` (in place): the layers' records with the
    outcome, and the inputs each layer that drops its dead inputs itself still reads."""
    plan = plan_elimination(structure, specs, untraced)
    done = apply_elimination(ready, plan)
    records: dict[str, LayerLayout] = {}
    select: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        got = done.get(name, {})
        status: dict[str, tuple[str, int]] = {}
        for side, dead, refused in (
            ("input", spec.dead_inputs, plan.refused_inputs),
            ("output", spec.constant_outputs, plan.refused_outputs),
        ):
            if side in got:
                status[side] = got[side]
                continue
            if not dead:
                status[side] = ("none", 0)
                continue
            reason = got.get(f"refused_{side}") or refused.get(name, "")
            if side == "input" and blocks and spec.sparse_rows < spec.din:
                # No neighbour can lose them: the layer reads only its live inputs.
                layer = ready.get_submodule(name)
                assert isinstance(layer, FactorizedLinear)
                dead_rows = set(layer.sparse_rows.tolist())
                keep = torch.tensor(
                    [i for i in range(layer.in_features) if i not in dead_rows], dtype=torch.long
                )
                with torch.no_grad():
                    _keep_inputs(layer, keep)
                select[name] = keep
                status[side] = (f"dropped at input: {reason}", spec.sparse_rows)
            else:
                status[side] = (f"refused: {reason}", 0)
        records[name] = spec.with_elimination(status["input"], status["output"])
    return records, select


def _fold_plan(
    ready: nn.Module, names: list[str], structure: ModelStructure
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, torch.Tensor]], list]:
    """Which side of which factorized layer folds its permutation into which neighbour."""
    folded_in: dict[str, str] = {}
    folded_out: dict[str, str] = {}
    neighbour_perms: dict[str, dict[str, torch.Tensor]] = {}
    link_perms: list[tuple[Link, torch.Tensor]] = []
    for name in names:
        layer = ready.get_submodule(name)
        assert isinstance(layer, FactorizedLinear)
        for side in ("in", "out"):
            if not _needs_perm(layer, side):
                continue
            link = structure.preceding(name) if side == "in" else structure.following(name)
            if link.neighbour is None:
                continue
            nb = ready.get_submodule(link.neighbour)
            # A factorized neighbour whose own sparsity needs that side's order cannot
            # absorb ours as well.
            other = "out" if side == "in" else "in"
            if isinstance(nb, FactorizedLinear) and _needs_perm(nb, other):
                continue
            if side == "in":
                perm = _contiguous_last(layer.sparse_rows.long(), layer.in_features)
                neighbour_perms.setdefault(link.neighbour, {})["out_perm"] = perm
                folded_in[name] = link.neighbour
            else:
                perm = _contiguous_last(layer.sparse_cols.long(), layer.out_features)
                neighbour_perms.setdefault(link.neighbour, {})["in_perm"] = perm
                folded_out[name] = link.neighbour
            link_perms.append((link, perm))
    return folded_in, folded_out, neighbour_perms, link_perms


def prepare_for_export(
    model: nn.Module,
    *,
    sparse_layout: bool | str = True,
    fold_permutations: bool = True,
    eliminate_dead: bool = False,
    example_input: torch.Tensor | None = None,
) -> tuple[nn.Module, list[LayerLayout]]:
    """Copy ``model`` into the module layout that the exported graph computes.

    Parameters
    ----------
    model : nn.Module
        The model, with :class:`FactorizedLinear` layers where factorized. Not modified.
    sparse_layout : {"blocks", "zeros"} or bool
        ``"blocks"``/``True`` (default): structured-sparse factors as real smaller blocks.
        ``"zeros"``/``False``: the factors whole, zeros included (fewer ops, more bytes).
    fold_permutations : bool
        Fold the row/column permutations into neighbouring layers where possible
        (default); ``False`` always gathers at run time.
    eliminate_dead : bool
        Remove the neurons that whole zeroed rows of U / columns of V (``rr = 0``) leave
        dead, from the neighbouring Linear layers, exactly (see
        :mod:`fairdeploy.export._eliminate`). A no-op when no row/column is zeroed whole.
    example_input : torch.Tensor, optional
        A batch the model accepts: lets BatchNorm1d and flatten between layers count as
        elementwise (their meaning depends on the input's rank).

    Returns
    -------
    (nn.Module, list of LayerLayout)
        The export-ready copy (eval mode) and one layout record per factorized layer.
    """
    layout = sparse_layout_name(sparse_layout)
    blocks = layout == "blocks"
    ready = copy.deepcopy(model).eval()
    factorized = {n: m for n, m in ready.named_modules() if isinstance(m, FactorizedLinear)}
    for name, layer in factorized.items():
        _check_sparsity_record(name, layer)
    names = list(factorized)
    records = {name: _record(name, layer) for name, layer in factorized.items()}
    structure: ModelStructure | None = None
    untraced = ""
    if names and ((fold_permutations and blocks) or eliminate_dead):
        try:
            structure = analyze_structure(ready, example_input=example_input)
        except FairDeployError as exc:
            untraced = str(exc)
    select: dict[str, torch.Tensor] = {}
    if eliminate_dead and names:  # else elimination stays "off" in the records
        records, select = _eliminate(ready, records, structure, untraced, blocks=blocks)
    folded_in: dict[str, str] = {}
    folded_out: dict[str, str] = {}
    if fold_permutations and blocks and structure is not None:
        folded_in, folded_out = _fold_permutations(ready, names, structure, select)
    layouts: list[LayerLayout] = []
    for name in names:
        layouts.append(_export_layer(
            ready, records[name], blocks=blocks,
            folded_in=folded_in, folded_out=folded_out, input_select=select.get(name),
        ))
    return ready, layouts


def _fold_permutations(
    ready: nn.Module, names: list[str], structure: ModelStructure,
    select: dict[str, torch.Tensor],
) -> tuple[dict[str, str], dict[str, str]]:
    """Fold the layers' row/column permutations into their neighbours (and the
    per-feature modules between) in place, where the structure allows; return which
    layers' input and output permutations were folded, and into what.

    A neighbour that drops dead inputs itself (``select``, indices into the full-width
    features between) already reads a narrowed input: a producer's full-width output
    permutation is folded into that selection (``select[nb] = perm⁻¹[select[nb]]``), not
    into the neighbour's narrowed weights."""
    folded_in, folded_out, neighbour_perms, link_perms = _fold_plan(ready, names, structure)
    for link, perm in link_perms:
        for step in link.feature_modules:  # per-feature parameters follow the features
            assert step.module is not None
            with torch.no_grad():
                _keep_features(step.module, perm)
    for nb, perms in neighbour_perms.items():
        if nb in select and "in_perm" in perms:
            select[nb] = torch.argsort(perms.pop("in_perm"))[select[nb]]
        if perms:
            ready.set_submodule(nb, _permute_neighbour(ready.get_submodule(nb), **perms))
    return folded_in, folded_out


def _export_layer(
    ready: nn.Module, record: LayerLayout, *, blocks: bool, folded_in: Mapping[str, str],
    folded_out: Mapping[str, str], input_select: torch.Tensor | None,
) -> LayerLayout:
    """Replace the factorized layer ``record.layer`` of ``ready`` by its export module;
    return its record with the storage figures (warning when it stores no fewer
    parameters than the dense layer)."""
    name = record.layer
    layer = ready.get_submodule(name)  # may be a permuted or reduced copy
    assert isinstance(layer, FactorizedLinear)
    export = ExportFactorized(
        layer,
        sparse=blocks,
        gather_input=name not in folded_in,
        gather_output=name not in folded_out,
        input_select=input_select,
    )
    stored = sum(p.numel() for p in export.parameters())
    if stored >= record.dense_params:
        k, din, dout = record.rank, record.din, record.dout
        warnings.warn(
            f"layer {name!r}: the factorized layer stores {stored} "
            f"parameters, not fewer than the dense layer's {record.dense_params} "
            f"(rank {k}; break-even rank is {din * dout // (din + dout)}): lower the rank",
            UserWarning,
            stacklevel=3,  # the caller of prepare_for_export
        )
    row_perm = _needs_perm(layer, "in") and blocks
    col_perm = _needs_perm(layer, "out") and blocks
    in_mode = ("folded:" + folded_in[name]) if name in folded_in else "gather"
    out_mode = ("folded:" + folded_out[name]) if name in folded_out else "gather"
    ready.set_submodule(name, export)
    return dataclasses.replace(
        record,
        stored_params=stored,
        input_perm=in_mode if row_perm else "none",
        output_perm=out_mode if col_perm else "none",
    )
