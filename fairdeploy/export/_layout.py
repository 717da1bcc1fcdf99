"""The export layout: a copy of the model whose modules compute exactly the ONNX graph we ship.

A :class:`~fairdeploy.lrf.FactorizedLinear` becomes :class:`ExportFactorized`, which holds
the factor blocks that are really stored (S folded into U, structured-sparse rows and
columns cut out as smaller blocks) and computes with ``Slice`` + ``MatMul`` + ``Concat``.
The permutations that make the sparsified rows/columns contiguous are folded into the
neighbouring ``nn.Linear`` (or factorized) layer of the same ``nn.Sequential`` when only
elementwise modules lie between; otherwise the layer gathers its input/output at run time.

Why this layout: measured on ONNX Runtime (CPU), a run-time ``Gather`` made a sparse layer
0.4–1.0× as fast as simply storing the zeros, while ``Slice`` after a folded permutation
reached the theoretical speed-up (DESIGN.md §5).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizedLinear

__all__ = ["ELEMENTWISE_MODULES", "ExportFactorized", "LayerLayout", "prepare_for_export"]

#: Modules that act on each feature independently and identically, so a permutation of
#: the feature axis commutes with them (Dropout is the identity in eval mode).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Identity,
)


@dataclass(frozen=True)
class LayerLayout:
    """How one factorized layer is stored in the exported graph.

    Attributes
    ----------
    layer : str
        Qualified module name.
    din, dout, rank : int
        Input features, output features and k.
    keep : int
        Entries a sparsified row/column keeps (``k`` when nothing is sparsified).
    sparse_rows, sparse_cols : int
        Number of sparsified rows of U / columns of V.
    kept_rows, kept_cols : int
        Rows of U / columns of V stored whole (``din − sparse_rows``, ``dout − sparse_cols``).
    stored_params : int
        Parameters the graph stores for the layer (factor blocks, S folded in, bias).
    nonzero_params : int
        Non-zero count with S as k values: ``din·k + k + k·dout + bias − zeroed``.
    paper_params : int
        The paper's count: ``din·k + k·k + k·dout + bias − zeroed`` (DESIGN.md §4).
    dense_params : int
        ``din·dout + bias``, what ``nn.Linear`` stores.
    input_perm, output_perm : str
        ``"none"``, ``"folded:<layer>"`` (folded into that neighbour's weights) or
        ``"gather"`` (a run-time Gather).
    """

    layer: str
    din: int
    dout: int
    rank: int
    keep: int
    sparse_rows: int
    sparse_cols: int
    kept_rows: int
    kept_cols: int
    stored_params: int
    nonzero_params: int
    paper_params: int
    dense_params: int
    input_perm: str
    output_perm: str

    def to_dict(self) -> dict[str, int | str]:
        """The layout as a JSON-ready dict."""
        return asdict(self)


class ExportFactorized(nn.Module):
    """A factorized layer in its export layout: only the stored blocks, S folded into U.

    With ``R`` the sparsified rows of U (moved last by ``input_perm``, ``n1 = Din − |R|``),
    ``C`` the sparsified columns of V (moved last by ``output_perm``, ``m1 = Dout − |C|``)
    and ``q = keep``::

        z  = concat(x @ U'[:, :q], x[..., :n1] @ U'[:n1, q:])     (U' = (U · S)[input_perm])
        o  = concat(z @ V[:, C̄], z[..., :q] @ V[:q, C]) + b[output_perm]

    When nothing is sparsified it is ``(x @ U') @ V + b``: two MatMuls and the bias.
    """

    def __init__(
        self,
        layer: FactorizedLinear,
        *,
        sparse: bool,
        gather_input: bool,
        gather_output: bool,
    ) -> None:
        super().__init__()
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
            # q = 0 gives a (0 × |C|) block: a K=0 MatMul yields the zeros those outputs hold.
            self.v_head = nn.Parameter(Vp[:q, self.m1 :].contiguous())
        if layer.bias is not None:
            b = layer.bias.detach()
            self.bias = nn.Parameter((b[out_perm] if self.col_sparse else b).contiguous())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the layer from its stored blocks."""
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


def _layout_counts(layer: FactorizedLinear) -> dict[str, int]:
    din, dout, k, q = layer.in_features, layer.out_features, layer.rank, int(layer.keep)
    nr, nc = (layer.sparse_rows.numel(), layer.sparse_cols.numel()) if q < k else (0, 0)
    bias = dout if layer.bias is not None else 0
    zeroed = (nr + nc) * (k - q)
    return {
        "din": din,
        "dout": dout,
        "rank": k,
        "keep": q if (nr or nc) else k,
        "sparse_rows": nr,
        "sparse_cols": nc,
        "kept_rows": din - nr,
        "kept_cols": dout - nc,
        "stored_params": din * k + k * dout + bias - zeroed,
        "nonzero_params": din * k + k + k * dout + bias - zeroed,
        "paper_params": din * k + k * k + k * dout + bias - zeroed,
        "dense_params": din * dout + bias,
    }


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


def _find_neighbour(
    seq: nn.Sequential, names: list[str], i: int, step: int, side: str
) -> int | None:
    """Index of the Linear that feeds (step −1) / consumes (step +1) child ``i`` through
    elementwise modules only, if it can take a permutation on that side."""
    j = i + step
    while 0 <= j < len(names):
        child = seq[j]
        if isinstance(child, nn.Linear):
            return j
        if isinstance(child, FactorizedLinear):
            # Its own sparsity needs that side's order: it cannot absorb ours as well.
            return None if _needs_perm(child, "out" if step < 0 else "in") else j
        if not isinstance(child, ELEMENTWISE_MODULES):
            return None
        j += step
    return None


def prepare_for_export(
    model: nn.Module, *, sparse_layout: bool = True, fold_permutations: bool = True
) -> tuple[nn.Module, list[LayerLayout]]:
    """Copy ``model`` into the module layout that the exported graph computes.

    Parameters
    ----------
    model : nn.Module
        The model, with :class:`FactorizedLinear` layers where factorized. Not modified.
    sparse_layout : bool
        Store structured-sparse factors as real smaller blocks (default). ``False`` stores
        the factors whole, zeros included (the "dense with zeros" baseline for benchmarks).
    fold_permutations : bool
        Fold the row/column permutations into neighbouring layers where possible
        (default); ``False`` always gathers at run time.

    Returns
    -------
    (nn.Module, list of LayerLayout)
        The export-ready copy (eval mode) and one layout record per factorized layer.
    """
    ready = copy.deepcopy(model).eval()
    factorized = {n: m for n, m in ready.named_modules() if isinstance(m, FactorizedLinear)}
    for name, layer in factorized.items():
        _check_sparsity_record(name, layer)
    # Which side of which factorized layer is folded into which neighbour.
    folded_in: dict[str, str] = {}
    folded_out: dict[str, str] = {}
    neighbour_perms: dict[str, dict[str, torch.Tensor]] = {}
    if fold_permutations and sparse_layout:
        for seq_name, seq in ready.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            names = [n for n, _ in seq.named_children()]
            for i, child_name in enumerate(names):
                child = seq[i]
                if not isinstance(child, FactorizedLinear):
                    continue
                full = f"{seq_name}.{child_name}" if seq_name else child_name
                for side, step in (("in", -1), ("out", +1)):
                    if not _needs_perm(child, side):
                        continue
                    j = _find_neighbour(seq, names, i, step, side)
                    if j is None:
                        continue
                    nb = f"{seq_name}.{names[j]}" if seq_name else names[j]
                    if side == "in":
                        perm = _contiguous_last(child.sparse_rows.long(), child.in_features)
                        neighbour_perms.setdefault(nb, {})["out_perm"] = perm
                        folded_in[full] = nb
                    else:
                        perm = _contiguous_last(child.sparse_cols.long(), child.out_features)
                        neighbour_perms.setdefault(nb, {})["in_perm"] = perm
                        folded_out[full] = nb
    for nb, perms in neighbour_perms.items():
        ready.set_submodule(nb, _permute_neighbour(ready.get_submodule(nb), **perms))
    layouts: list[LayerLayout] = []
    for name in factorized:
        layer = ready.get_submodule(name)  # may be a permuted copy
        counts = _layout_counts(layer)
        if not sparse_layout:
            counts["stored_params"] = counts["dense_params"] - counts["din"] * counts["dout"] + (
                counts["din"] * counts["rank"] + counts["rank"] * counts["dout"]
            )
        if counts["stored_params"] >= counts["dense_params"]:
            k, din, dout = counts["rank"], counts["din"], counts["dout"]
            warnings.warn(
                f"layer {name!r}: the factorized layer stores {counts['stored_params']} "
                f"parameters, not fewer than the dense layer's {counts['dense_params']} "
                f"(rank {k}; break-even rank is {din * dout // (din + dout)}): lower the rank",
                UserWarning,
                stacklevel=2,
            )
        row_perm = _needs_perm(layer, "in") and sparse_layout
        col_perm = _needs_perm(layer, "out") and sparse_layout
        in_mode = ("folded:" + folded_in[name]) if name in folded_in else "gather"
        out_mode = ("folded:" + folded_out[name]) if name in folded_out else "gather"
        layouts.append(
            LayerLayout(
                layer=name,
                input_perm=in_mode if row_perm else "none",
                output_perm=out_mode if col_perm else "none",
                **counts,
            )
        )
        ready.set_submodule(
            name,
            ExportFactorized(
                layer,
                sparse=sparse_layout,
                gather_input=name not in folded_in,
                gather_output=name not in folded_out,
            ),
        )
    return ready, layouts
