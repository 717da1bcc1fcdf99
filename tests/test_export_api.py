"""The user-facing export: ``export_onnx``'s short signature, ``ExportOptions`` checked
when built, and the recipe's settings reaching the internal ``Exporter`` that commands use."""

from __future__ import annotations

import inspect

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export import Exporter, ExportOptions, export_onnx, read_metadata
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.verification import verify

#: What only compare needs for speed: never part of the user's signature.
_INTERNAL = {"graph_cache", "defer", "baseline_sizes", "reference_outputs", "packing",
             "reference_max_bytes"}


def _sparse_mlp() -> nn.Module:
    """Linear → ReLU → a factorized layer with whole zeroed rows (rr = 0) → ReLU → Linear."""
    g = torch.Generator().manual_seed(0)
    fact = FactorizedLinear(torch.randn(12, 4, generator=g), torch.rand(4, generator=g) + 0.5,
                            torch.randn(4, 9, generator=g), torch.randn(9, generator=g))
    rows, cols = [0, 5, 7], [2, 3]
    with torch.no_grad():
        fact.U[rows, :] = 0
        fact.V[:, cols] = 0
    fact.sparse_rows, fact.sparse_cols, fact.keep = torch.tensor(rows), torch.tensor(cols), 0
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), fact, nn.ReLU(), nn.Linear(9, 3)).eval()


def test_export_onnx_has_a_short_signature_and_writes_a_verified_file(tmp_path):
    params = inspect.signature(export_onnx).parameters
    assert len(params) <= 8, list(params)
    assert list(params)[:3] == ["model", "example_input", "path"]
    assert not _INTERNAL & set(params)

    model = _sparse_mlp()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    labels = np.arange(64) % 3
    groups = np.arange(64) % 2
    res = export_onnx(
        model, x[:2], tmp_path / "m.onnx", metadata={"method": "fairlrf"},
        reference_inputs=x, labels=labels, groups=groups,
        options=ExportOptions(eliminate_dead=True, sparse_layout="blocks"),
    )
    assert res.path.is_file() and res.reference_path == tmp_path / "m.verify.npz"
    assert res.max_abs_error is not None and res.max_abs_error < 1e-4
    assert res.finish is None and res.eliminate_dead and res.sparse_layout == "blocks"
    # U's 3 zeroed rows and V's 2 zeroed columns leave those features dead: removed.
    assert res.eliminated == {"2": {"inputs": 3, "outputs": 2}}
    # Independently of fairdeploy: ONNX Runtime on the file against PyTorch.
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    verdict = verify(res.path)
    assert verdict and verdict.n_samples == 64
    assert read_metadata(res.path)["method"] == "fairlrf"


def test_export_options_are_checked_when_built():
    assert ExportOptions(sparse_layout=False).sparse_layout == "zeros"
    assert ExportOptions(sparse_layout=True).sparse_layout == "blocks"
    with pytest.raises(FairDeployError, match="exporter='jit' is unknown"):
        ExportOptions(exporter="jit")
    with pytest.raises(FairDeployError, match="opset 17 is not available with the dynamo"):
        ExportOptions(opset=17)
    with pytest.raises(FairDeployError, match="sparse_layout='sparse'"):
        ExportOptions(sparse_layout="sparse")


def test_a_one_shot_export_keeps_no_graphs_and_an_exporter_writes_the_same_bytes(tmp_path):
    model = _sparse_mlp()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    assert Exporter(reuse_graphs=False).graphs is None
    shared = Exporter(ExportOptions(eliminate_dead=True))
    shared.export(model, x, tmp_path / "first.onnx")
    shared.export(model, x, tmp_path / "reused.onnx")
    export_onnx(model, x, tmp_path / "plain.onnx", options=ExportOptions(eliminate_dead=True))
    assert len(shared.graphs) == 1
    plain = (tmp_path / "plain.onnx").read_bytes()
    assert (tmp_path / "reused.onnx").read_bytes() == plain
    assert (tmp_path / "first.onnx").read_bytes() == plain


def test_experiment_exporter_carries_the_recipe_export_settings(tmp_path):
    from fairdeploy.experiment import Experiment
    from fairdeploy.recipe import parse_recipe

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 6)).astype(np.float32),
             y=rng.integers(0, 3, 40), group=rng.integers(0, 2, 40),
             split=np.array(["train", "val", "test", "test"] * 10))
    recipe = parse_recipe({
        "model": {"arch": "mlp", "num_classes": 3, "kwargs": {"in_features": 6, "widths": [8]}},
        "data": {"kind": "npz", "path": str(tmp_path / "d.npz"), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "vanilla"},
        "export": {"opset": 19, "exporter": "torchscript", "simplify": False,
                   "sparse_layout": "zeros", "eliminate_dead": False, "verify_npz_max_mb": 0.5,
                   "tolerances": {"atol": 2e-4, "rtol": 3e-3}},
    })
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    exporter = Experiment(recipe, model).exporter()
    assert exporter.options == ExportOptions(
        sparse_layout="zeros", eliminate_dead=False, simplify=False, exporter="torchscript",
        opset=19, atol=2e-4, rtol=3e-3,
    )
    assert exporter.reference_max_bytes == 500_000 and exporter.graphs == {}
