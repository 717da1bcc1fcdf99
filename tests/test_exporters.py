"""Both ONNX exporters (dynamo, TorchScript) give the graph contract export relies on.

For each exporter and each layout (plain factors, structured-sparse blocks with folded
permutations, run-time gathers, a nested module): factor blocks stored as their own
initializers under the parameter names, input ``input`` / output ``logits`` with a
dynamic batch axis, one file, ONNX Runtime equal to PyTorch at several batch sizes, and
the per-layer sub-graph extraction of ``fairdeploy.bench`` computing exactly the layer
(checked against the PyTorch layer on its real inputs, caught with a forward hook).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export import make_factorized, mlp_with
from torch import nn

from fairdeploy.bench import extract_layer, layer_nodes
from fairdeploy.errors import FairDeployError
from fairdeploy.export import (
    EXPORTERS,
    ExportOptions,
    export_onnx,
    prepare_for_export,
    read_metadata,
)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Conv2d(1, 2, 3)
        self.head = nn.Sequential(
            nn.Linear(2 * 4 * 4, 10), nn.ReLU(),
            make_factorized(10, 8, 4, [2, 3, 9], [0, 7], 2, seed=1), nn.ReLU(),
            nn.Linear(8, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).flatten(1))


def _case(name: str) -> tuple[nn.Module, str, torch.Tensor]:
    """(model, factorized layer name, inputs)."""
    if name == "nested":
        return Nested().eval(), "head.2", torch.randn(9, 1, 6, 6)
    if name == "gather":
        model = nn.Sequential(make_factorized(8, 6, 3, [0, 2], [1, 5], 1), nn.Sigmoid()).eval()
        return model, "0", torch.randn(9, 8)
    fact = {
        "sparse_keep2": make_factorized(12, 9, 4, [1, 5, 7], [0, 3, 8, 2], 2),
        "sparse_keep0": make_factorized(12, 9, 4, [1, 5, 7], [0, 3, 8, 2], 0),
    }[name]
    return mlp_with(fact), "3", torch.randn(9, 10)


CASES = ["sparse_keep2", "sparse_keep0", "gather", "nested"]


def _run(path_or_bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("case", CASES)
def test_exporters_graph_contract(tmp_path, case: str) -> None:
    model, layer, x = _case(case)
    ready = dict(prepare_for_export(model)[0].named_parameters())
    blocks = {n: tuple(p.shape) for n, p in ready.items() if n.startswith(layer + ".")}
    seen: dict[str, torch.Tensor] = {}
    hook = model.get_submodule(layer).register_forward_hook(
        lambda _m, i, o: seen.update(x=i[0], y=o)
    )
    with torch.no_grad():
        expected = model(x).numpy()
    hook.remove()
    stored: dict[str, dict[str, tuple[int, ...]]] = {}
    ops: dict[str, Counter] = {}
    for exporter in EXPORTERS:
        folder = tmp_path / exporter
        path = folder / "m.onnx"
        res = export_onnx(model, x[:1], path, metadata={"method": "fairlrf"},
                          options=ExportOptions(exporter=exporter))
        assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]  # one file, no .data
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        # Readable names: every stored block of the layer is an initializer named after its
        # parameter, with the parameter's shape (the structure check, made explicit).
        inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
        assert all(inits[n] == s for n, s in blocks.items() if np.prod(s) > 0)
        lay = res.layers[0]
        assert not any(np.prod(s) == lay.din * lay.dout for s in inits.values())
        stored[exporter] = {n: s for n, s in inits.items() if n.startswith(layer + ".")}
        # Input, output, dynamic batch axis.
        assert [i.name for i in m.graph.input] == ["input"]
        assert [o.name for o in m.graph.output] == ["logits"]
        for vi in (m.graph.input[0], m.graph.output[0]):
            assert vi.type.tensor_type.shape.dim[0].dim_param != ""
        assert read_metadata(path)["method"] == "fairlrf"
        for n in (1, 4, 9):
            np.testing.assert_allclose(_run(str(path), x[:n].numpy()), expected[:n],
                                       rtol=1e-4, atol=1e-5)
        # The layer's own sub-graph computes the PyTorch layer on the layer's real input.
        sub = extract_layer(path, layer)
        np.testing.assert_allclose(_run(sub, _layer_input(model, layer, seen["x"], lay)),
                                   _layer_output(seen["y"], lay, model, layer),
                                   rtol=1e-4, atol=1e-5)
        data = _data_path(m)  # constant sub-graphs (e.g. TorchScript's Pad widths) fold away
        ops[exporter] = Counter(n.op_type for n in layer_nodes(m, layer) if n.output[0] in data)
    assert stored["dynamo"] == stored["torchscript"]
    # Same computation: one MatMul per 2-D block (an empty one included), same Concats.
    for exporter in EXPORTERS:
        assert ops[exporter]["MatMul"] == sum(1 for s in blocks.values() if len(s) == 2)
        assert ops[exporter]["Concat"] == ops["dynamo"]["Concat"]


def _data_path(m: onnx.ModelProto) -> set[str]:
    """Outputs of the nodes that depend on the graph input (the rest compute constants)."""
    live = {i.name for i in m.graph.input}
    for n in m.graph.node:  # topological order
        if any(x in live for x in n.input):
            live.update(n.output)
    return live


def _folded_order(selected: torch.Tensor, dim: int) -> torch.Tensor:
    """The feature order of a folded permutation: unselected features, then the selected."""
    rest = [i for i in range(dim) if i not in set(selected.tolist())]
    return torch.tensor(rest + sorted(selected.tolist()), dtype=torch.long)


def _layer_input(model: nn.Module, layer: str, x: torch.Tensor, lay) -> np.ndarray:
    """The sub-graph's input: the layer input, permuted when the row permutation was folded
    into the previous Linear (the folded graph feeds the layer permuted features)."""
    if lay.input_perm.startswith("folded:"):
        x = x[:, _folded_order(model.get_submodule(layer).sparse_rows, lay.din)]
    return x.numpy()


def _layer_output(y: torch.Tensor, lay, model: nn.Module, layer: str) -> np.ndarray:
    if lay.output_perm.startswith("folded:"):
        y = y[:, _folded_order(model.get_submodule(layer).sparse_cols, lay.dout)]
    return y.numpy()


@pytest.mark.parametrize("simplify", [False, True])
def test_dynamo_graph_carries_module_scopes_only(tmp_path, simplify: bool) -> None:
    model, layer, x = _case("sparse_keep2")
    res = export_onnx(model, x[:2], tmp_path / "m.onnx",
                      options=ExportOptions(exporter="dynamo", simplify=simplify))
    assert res.simplified == simplify
    m = onnx.load(str(tmp_path / "m.onnx"))
    keys = {p.key for n in m.graph.node for p in n.metadata_props}
    assert keys == {"pkg.torch.onnx.name_scopes"}  # no stack traces with local paths
    assert str(tmp_path.parent) not in m.SerializeToString().decode("latin-1")
    # onnxsim drops node metadata; the scopes are put back so the layer can be extracted.
    assert Counter(n.op_type for n in layer_nodes(m, layer))["MatMul"] == 4
    assert extract_layer(tmp_path / "m.onnx", layer)


def test_exporter_choice_is_checked(tmp_path) -> None:
    model, _, x = _case("sparse_keep2")
    with pytest.raises(FairDeployError, match=r"exporter='jit' is unknown.*dynamo, torchscript"):
        export_onnx(model, x, tmp_path / "m.onnx", options=ExportOptions(exporter="jit"))
    with pytest.raises(FairDeployError, match=r"opset 17 .*dynamo.*export.exporter: torchscript"):
        export_onnx(model, x, tmp_path / "m.onnx", options=ExportOptions(opset=17))
    res = export_onnx(model, x, tmp_path / "m.onnx",
                      options=ExportOptions(opset=17, exporter="torchscript"))
    assert res.path.is_file()
    assert onnx.load(str(res.path)).opset_import[0].version == 17
    assert not (tmp_path / "m.onnx.data").exists()


def test_dynamo_failure_is_a_user_error_naming_the_line(tmp_path) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.lin(x)
            return -self.lin(x)

    with pytest.raises(FairDeployError, match=r"dynamo exporter.*if x\.sum\(\) > 0.*torchscript"):
        export_onnx(Branchy().eval(), torch.ones(2, 4), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_recipe_export_exporter_key() -> None:
    from fairdeploy.recipe import parse_recipe

    base = {
        "model": {"arch": "mlp", "num_classes": 2},
        "data": {"kind": "celeba_attributes"},
        "method": {"name": "truncated_svd", "layers": [{"layer": "layers.2", "rank": 4}]},
    }
    assert parse_recipe(base, source="r.yaml").export.exporter == "dynamo"
    ts = parse_recipe({**base, "export": {"exporter": "torchscript", "opset": 17}}, source="r.yaml")
    assert (ts.export.exporter, ts.export.opset) == ("torchscript", 17)
    with pytest.raises(FairDeployError, match=r"export\.opset: 17 is not allowed with exporter "
                       r"dynamo \(use an opset from 18 to \d+, or exporter: torchscript"):
        parse_recipe({**base, "export": {"opset": 17}}, source="r.yaml")
    with pytest.raises(FairDeployError, match=r"export\.exporter: 'jit' is not allowed"):
        parse_recipe({**base, "export": {"exporter": "jit"}}, source="r.yaml")
