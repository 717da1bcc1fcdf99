"""ONNX export: graph structure (op counts, initializer shapes), parity, sizes, metadata."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export import (
    Exporter,
    ExportOptions,
    export_onnx,
    layer_table,
    measured_cr,
    onnx_sizes,
    prepare_for_export,
    read_metadata,
    update_metadata,
    verify_npz_path,
)
from fairdeploy.lrf import FactorizedLinear


def make_factorized(din, dout, k, rows=(), cols=(), keep=None, *, bias=True, seed=0):
    """A FactorizedLinear with the sparsity record set and the entries zeroed by hand."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(din, k, generator=g)
    S = torch.rand(k, generator=g) + 0.5
    V = torch.randn(k, dout, generator=g)
    b = torch.randn(dout, generator=g) if bias else None
    f = FactorizedLinear(U, S, V, b)
    if keep is not None:
        r = torch.tensor(list(rows), dtype=torch.long)
        c = torch.tensor(list(cols), dtype=torch.long)
        with torch.no_grad():
            for i in rows:
                f.U[i, keep:] = 0
            for j in cols:
                f.V[keep:, j] = 0
        f.sparse_rows, f.sparse_cols, f.keep = r, c, keep
    return f


def mlp_with(fact, din=10, dout_head=3):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(din, fact.in_features),
        nn.ReLU(),
        nn.Dropout(0.3),
        fact,
        nn.ReLU(),
        nn.Linear(fact.out_features, dout_head),
    ).eval()


def initializers(path):
    m = onnx.load(str(path))
    return {t.name: tuple(t.dims) for t in m.graph.initializer}, Counter(
        n.op_type for n in m.graph.node
    )


def ort_run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def test_factorized_layer_exports_two_matmuls_and_bias(tmp_path):
    fact = make_factorized(12, 9, 4)
    model = mlp_with(fact)
    x = torch.randn(5, 10)
    export_onnx(model, x, tmp_path / "m.onnx")
    inits, ops = initializers(tmp_path / "m.onnx")
    assert inits["3.u"] == (12, 4) and inits["3.v"] == (4, 9) and inits["3.bias"] == (9,)
    assert not any(np.prod(s) == 12 * 9 for s in inits.values())  # no rebuilt Din×Dout
    assert ops == Counter({"Gemm": 2, "Relu": 2, "MatMul": 2, "Add": 1})
    # S is folded into U: the stored blocks multiply back to the dense weight.
    m = onnx.load(str(tmp_path / "m.onnx"))
    arr = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    np.testing.assert_allclose(
        arr["3.u"] @ arr["3.v"], fact.dense_weight().detach().numpy().T, rtol=1e-5, atol=1e-5
    )


def test_dense_model_parity_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    export_onnx(model, torch.randn(3, 6), tmp_path / "d.onnx")
    for n in (1, 7, 64):
        x = torch.randn(n, 6)
        np.testing.assert_allclose(ort_run(tmp_path / "d.onnx", x), model(x).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [0, 2])
