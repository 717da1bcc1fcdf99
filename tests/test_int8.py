"""int8 export with onnxruntime.quantization: verified, int8 in the file, fairness block."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export import (
    export_onnx,
    int8_compression,
    int8_fairness,
    onnx_sizes,
    quantize_int8,
    read_metadata,
    verify_int8,
)
from fairdeploy.lrf import factorize, sparsify
from fairdeploy.metrics import bootstrap_metrics, group_metrics

BLOCKS = ("3.u_head", "3.u_tail", "3.v_kept", "3.v_head")


def _trained_factorized_mlp(x: torch.Tensor) -> nn.Module:
    """The test MLP's shape, trained for a moment on a teacher's labels (so the logits have
    margins, as a real classifier's do), its middle layer factorized (k=4) and
    structured-sparse: 3 rows of U and 4 columns of V keep 2 of 4 entries."""
    torch.manual_seed(0)
    teacher = torch.randn(10, 3)
    y = (x @ teacher).argmax(1)
    dense = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 9),
                          nn.ReLU(), nn.Linear(9, 3))
    opt = torch.optim.Adam(dense.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(dense(x), y).backward()
        opt.step()
    dense.eval()
    dense[3] = sparsify(factorize(dense[3], 4, solver="full"), 0.25, 0.5, [1, 5, 7],
                        [0, 3])
    return dense


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained, structured-sparse factorized MLP, its float export, and data."""
    tmp = tmp_path_factory.mktemp("int8")
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(1))
    model = _trained_factorized_mlp(x[:400])
    export_onnx(model, x[:2], tmp / "float.onnx")
    with torch.no_grad():
        ref = model(x).numpy()
    return tmp, model, x.numpy(), ref


