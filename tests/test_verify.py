"""verify(): checker, tolerances, tampered models, fairness of ONNX outputs, the CLI command."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from fairdeploy.cli import main
from fairdeploy.errors import FairDeployError
from fairdeploy.export import export_onnx
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.verification import Reference, load_reference, reference_from_model, verify


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    g = torch.Generator().manual_seed(0)
    fact = FactorizedLinear(torch.randn(16, 4, generator=g), torch.rand(4, generator=g) + 0.5,
                            torch.randn(4, 12, generator=g), torch.randn(12, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), fact, nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(200, 8, generator=g)
    labels = np.arange(200) % 3
    groups = (np.arange(200) // 3) % 2
    export_onnx(model, x[:2], tmp / "m.onnx", reference_inputs=x, labels=labels, groups=groups)
    return tmp / "m.onnx", model, x, labels, groups


def _tamper(src, dst, name, delta):
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[0] += delta
            t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(m, str(dst))


def test_verify_passes_with_default_reference(exported):
    path = exported[0]
    res = verify(path)
    assert res and res.passed and res.checker_ok
    out = res.outputs[0]
    assert out.argmax_agreement == 1.0
    assert out.max_abs_error < 1e-4
    assert out.min_atol <= out.atol
    assert res.summary_lines()[-1].startswith("PASSED")


def test_verify_errors_match_an_independent_computation(exported):
    path, model, x, _, _ = exported
    ref = reference_from_model(model, x.numpy())
    outputs = ref.outputs + 1e-3  # shift the reference by a known amount
    res = verify(path, reference=Reference(ref.inputs, outputs), atol=1e-4, rtol=0.0)
    import onnxruntime as ort

    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0].astype(np.float64)
    diff = np.abs(got - outputs)
    assert res.outputs[0].max_abs_error == pytest.approx(diff.max(), rel=1e-9)
    assert res.outputs[0].min_atol == pytest.approx(diff.max(), rel=1e-9)
    assert not res  # 1e-3 > atol 1e-4
    # With the minimum tolerance it reports, the same comparison passes.
    res2 = verify(path, reference=Reference(ref.inputs, outputs),
                  atol=res.outputs[0].min_atol * 1.001, rtol=0.0)
    assert res2


def test_tampered_initializer_fails_verify_and_cli_exits_1(exported, tmp_path):
    path, *_ = exported
    bad = tmp_path / "bad.onnx"
    _tamper(path, bad, "2.u", 5.0)
    res = verify(bad, reference=path.with_name("m.verify.npz"))
    assert not res
    assert res.outputs[0].max_abs_error > 1e-2
    r = CliRunner().invoke(main, ["verify", str(bad), "--reference",
                                  str(path.with_name("m.verify.npz"))])
    assert r.exit_code == 1
    assert "FAILED" in r.output.splitlines()[-1]


def test_cli_verify_passes_and_reports_fairness(exported, tmp_path):
    path, _, x, labels, groups = exported
    r = CliRunner().invoke(main, ["verify", str(path), "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].startswith("PASSED")
    res = verify(path)
    if res.fairness is None:  # fairdeploy.metrics not yet in the tree
        pytest.skip(res.fairness_note)
    # Fairness is computed from ONNX Runtime's predictions: check EOpp1 by hand.
    import onnxruntime as ort

    pred = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0].argmax(1)
    gaps = []
    for c in range(3):
        tpr = [np.mean(pred[(labels == c) & (groups == gr)] == c) for gr in (0, 1)]
        gaps.append(abs(tpr[1] - tpr[0]))
    assert res.fairness["fairness"]["eopp1"] == pytest.approx(np.mean(gaps))
    assert f"EOpp1 {np.mean(gaps):.3f}" in r.output


def test_reference_errors_are_user_errors(exported, tmp_path):
    path, *_ = exported
    with pytest.raises(FairDeployError, match="does not exist"):
        verify(path, reference=tmp_path / "none.npz")
    np.savez(tmp_path / "partial.npz", inputs=np.zeros((2, 8), np.float32))
    with pytest.raises(FairDeployError, match="lacks array"):
        load_reference(tmp_path / "partial.npz")
    with pytest.raises(FairDeployError, match="--atol"):
        verify(path, atol=-1.0)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 1
    assert r.output.strip().startswith("Error: ONNX model")
    assert "Traceback" not in r.output


def test_checker_failure_fails_verify(exported, tmp_path):
    path, *_ = exported
    m = onnx.load(str(path))
    # A recorded shape that contradicts inference: ONNX Runtime still runs it (and the
    # outputs still match), but the full check fails, so verify must fail.
    relu_out = next(n.output[0] for n in m.graph.node if n.op_type == "Relu")
    m.graph.value_info.add().CopyFrom(
        onnx.helper.make_tensor_value_info(relu_out, onnx.TensorProto.FLOAT, ["batch", 99])
    )
    bad = tmp_path / "broken.onnx"
    onnx.save(m, str(bad))
    res = verify(bad, reference=path.with_name("m.verify.npz"))
    assert res.outputs[0].passed
    assert not res.checker_ok and not res
    assert "ShapeInferenceError" in res.checker_message


def test_unloadable_model_is_a_user_error(exported, tmp_path):
    path, *_ = exported
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(FairDeployError, match="is not an ONNX model"):
        verify(bad, reference=path.with_name("m.verify.npz"))


@pytest.mark.parametrize("bad", ["all", "one"])
def test_a_non_finite_reference_is_refused_not_failed_with_zero_errors(exported, bad):
    """Issue 21 item 14: an all-NaN reference gave FAILED with 'max relative 0' and
    'smallest atol 0'."""
    path, model, x, _, _ = exported
    ref = reference_from_model(model, x.numpy())
    outputs = ref.outputs.copy()
    if bad == "all":
        outputs[:] = np.nan
    else:
        outputs[3, 1] = np.inf
    count = outputs.size if bad == "all" else 1
    with pytest.raises(FairDeployError, match=rf"holds {count:,} non-finite value"):
        verify(path, reference=Reference(ref.inputs, outputs))


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_non_finite_outputs_fail_as_strict_json_and_a_readable_report(exported, tmp_path, value):
    """An export whose outputs are not finite: verify fails, ``--json`` is strict JSON (the
    errors are null, ``finite`` false: JSON has no inf) and the report line says so."""
    import json

    from fairdeploy.recipe._sections import Tolerances
    from fairdeploy.report import verify_summary
    from fairdeploy.report._render import _verify_line

    path, *_ = exported
    bad = tmp_path / "bad.onnx"
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == "2.u")
    arr = numpy_helper.to_array(t).copy()
    arr[:] = value  # every logit downstream becomes non-finite
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(m, str(bad))
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["verify", str(bad), "--reference",
                                  str(path.with_name("m.verify.npz")), "--json", str(out)])
    assert r.exit_code == 1 and "not finite" in r.output
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    [row] = data["outputs"]
    assert row["finite"] is False and row["max_abs_error"] is None and not data["passed"]
    res = verify(bad, reference=path.with_name("m.verify.npz"))
    block = verify_summary(res, Tolerances())
    json.dumps(block, allow_nan=False)  # report.json is written strictly
    assert block["max_abs_error"] is None
    assert "max |Δ| not finite" in _verify_line(block)
