"""Every structure fairdeploy exports computes the same in every runtime.

The ONNX reference evaluator (``onnx.reference``, the specification in numpy) is the
oracle: each file runs in it, in ONNX Runtime and, when ``openvino`` is importable, in
OpenVINO, on a few inputs, and every runtime must equal ONNX Runtime within the verify
tolerances (the int8 tolerances for int8 files), and ONNX Runtime must equal PyTorch.
One helper exports, runs and compares (onnx-simplifier style), parametrized over the
structures and both exporters.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from test_export import make_factorized, mlp_with
from test_packed import ViewLinear, conv_net, make_classes
from test_packed import mlp as packed_mlp
from torch import nn

from fairdeploy.export import Exporter, ExportOptions, export_onnx, pack_weights, quantize_int8
from fairdeploy.runtimes import RUNTIMES, load_runtime, run_batched, runtime_available
from fairdeploy.verification import DEFAULT_ATOL, DEFAULT_RTOL

OTHERS = [r for r in RUNTIMES if r != "onnxruntime"]
HAVE_OPENVINO = runtime_available("openvino")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def outputs_in(path, runtime: str, x: np.ndarray) -> np.ndarray:
    return run_batched(load_runtime(path, runtime), np.ascontiguousarray(x, np.float32))[0]


def assert_runtimes_agree(path, x, *, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL) -> dict:
    """Run ``path`` in every runtime here; each equals ONNX Runtime within ``atol``/``rtol``.
    Returns the outputs per runtime (OpenVINO only when installed)."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = {"onnxruntime": outputs_in(path, "onnxruntime", x)}
    for rt in OTHERS:
        if rt == "openvino" and not HAVE_OPENVINO:
            continue
        got[rt] = outputs_in(path, rt, x)
        assert got[rt].shape == got["onnxruntime"].shape, rt
        np.testing.assert_allclose(got[rt], got["onnxruntime"], atol=atol, rtol=rtol,
                                   err_msg=f"{rt} differs from ONNX Runtime on {path.name}")
    return got


def export_and_compare(model, x, path, *, packing=None, **kw) -> tuple[dict, Counter]:
    """Export ``model`` (optionally packed), check ONNX Runtime against PyTorch and every
    runtime against ONNX Runtime; the outputs and the graph's op counts."""
    xt = torch.as_tensor(x)
    Exporter(ExportOptions(**kw)).export(model, xt[:4], path, packing=packing)
    got = assert_runtimes_agree(path, x)
    with torch.no_grad():
        ref = model(xt).numpy()
    np.testing.assert_allclose(got["onnxruntime"], ref, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return got, ops


def _vanilla():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).eval(), {}


def _factorized():
    return mlp_with(make_factorized(12, 9, 4, [1, 5, 7], [0, 3, 8, 2], 2)), {}


def _eliminated():
    """rr 0 everywhere: dead inputs dropped at the model input (Gather), dead neurons
    removed between layers, and constant logits kept at the last layer."""
    torch.manual_seed(2)
    first = make_factorized(10, 12, 4, [0, 5, 9], [1, 2], 0, seed=5)
    last = make_factorized(12, 6, 3, [3, 4], [0, 5], 0, seed=6)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), last).eval()
    return model, {"eliminate_dead": True}


def _union_is_width():
    """Issue 19 item 6: two adjacent rr-0 layers whose selections cover every feature."""
    torch.manual_seed(6)
    a = make_factorized(10, 12, 4, [0, 1], list(range(6, 12)), 0, seed=9)
    b = make_factorized(12, 8, 3, list(range(6)), [2, 5], 0, seed=10)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), a, nn.ReLU(), b, nn.ReLU(),
                         nn.Linear(8, 3)).eval(), {"eliminate_dead": True}