@pytest.mark.parametrize("fold", [True, False])
def test_structured_sparse_blocks_parity(tmp_path, keep, fold):
    din, dout, k = 12, 9, 4
    rows, cols = [1, 5, 7], [0, 3, 8, 2]
    fact = make_factorized(din, dout, k, rows, cols, keep)
    model = mlp_with(fact)
    x = torch.randn(40, 10)
    res = export_onnx(model, x[:4], tmp_path / "s.onnx",
                      options=ExportOptions(fold_permutations=fold))
    inits, ops = initializers(tmp_path / "s.onnx")
    n1, m1 = din - len(rows), dout - len(cols)
    # Exactly the non-zero entries are stored (S folded into U).
    assert inits["3.u_tail"] == (n1, k - keep)
    assert inits["3.v_kept"] == (k, m1)
    if keep:
        assert inits["3.v_head"] == (keep, len(cols))
        assert inits["3.u_head"] == (din, keep)
    else:  # no zero-size block (OpenVINO refuses one): those outputs are zero-padding
        assert "3.v_head" not in inits and ops["Pad"] == 1
    nonzero_u = int((fact.U != 0).sum())
    nonzero_v = int((fact.V != 0).sum())
    stored = sum(np.prod(s) for n, s in inits.items() if n.startswith("3.") and "index" not in n)
    assert stored == nonzero_u + nonzero_v + dout
    assert res.layers[0].stored_params == stored
    assert ops["Concat"] == (2 if keep else 0)
    assert ops["Gather"] == (0 if fold else 2)
    layer = res.layers[0]
    assert layer.input_perm == ("folded:0" if fold else "gather")
    assert layer.output_perm == ("folded:5" if fold else "gather")
    np.testing.assert_allclose(ort_run(tmp_path / "s.onnx", x), model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_sparse_layer_without_neighbours_gathers(tmp_path):
    fact = make_factorized(8, 6, 3, [0, 2], [1, 5], 1)
    model = nn.Sequential(fact, nn.Sigmoid()).eval()  # no Linear on either side
    x = torch.randn(10, 8)
    res = export_onnx(model, x, tmp_path / "g.onnx")
    assert res.layers[0].input_perm == "gather" and res.layers[0].output_perm == "gather"
    np.testing.assert_allclose(ort_run(tmp_path / "g.onnx", x), model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_adjacent_sparse_layers_and_nested_module(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 2, 3)
            self.head = nn.Sequential(
                nn.Linear(2 * 4 * 4, 10), nn.ReLU(),
                make_factorized(10, 8, 4, [2, 3, 9], [0, 7], 2, seed=1), nn.ReLU(),
                make_factorized(8, 6, 3, [1, 4], [5], 0, seed=2), nn.ReLU(),
                nn.Linear(6, 2),
            )

        def forward(self, x):
            return self.head(torch.relu(self.body(x)).flatten(1))

    model = Net().eval()
    x = torch.randn(16, 1, 6, 6)
    res = export_onnx(model, x[:2], tmp_path / "n.onnx")
    lay = {r.layer: r for r in res.layers}
    # The first layer's output and the second's input both need their own order: gather.
    assert lay["head.2"].input_perm == "folded:head.0"
    assert lay["head.2"].output_perm == "gather"
    assert lay["head.4"].input_perm == "gather"
    assert lay["head.4"].output_perm == "folded:head.6"
    np.testing.assert_allclose(ort_run(tmp_path / "n.onnx", x), model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_prepare_for_export_does_not_mutate(tmp_path):
    fact = make_factorized(12, 9, 4, [1, 5], [0, 3], 1)
    model = mlp_with(fact)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    prepare_for_export(model)
    for k, v in model.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
    assert isinstance(model[3], FactorizedLinear)


def test_dense_with_zeros_layout_stores_full_factors(tmp_path):
    fact = make_factorized(12, 9, 4, [1, 5], [0, 3], 2)
    model = mlp_with(fact)
    x = torch.randn(8, 10)
    export_onnx(model, x, tmp_path / "z.onnx", options=ExportOptions(sparse_layout=False))
    inits, ops = initializers(tmp_path / "z.onnx")
    assert inits["3.u"] == (12, 4) and inits["3.v"] == (4, 9)
    assert "Concat" not in ops
    np.testing.assert_allclose(ort_run(tmp_path / "z.onnx", x), model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_larger_than_dense_warns(tmp_path):
    model = mlp_with(make_factorized(6, 5, 5))
    with pytest.warns(UserWarning, match="break-even rank"):
        export_onnx(model, torch.randn(2, 10), tmp_path / "big.onnx")


def test_inconsistent_sparsity_record_is_rejected(tmp_path):
    fact = make_factorized(8, 6, 3)
    fact.sparse_rows, fact.keep = torch.tensor([1]), 1  # entries beyond keep are not zero
    with pytest.raises(FairDeployError, match="non-zero entries beyond keep=1"):
        export_onnx(mlp_with(fact), torch.randn(2, 10), tmp_path / "bad.onnx")


def test_simplify_keeps_factors_separate(tmp_path):
    fact = make_factorized(12, 9, 4, [1, 5], [0, 3], 2)
    model = mlp_with(fact)
    x = torch.randn(8, 10)
    res = export_onnx(model, x, tmp_path / "s.onnx", options=ExportOptions(simplify=True))
    assert res.simplified
    inits, ops = initializers(tmp_path / "s.onnx")
    assert inits["3.u_head"] == (12, 2) and inits["3.v_kept"] == (4, 7)
    assert ops["MatMul"] == 4


def test_metadata_round_trip_and_update(tmp_path):
    model = mlp_with(make_factorized(12, 9, 4))
    meta = {"method": "fairlrf", "class_names": ["a", "b", "c"],
            "preprocessing": {"size": 128, "crop": 112, "mean": [0.5], "std": [0.25]},
            "theoretical_cr": 1.5}
    export_onnx(model, torch.randn(2, 10), tmp_path / "m.onnx", metadata=meta)
    got = read_metadata(tmp_path / "m.onnx")
    for key, value in meta.items():
        assert got[key] == value
    assert got["producer"] == "fairdeploy" and got["layers"][0]["rank"] == 4
    raw = onnx.load(str(tmp_path / "m.onnx"))
    assert all(p.key.startswith("fairdeploy.") for p in raw.metadata_props)
    update_metadata(tmp_path / "m.onnx", {"measured_cr": {"parameters": 1.2}})
    got = read_metadata(tmp_path / "m.onnx")
    assert got["measured_cr"] == {"parameters": 1.2} and got["method"] == "fairlrf"
    with pytest.raises(FairDeployError, match=r"metadata\['bad'\]"):
        export_onnx(model, torch.randn(2, 10), tmp_path / "x.onnx", metadata={"bad": object()})


def test_reference_npz_written_beside_model(tmp_path):
    model = mlp_with(make_factorized(12, 9, 4))
    xs = torch.randn(30, 10)
    labels, groups = np.arange(30) % 3, np.arange(30) % 2
    res = export_onnx(model, xs[:2], tmp_path / "m.onnx", reference_inputs=xs,
                      labels=labels, groups=groups)
    assert res.reference_path == verify_npz_path(tmp_path / "m.onnx")
    assert res.reference_path.name == "m.verify.npz"
    with np.load(res.reference_path) as d:
        np.testing.assert_array_equal(d["inputs"], xs.numpy())
        np.testing.assert_allclose(d["outputs"], model(xs).detach().numpy(), rtol=1e-6)
        np.testing.assert_array_equal(d["labels"], labels)
        np.testing.assert_array_equal(d["groups"], groups)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.verify.npz"]


def test_measured_sizes_match_theoretical_counts(tmp_path):
    din, dout, k = 40, 30, 6
    rows, cols = list(range(0, 40, 3)), list(range(0, 30, 4))
    fact = make_factorized(din, dout, k, rows, cols, 3)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, din), nn.ReLU(), nn.Linear(din, dout), nn.ReLU(),
                          nn.Linear(dout, 3)).eval()
    model = mlp_with(fact)
    x = torch.randn(4, 10)
    export_onnx(dense, x, tmp_path / "v.onnx")
    res = export_onnx(model, x, tmp_path / "p.onnx")
    sv, sp = onnx_sizes(tmp_path / "v.onnx"), onnx_sizes(tmp_path / "p.onnx")
    dense_total = sum(p.numel() for p in dense.parameters())
    assert sv["parameters"] == dense_total
    assert sv["initializer_bytes"] == 4 * dense_total
    # Theoretical non-zero count with S as k values (by brute force over the tensors).
    others = dense_total - (din * dout + dout)
    nonzero = others + int((fact.U != 0).sum()) + k + int((fact.V != 0).sum()) + dout
    assert abs(sp["parameters"] - nonzero) / nonzero < 0.01
    assert res.layers[0].nonzero_params == nonzero - others
    cr = measured_cr(tmp_path / "v.onnx", tmp_path / "p.onnx")
    assert cr["parameter_cr"] == pytest.approx(dense_total / sp["parameters"])
    assert cr["file_cr"] > 1.0
    table = layer_table(tmp_path / "p.onnx")
    assert table[0]["din"] == din and table[0]["kept_rows"] == din - len(rows)
    assert table[0]["kept_cols"] == dout - len(cols)
    assert table[0]["measured_params"] == table[0]["stored_params"]


def test_bad_inputs_raise_user_errors(tmp_path):
    model = mlp_with(make_factorized(12, 9, 4))
    with pytest.raises(FairDeployError, match=r"must end in \.onnx"):
        export_onnx(model, torch.randn(2, 10), tmp_path / "m.txt")
    with pytest.raises(FairDeployError, match="labels has 3 entries"):
        export_onnx(model, torch.randn(2, 10), tmp_path / "m.onnx",
                    reference_inputs=torch.randn(5, 10), labels=np.zeros(3))
    with pytest.raises(FairDeployError, match="does not exist"):
        onnx_sizes(tmp_path / "missing.onnx")


def test_export_of_vgg11_paper_is_fast_and_small(tmp_path):
    """The paper's FC-2 factorized at k=64 exports as two MatMuls (shape check only)."""
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg11_paper", 2).eval()
    k = 64  # random factors: the SVD itself is not what this test is about
    model.classifier[3] = FactorizedLinear(torch.randn(4096, k) * 0.02, torch.rand(k),
                                           torch.randn(k, 4096) * 0.02,
                                           model.classifier[3].bias.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = export_onnx(model, torch.randn(1, 3, 112, 112), tmp_path / "vgg.onnx")
    inits, _ = initializers(tmp_path / "vgg.onnx")
    assert inits["classifier.3.u"] == (4096, 64) and inits["classifier.3.v"] == (64, 4096)
    assert (4096, 4096) not in inits.values()
    assert res.layers[0].stored_params == 4096 * 64 * 2 + 4096


def _same_structure_models():
    """Two models of one structure (sparse factorized layer between Linear layers, so the
    export folds permutations and stores blocks) with different weights and different
    sparsified rows/columns (same counts), and one of another structure."""
    a = mlp_with(make_factorized(12, 9, 4, [1, 5, 7], [0, 3, 8, 2], 2, seed=0))
    b = mlp_with(make_factorized(12, 9, 4, [0, 2, 11], [1, 4, 5, 6], 2, seed=3))
    with torch.no_grad():
        for i in (0, 5):  # the dense neighbours (the factors keep their zeros)
            b[i].weight.add_(0.25)
    other = mlp_with(make_factorized(12, 9, 4, [1, 5], [0, 3, 8, 2], 2, seed=0))
    return a, b, other


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_graph_cache_reuses_a_structure_and_writes_the_same_bytes(tmp_path, exporter):
    a, b, other = _same_structure_models()
    x = torch.randn(6, 10)
    shared = Exporter(ExportOptions(exporter=exporter))
    cache = shared.graphs
    shared.export(a, x, tmp_path / "a.onnx")
    n_after_a = len(cache)
    res_b = shared.export(b, x, tmp_path / "b.onnx")
    export_onnx(b, x, tmp_path / "b_fresh.onnx", options=ExportOptions(exporter=exporter))
    if exporter == "dynamo":  # parameters stored under their own names: the graph is reused
        assert n_after_a == 1 and len(cache) == 1
    # Reused or not, the file is the one a fresh export writes, and it computes b.
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "b_fresh.onnx").read_bytes()
    np.testing.assert_allclose(ort_run(tmp_path / "b.onnx", x), b(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    assert res_b.max_abs_error is not None and res_b.max_abs_error < 1e-4
    shared.export(other, x, tmp_path / "o.onnx")
    if exporter == "dynamo":
        assert len(cache) == 2  # another structure: its own graph


def test_graph_cache_entry_that_no_longer_matches_is_exported_afresh(tmp_path):
    a, b, _ = _same_structure_models()
    x = torch.randn(6, 10)
    shared = Exporter()
    shared.export(a, x, tmp_path / "a.onnx")
    (skeleton,) = shared.graphs.values()
    # Corrupt a constant the reuse does not replace (not a parameter): the parity check
    # must catch the reused graph and fall back to tracing.
    consts = [t for t in skeleton.graph.initializer if t.HasField("raw_data") and t.raw_data]
    assert consts, "the skeleton keeps the graph's own constants"
    arr = onnx.numpy_helper.to_array(consts[0]).copy()
    consts[0].CopyFrom(onnx.numpy_helper.from_array(arr + 7, consts[0].name))
    shared.export(b, x, tmp_path / "b.onnx")
    export_onnx(b, x, tmp_path / "b_fresh.onnx")
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "b_fresh.onnx").read_bytes()


def test_measured_cr_written_with_the_export_is_the_files_own(tmp_path):
    fact = make_factorized(40, 30, 6, list(range(0, 40, 3)), list(range(0, 30, 4)), 3)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(),
                          nn.Linear(30, 3)).eval()
    x = torch.randn(4, 10)
    export_onnx(dense, x, tmp_path / "v.onnx")
    base = onnx_sizes(tmp_path / "v.onnx")
    res = Exporter().export(mlp_with(fact), x, tmp_path / "p.onnx", baseline_sizes=base)
    on_disk = onnx_sizes(tmp_path / "p.onnx")
    assert res.sizes == on_disk  # file bytes included: the entry counts itself
    expected = {
        "initializer_cr": base["initializer_bytes"] / on_disk["initializer_bytes"],
        "file_cr": base["file_bytes"] / on_disk["file_bytes"],
        "parameter_cr": base["parameters"] / on_disk["parameters"],
    }
    assert res.measured_cr == pytest.approx(expected, rel=1e-12)
    stored = read_metadata(tmp_path / "p.onnx")["measured_cr"]
    assert stored == pytest.approx(expected, abs=1e-6)
    assert res.measured_cr["file_cr"] > 1.0


def test_deferred_export_writes_the_same_bytes_when_finished(tmp_path):
    a, b, _ = _same_structure_models()
    x = torch.randn(6, 10)
    shared = Exporter()
    v = export_onnx(a, x, tmp_path / "v.onnx")
    fresh = shared.export(a, x, tmp_path / "a.onnx", defer=True)
    reused = shared.export(b, x, tmp_path / "b.onnx", defer=True, baseline_sizes=v.sizes)
    for res in (fresh, reused):  # nothing checked or written yet: the caller finishes
        assert res.max_abs_error is None and not res.path.exists()
        res.finish()
        assert res.sizes == onnx_sizes(res.path)
    export_onnx(a, x, tmp_path / "a_checked.onnx")
    Exporter().export(b, x, tmp_path / "b_checked.onnx", baseline_sizes=v.sizes)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "a_checked.onnx").read_bytes()
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "b_checked.onnx").read_bytes()
    assert read_metadata(tmp_path / "b.onnx")["measured_cr"] == pytest.approx(
        reused.measured_cr, abs=1e-6)
    for model, name in ((a, "a.onnx"), (b, "b.onnx")):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
        np.testing.assert_allclose(ort_run(tmp_path / name, x), model(x).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
