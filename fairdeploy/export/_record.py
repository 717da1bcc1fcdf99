"""The one per-layer export record: a factorized layer's shapes, what dead-neuron
elimination does at it and how the graph stores it.

The export fills it in stages with :func:`dataclasses.replace` as it learns more:
:func:`layer_record` (shapes and sparsity counts, what elimination planning reads), then
the elimination outcome (:mod:`fairdeploy.export._eliminate`), then the storage figures
(:mod:`fairdeploy.export._layout`). The ``--dry-run`` count (``deployed_params``) builds
the same record from the layer table and the shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["LayerLayout", "layer_record"]

#: The keys of :meth:`LayerLayout.to_dict` (``report.json`` and the ONNX metadata), in order.
_DICT_KEYS = (
    "layer", "din", "dout", "rank", "keep", "sparse_rows", "sparse_cols", "kept_rows",
    "kept_cols", "stored_params", "nonzero_params", "paper_params", "dense_params",
    "input_perm", "output_perm", "eliminated_inputs", "eliminated_outputs",
    "input_elimination", "output_elimination",
)


@dataclass(frozen=True)
class LayerLayout:
    """One factorized layer in the export: shapes, elimination outcome, storage.

    Attributes
    ----------
    layer : str
        Qualified module name.
    din, dout, rank : int
        Input features, output features and k.
    keep : int
        Entries a sparsified row/column keeps (``k`` when nothing is sparsified).
    sparse_rows, sparse_cols : int
        Number of sparsified rows of U / columns of V (0 when ``keep = k``).
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
    eliminated_inputs, eliminated_outputs : int
        Dead-neuron elimination: input features removed (with the producing layer's
        output neurons, or dropped at this layer's input) and output features removed
        (their constants folded into the next layer's bias). From shapes alone
        (``deployed_params``): the count in the case counted as ``params``.
    input_elimination, output_elimination : str
        ``"off"`` (not asked), ``"none"`` (nothing dead), ``"removed:<neighbour>"``,
        ``"dropped at input: <why the neighbour could not lose them>"`` (a Slice or
        Gather at this layer's input; the neighbour, or the model input, keeps them) or
        ``"refused: <reason>"``.
    eliminated_inputs_range, eliminated_outputs_range : tuple of int
        ``(fewest, most)`` features removed; equal to the count unless two adjacent
        factorized layers both hold sparsified rows/columns and only shapes are known
        (then the count depends on which were chosen). Given as None, set to
        ``(n, n)`` from the count. Not in :meth:`to_dict`.
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
    input_perm: str = "none"
    output_perm: str = "none"
    eliminated_inputs: int = 0
    eliminated_outputs: int = 0
    input_elimination: str = "off"
    output_elimination: str = "off"
    eliminated_inputs_range: tuple[int, int] | None = None
    eliminated_outputs_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Known exactly unless a range is given: (n, n). Always a tuple once built.
        for side in ("inputs", "outputs"):
            if getattr(self, f"eliminated_{side}_range") is None:
                n = getattr(self, f"eliminated_{side}")
                object.__setattr__(self, f"eliminated_{side}_range", (n, n))

    @property
    def has_bias(self) -> bool:
        """The layer has a bias (before any folding of constants)."""
        return self.dense_params > self.din * self.dout

    @property
    def sparse(self) -> bool:
        """Sparsified rows/columns hold zeros (keep < k)."""
        return self.keep < self.rank

    @property
    def dead_inputs(self) -> bool:
        """Whole rows of U are zero: the layer ignores those inputs."""
        return self.keep == 0 and self.sparse_rows > 0

    @property
    def constant_outputs(self) -> bool:
        """Whole columns of V are zero: those outputs are the bias."""
        return self.keep == 0 and self.sparse_cols > 0

    def with_elimination(
        self,
        inputs: tuple[str, int],
        outputs: tuple[str, int],
        *,
        inputs_range: tuple[int, int] | None = None,
        outputs_range: tuple[int, int] | None = None,
    ) -> LayerLayout:
        """The record with the elimination outcome: ``(status, removed)`` per side and,
        from shapes alone, the ``(fewest, most)`` removed (default: exactly ``removed``)."""
        return replace(
            self,
            input_elimination=inputs[0],
            eliminated_inputs=inputs[1],
            eliminated_inputs_range=inputs_range or (inputs[1], inputs[1]),
            output_elimination=outputs[0],
            eliminated_outputs=outputs[1],
            eliminated_outputs_range=outputs_range or (outputs[1], outputs[1]),
        )

    def to_dict(self) -> dict[str, int | str]:
        """The layout as a JSON-ready dict (the keys of ``report.json``, in order)."""
        return {key: getattr(self, key) for key in _DICT_KEYS}


def layer_record(
    name: str, *, din: int, dout: int, rank: int, keep: int, rows: int, cols: int, bias: bool
) -> LayerLayout:
    """The first stage of a layer's record, from its shapes and sparsity counts.

    ``rows``/``cols`` are the sparsified rows of U / columns of V as recorded; they count
    (and ``keep`` stays) only when ``keep < rank``. ``stored_params`` is what the blocks
    layout stores before any elimination; the export replaces it with what it stores.
    Permutations are ``"none"`` and elimination ``"off"`` until later stages say more.
    """
    nr, nc = (rows, cols) if keep < rank else (0, 0)
    b = dout if bias else 0
    zeroed = (nr + nc) * (rank - keep)
    return LayerLayout(
        layer=name,
        din=din,
        dout=dout,
        rank=rank,
        keep=keep if (nr or nc) else rank,
        sparse_rows=nr,
        sparse_cols=nc,
        kept_rows=din - nr,
        kept_cols=dout - nc,
        stored_params=din * rank + rank * dout + b - zeroed,
        nonzero_params=din * rank + rank + rank * dout + b - zeroed,
        paper_params=din * rank + rank * rank + rank * dout + b - zeroed,
        dense_params=din * dout + b,
    )