STRUCTURES = {
    "vanilla": (_vanilla, {}),
    "factorized-blocks": (_factorized, {"sparse_layout": "blocks"}),
    "factorized-zeros": (_factorized, {"sparse_layout": "zeros"}),
    "factorized-gathered": (_factorized, {"fold_permutations": False}),
    "eliminated": (_eliminated, {}),
    "eliminated-union-is-width": (_union_is_width, {}),
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_float_structures_compute_alike_in_every_runtime(tmp_path, structure, exporter):
    build, options = STRUCTURES[structure]
    model, more = build()
    din = next(m for m in model.modules() if hasattr(m, "in_features")).in_features
    x = np.random.default_rng(0).standard_normal((24, din)).astype(np.float32)
    _, ops = export_and_compare(model, x, tmp_path / "m.onnx", exporter=exporter,
                                **options, **more)
    if structure == "factorized-blocks":
        assert ops["Concat"] >= 2  # the blocks are really there
    if structure.startswith("eliminated"):
        # No zero-size block (a K = 0 MatMul): OpenVINO refuses such a graph.
        inits = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
        assert all(int(np.prod(t.dims)) > 0 for t in inits)


def _packed_case(kind: str):
    if kind == "conv-quantized":
        model = conv_net()
        specs = {"0.weight": make_classes(model[0], q=0.5, seed=1),
                 "2.weight": make_classes(model[2], q=0.6, seed=2)}
        return model, specs, (3, 8, 8)
    if kind == "transposed-mixed":
        model = ViewLinear().eval()
        torch.manual_seed(0)
        specs = {"a.weight": make_classes(model.a, q=0.3, p=0.4, seed=3)}
        return model, specs, (64,)
    model = packed_mlp()
    q, p = {"pruned": (0.0, 0.3), "quantized": (0.2, 0.0), "mixed": (0.25, 0.3),
            "all-pruned": (0.0, 1.0)}[kind]
    specs = {"0.weight": make_classes(model[0], q=q, p=p, seed=4),
             "2.weight": make_classes(model[2], q=q, p=p, seed=5)}
    return model, specs, (24,)


@pytest.mark.parametrize("opset", [18, 13])
@pytest.mark.parametrize(
    "kind", ["pruned", "quantized", "mixed", "all-pruned", "conv-quantized", "transposed-mixed"]
)
def test_packed_files_compute_alike_in_every_runtime(tmp_path, kind, opset):
    """Packed pruned / quantized weights (FairPrune, FairQuantize): the rebuild graph gives
    the same weights everywhere, so the logits equal ONNX Runtime's and PyTorch's. Opset
    13 (torchscript) unpacks the mask bits with a right shift and Mod, 18 with BitwiseAnd."""
    model, specs, shape = _packed_case(kind)
    x = np.random.default_rng(1).standard_normal((16, *shape)).astype(np.float32)
    got, ops = export_and_compare(model, x, tmp_path / "p.onnx", packing=specs, opset=opset,
                                  exporter="torchscript" if opset < 18 else "dynamo")
    assert ops["CumSum"] + ops["ConstantOfShape"] + ops["Cast"] >= 1  # really packed
    if kind != "all-pruned":  # one class needs no mask
        assert ops["BitwiseAnd" if opset >= 18 else "Mod"] >= 1
    assert set(got) >= {"onnxruntime", "reference"}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_files_compute_alike_in_every_runtime(tmp_path, mode):
    """int8 dynamic (MatMulInteger) and static QDQ: every runtime within the int8 verify
    tolerances of ONNX Runtime (they may round an activation differently)."""
    from fairdeploy.export._int8 import DEFAULT_INT8_ATOL_SCALE, DEFAULT_INT8_RTOL

    model = mlp_with(make_factorized(12, 9, 4, [1, 5, 7], [0, 3], 2))
    x = np.random.default_rng(2).standard_normal((64, 10)).astype(np.float32)
    export_onnx(model, torch.as_tensor(x[:4]), tmp_path / "f.onnx")
    res = quantize_int8(tmp_path / "f.onnx", tmp_path / f"{mode}.onnx",
                        calibration_inputs=x[:48], mode=mode)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    atol = DEFAULT_INT8_ATOL_SCALE * float(ref.std())
    got = assert_runtimes_agree(res.path, x, atol=atol, rtol=DEFAULT_INT8_RTOL)
    np.testing.assert_allclose(got["onnxruntime"], ref, atol=atol, rtol=DEFAULT_INT8_RTOL)


def test_pack_weights_of_a_file_agrees_with_the_dense_file_everywhere(tmp_path):
    """pack_weights on a written file (not inside export): each runtime gives the packed
    file exactly the dense file's outputs in that runtime."""
    model = packed_mlp()
    specs = {"2.weight": make_classes(model[2], q=0.3, p=0.3, seed=7)}
    x = np.random.default_rng(3).standard_normal((8, 24)).astype(np.float32)
    export_onnx(model, torch.as_tensor(x[:4]), tmp_path / "d.onnx")
    pack_weights(tmp_path / "d.onnx", specs, output_path=tmp_path / "p.onnx")
    for rt in ["onnxruntime", *OTHERS]:
        if rt == "openvino" and not HAVE_OPENVINO:
            continue
        np.testing.assert_array_equal(outputs_in(tmp_path / "p.onnx", rt, x),
                                      outputs_in(tmp_path / "d.onnx", rt, x), err_msg=rt)


# --------------------------------------------------------------------------- verify --runtime


def _shift_trick_model(tmp_path):
    """A runtime-dependent file: a MatMul whose 0/1 weights are read from packed bits with
    the old uint8 ``(x << k) >> 7`` (it needs the left shift to wrap in 8 bits: ONNX
    Runtime and the reference evaluator wrap, OpenVINO does not). Its .verify.npz holds
    the outputs of the true weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, size=24).astype(np.uint8)
    w = bits.reshape(8, 3).astype(np.float32)
    inits = [numpy_helper.from_array(np.packbits(bits).reshape(-1, 1), "packed"),
             numpy_helper.from_array(np.arange(8, dtype=np.uint8), "shifts"),
             numpy_helper.from_array(np.array(7, np.uint8), "seven"),
             numpy_helper.from_array(np.array([8, 3]), "shape")]
    nodes = [helper.make_node("BitShift", ["packed", "shifts"], ["l"], direction="LEFT"),
             helper.make_node("BitShift", ["l", "seven"], ["r"], direction="RIGHT"),
             helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "shape"], ["w"]),
             helper.make_node("MatMul", ["input", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "shift_trick",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    path = tmp_path / "trick.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = rng.standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "trick.verify.npz", inputs=x, outputs=x @ w,
             labels=np.arange(40) % 3, groups=np.arange(40) % 2)
    return path


def test_verify_in_several_runtimes_gives_one_verdict_each(tmp_path):
    from click.testing import CliRunner

    from fairdeploy.cli import main

    model, _ = _vanilla()
    x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0))
    export_onnx(model, x[:2], tmp_path / "m.onnx", reference_inputs=x,
                labels=np.arange(60) % 3, groups=np.arange(60) % 2)
    asked = "onnxruntime,reference" + (",openvino" if HAVE_OPENVINO else "")
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"), "--runtime", asked,
                                  "--runtime", "reference", "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    names = asked.split(",")
    assert r.output.splitlines()[-1] == f"PASSED in every runtime: {', '.join(names)}"
    for rt in names:
        assert f"== {rt} ==" in r.output and f"PASSED in {rt}: " in r.output
    import json

    report = json.loads((tmp_path / "v.json").read_text())
    assert report["verified_in"] == names and report["passed"]
    per = report["runtimes"]
    assert per["reference"]["runtime"] == "reference" and per["reference"]["n_samples"] == 60
    # The same predictions give the same group fairness in each runtime.
    assert per["reference"]["fairness"] == per["onnxruntime"]["fairness"] is not None


def test_verify_fails_in_the_runtime_that_computes_a_file_differently(tmp_path):
    from click.testing import CliRunner

    from fairdeploy.cli import main
    from fairdeploy.verification import verify, verify_runtimes

    path = _shift_trick_model(tmp_path)
    assert verify(path, runtime="onnxruntime") and verify(path, runtime="reference")
    if not HAVE_OPENVINO:
        pytest.skip("openvino is not installed")
    res = verify_runtimes(path, ["onnxruntime", "openvino"])
    assert not res and res.verified_in == ["onnxruntime"] and res.failed_in == ["openvino"]
    assert res.results["openvino"].outputs[0].max_abs_error > 0.5
    r = CliRunner().invoke(main, ["verify", str(path), "--runtime", "openvino"])
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith("FAILED in openvino")


def test_missing_openvino_and_unknown_runtimes_are_one_line_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fairdeploy.cli import main

    path = _shift_trick_model(tmp_path)
    r = CliRunner().invoke(main, ["verify", str(path), "--runtime", "tensorrt"])
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: --runtime: 'tensorrt' is not a runtime fairdeploy can verify in: use one or "
        "more of onnxruntime, openvino, reference")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    r = CliRunner().invoke(main, ["verify", str(path), "--runtime", "reference,openvino"])
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: runtime 'openvino' needs the openvino package, which is not installed: pip "
        "install 'fairdeploy[openvino]' (or pip install openvino; about 100 MB)")