def _arrays(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_export_is_int8_and_verifies(exported, mode):
    tmp, _, x, ref = exported
    res = quantize_int8(tmp / "float.onnx", tmp / f"{mode}.onnx", calibration_inputs=x[:400],
                        mode=mode)
    assert res.mode == mode and res.float_weights == ()
    assert set(BLOCKS) <= set(res.int8_weights) and {"0.weight", "5.weight"} <= set(
        res.int8_weights)
    # Really int8 in the file, and the int8 values times their per-channel scales give back
    # the float factor blocks to within half a quantization step (independent reference:
    # the float export's own tensors).
    q, f = _arrays(res.path), _arrays(tmp / "float.onnx")
    for name in BLOCKS:
        qname = next(n for n in q if n.startswith(name) and n.endswith("_quantized"))
        assert q[qname].dtype == np.int8 and name not in q  # no float copy kept
        # MatMul weights (Din × Dout): one scale per output column.
        scale = q[qname.replace("_quantized", "_scale")].reshape(1, -1)
        assert q[qname].shape == f[name].shape and scale.shape[1] == f[name].shape[1]
        assert np.all(np.abs(q[qname] * scale - f[name]) <= scale / 2 + 1e-7)
    v = verify_int8(res.path, x[400:], ref[400:])
    assert v, v.summary_lines()
    assert v.atol == pytest.approx(0.5 * ref[400:].std()) and "std" in v.atol_basis
    assert 0 < v.min_atol <= v.atol and v.argmax_agreement >= 0.98
    meta = read_metadata(res.path)
    assert meta["int8"]["mode"] == mode and meta["producer"] == "fairdeploy"


def test_auto_mode_picks_static_for_convolutions(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(64, 1, 8, 8)
    export_onnx(cnn.eval(), x[:2], tmp_path / "c.onnx")
    res = quantize_int8(tmp_path / "c.onnx", tmp_path / "c8.onnx", calibration_inputs=x.numpy())
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert res.mode == "static" and "QuantizeLinear" in ops and "ConvInteger" not in ops
    assert len(res.int8_weights) == 2 and res.calibration_samples == 64


def test_auto_mode_picks_dynamic_without_convolutions(exported):
    tmp, *_ = exported
    res = quantize_int8(tmp / "float.onnx", tmp / "auto.onnx")  # no calibration needed
    assert res.mode == "dynamic" and res.calibration_samples == 0


def test_sizes_count_int8_as_one_byte(exported):
    tmp, _, x, _ = exported
    res = quantize_int8(tmp / "float.onnx", tmp / "s8.onnx", calibration_inputs=x[:200],
                        mode="static")
    arrays = _arrays(res.path)
    sizes = onnx_sizes(res.path)
    assert sizes["initializer_bytes"] == sum(a.nbytes for a in arrays.values())
    scale_zp = [n for n in arrays if n.endswith(("_scale", "_zero_point"))]
    assert sizes["quantization_bytes"] == sum(arrays[n].nbytes for n in scale_zp)
    # Same weights and biases as the float model: quantization changes bytes, not counts.
    assert sizes["parameters"] == onnx_sizes(tmp / "float.onnx")["parameters"]
    int8 = [a for n, a in arrays.items() if a.dtype == np.int8 and n not in scale_zp]
    assert sizes["int8_parameters"] == sum(a.size for a in int8)
    cr = int8_compression(tmp / "float.onnx", tmp / "float.onnx", res.path, method_cr=1.25)
    q = sizes["int8_parameters"] / sizes["parameters"]
    assert cr.int8_fraction == pytest.approx(q)
    assert cr.theoretical_cr == pytest.approx(1.25 * 32 / (32 - 24 * q))
    float_bytes = onnx_sizes(tmp / "float.onnx")["initializer_bytes"]
    assert cr.measured_initializer_cr == pytest.approx(float_bytes / sizes["initializer_bytes"])


def test_fairness_block_matches_ort_and_group_metrics(exported):
    tmp, _, x, ref = exported
    res = quantize_int8(tmp / "float.onnx", tmp / "fair.onnx", mode="dynamic")
    test = x[400:]
    labels = ref[400:].argmax(1)
    labels[::7] = (labels[::7] + 1) % 3  # some errors, so the metrics are not trivial
    groups = np.arange(len(test)) % 2
    groups[::11] = -1
    fair = int8_fairness(tmp / "float.onnx", res.path, test, labels, groups, n_resamples=200)
    preds = {}
    for name, path in (("float", tmp / "float.onnx"), ("int8", res.path)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        preds[name] = sess.run(None, {"input": test})[0].argmax(1)
    assert fair.float_metrics.to_dict() == group_metrics(labels, preds["float"], groups,
                                                         num_classes=3).to_dict()
    assert fair.int8_metrics.to_dict() == group_metrics(labels, preds["int8"], groups,
                                                        num_classes=3).to_dict()
    boot = bootstrap_metrics(labels, preds, groups, baseline="float", num_classes=3,
                             n_resamples=200)
    assert fair.bootstrap.to_dict() == boot.to_dict()
    assert fair.changed_predictions == int((preds["float"] != preds["int8"]).sum())
    d = fair.to_dict()
    assert set(d) == {"float", "int8", "bootstrap", "changed_predictions", "n_samples"}
    assert fair.eodd_change() is fair.bootstrap.differences["int8"]["eodd"]


def test_bad_calibration_fails_verification(exported):
    tmp, _, x, ref = exported
    # Ranges calibrated on inputs 100× too small clip every real activation: must fail.
    res = quantize_int8(tmp / "float.onnx", tmp / "bad.onnx", calibration_inputs=x[:200] / 100,
                        mode="static")
    v = verify_int8(res.path, x[400:], ref[400:])
    assert not v and v.min_atol > v.atol
    assert v.summary_lines()[-1] == "FAILED"


def test_exclusions_and_bad_inputs(exported):
    tmp, _, x, ref = exported
    res = quantize_int8(tmp / "float.onnx", tmp / "ex.onnx", mode="dynamic",
                        exclude_weights=["5.weight"])
    assert res.float_weights == ("5.weight (Gemm)",) and "5.weight" not in res.int8_weights
    kept = {n: a.dtype for n, a in _arrays(res.path).items() if n.startswith("5.weight")}
    assert kept and set(kept.values()) == {np.dtype(np.float32)}  # (dynamic mode transposes)
    with pytest.raises(FairDeployError, match="needs calibration_inputs"):
        quantize_int8(tmp / "float.onnx", tmp / "x.onnx", mode="static")
    with pytest.raises(FairDeployError, match="mode='int4' is unknown"):
        quantize_int8(tmp / "float.onnx", tmp / "x.onnx", mode="int4")
    with pytest.raises(FairDeployError, match="overwrite its float source"):
        quantize_int8(tmp / "float.onnx", tmp / "float.onnx", mode="dynamic")
    with pytest.raises(FairDeployError, match=r"not weights of .*3\.u_head"):
        quantize_int8(tmp / "float.onnx", tmp / "x.onnx", mode="dynamic", exclude_weights=["nope"])
    with pytest.raises(FairDeployError, match="does not exist"):
        quantize_int8(tmp / "missing.onnx", tmp / "x.onnx", mode="dynamic")
    with pytest.raises(FairDeployError, match="one reference row per input"):
        verify_int8(res.path, x[:5], ref[:4])
    assert not (tmp / "x.onnx").exists()
