"""The one per-layer export record (``LayerLayout``): its counts against hand counts, its
JSON keys, and the record from shapes (``--dry-run``) against the one the export makes."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from test_eliminate import _adjacent, _shape_only
from test_export import make_factorized, mlp_with

from fairdeploy.export import ExportOptions, LayerLayout, export_onnx
from fairdeploy.export._record import layer_record


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_first_stage_counts_by_hand():
    rec = layer_record("fc", din=10, dout=12, rank=4, keep=1, rows=2, cols=3, bias=True)
    # 5 sparsified rows/columns each lose k − keep = 3 entries.
    assert (rec.kept_rows, rec.kept_cols) == (8, 9)
    assert rec.stored_params == 10 * 4 + 4 * 12 + 12 - 15 == 85
    assert rec.nonzero_params == 10 * 4 + 4 + 4 * 12 + 12 - 15
    assert rec.paper_params == 10 * 4 + 4 * 4 + 4 * 12 + 12 - 15
    assert rec.dense_params == 10 * 12 + 12
    assert rec.sparse and rec.has_bias and not rec.dead_inputs and not rec.constant_outputs
    assert (rec.input_perm, rec.input_elimination, rec.eliminated_inputs_range) == (
        "none", "off", (0, 0))
    dead = layer_record("fc", din=10, dout=12, rank=4, keep=0, rows=2, cols=3, bias=False)
    assert dead.dead_inputs and dead.constant_outputs and not dead.has_bias
    assert dead.stored_params == 10 * 4 + 4 * 12 - 5 * 4


def test_keep_equal_to_rank_records_no_sparsity():
    """Rows recorded with keep = k zero nothing: the record counts none (the export's rule)."""
    rec = layer_record("fc", din=6, dout=5, rank=3, keep=3, rows=2, cols=1, bias=True)
    assert (rec.sparse_rows, rec.sparse_cols, rec.keep) == (0, 0, 3)
    assert not rec.sparse and not rec.dead_inputs and not rec.constant_outputs
    assert rec.stored_params == 6 * 3 + 3 * 5 + 5


def test_elimination_stage_sets_counts_and_ranges():
    rec = layer_record("fc", din=10, dout=12, rank=4, keep=0, rows=2, cols=3, bias=True)
    exact = rec.with_elimination(("removed:a", 2), ("refused: why", 0))
    assert (exact.eliminated_inputs, exact.eliminated_inputs_range) == (2, (2, 2))
    assert (exact.output_elimination, exact.eliminated_outputs_range) == ("refused: why", (0, 0))
    ranged = rec.with_elimination(("none", 0), ("removed:b", 3), outputs_range=(3, 5))
    assert ranged.eliminated_outputs_range == (3, 5)
    # A later stage (dataclasses.replace) keeps what earlier stages set.
    stored = dataclasses.replace(ranged, stored_params=7, output_perm="gather")
    assert stored.eliminated_outputs_range == (3, 5) and stored.output_elimination == "removed:b"


def test_to_dict_keys_and_order_are_the_report_columns():
    rec = layer_record("fc", din=4, dout=3, rank=2, keep=0, rows=1, cols=1, bias=True)
    assert list(rec.to_dict()) == [
        "layer", "din", "dout", "rank", "keep", "sparse_rows", "sparse_cols", "kept_rows",
        "kept_cols", "stored_params", "nonzero_params", "paper_params", "dense_params",
        "input_perm", "output_perm", "eliminated_inputs", "eliminated_outputs",
        "input_elimination", "output_elimination",
    ]


def _single(layout_rows):
    return mlp_with(make_factorized(10, 12, 4, layout_rows, [1, 5, 7], 0, seed=4)).eval()


@pytest.mark.parametrize(
    ("build", "sparse_layout"),
    [(lambda: _single([0, 3]), "blocks"), (lambda: _single([0, 3]), "zeros"),
     (lambda: _adjacent([0, 1, 2, 3], [0, 1, 2, 3]), "blocks")],
)
def test_dry_run_records_are_the_export_records(tmp_path, build, sparse_layout):
    """From shapes alone the same record comes out, storage and elimination included
    (the permutations are the export's to choose: the dry run says ``none``); where
    the count depends on which features were chosen, the export's lies in the range."""
    model = build()
    x = torch.randn(8, 6 if len(model) == 7 else 10)
    opts = ExportOptions(eliminate_dead=True, sparse_layout=sparse_layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(model, x[:4], tmp_path / "m.onnx", options=opts)
    shape = _shape_only(model, x, sparse_layout=sparse_layout)
    assert res.deployed_params == shape.params
    assert all(isinstance(r, LayerLayout) for r in (*res.layers, *shape.layers))
    unpermuted = [dataclasses.replace(r, input_perm="none", output_perm="none")
                  for r in res.layers]
    assert [r.to_dict() for r in shape.layers] == [r.to_dict() for r in unpermuted]
    for got, dry in zip(res.layers, shape.layers, strict=True):
        lo, hi = dry.eliminated_outputs_range
        assert lo <= got.eliminated_outputs <= hi
        if shape.exact:
            assert dry == dataclasses.replace(got, input_perm="none", output_perm="none")
