"""bench: latency measurement, layer sub-graphs, providers, the CLI command (no timed asserts)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fairdeploy.bench import extract_layer, measure_latency, measure_layer_latency
from fairdeploy.cli import main
from fairdeploy.errors import FairDeployError
from fairdeploy.export import export_onnx
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.providers import make_session, resolve_providers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 2)).eval()
    k = 4
    fact = FactorizedLinear(torch.randn(32, k), torch.rand(k), torch.randn(k, 24),
                            torch.randn(24))
    with torch.no_grad():
        fact.U[[1, 2, 3], 2:] = 0
        fact.V[2:, [0, 5]] = 0
    fact.sparse_rows, fact.sparse_cols, fact.keep = torch.tensor([1, 2, 3]), torch.tensor([0, 5]), 2
    proc = nn.Sequential(dense[0], nn.ReLU(), fact, nn.ReLU(), dense[4]).eval()
    x = torch.randn(2, 8)
    export_onnx(dense, x, tmp / "vanilla.onnx")
    export_onnx(proc, x, tmp / "proc.onnx")
    return tmp, proc


def test_measure_latency_reports_every_model_and_batch(models):
    tmp, _ = models
    res = measure_latency(tmp / "proc.onnx", tmp / "vanilla.onnx", batches=(1, 4), warmup=1,
                          iters=5, threads=1)
    assert {(t.model, t.batch) for t in res.timings} == {
        (m, b) for m in ("candidate", "baseline") for b in (1, 4)
    }
    for t in res.timings:
        assert 0 < t.median_ms <= t.p90_ms and t.iters == 5
    for b in (1, 4):
        expected = res.timing("baseline", b).median_ms / res.timing("candidate", b).median_ms
        assert res.ratios[b] == pytest.approx(expected)
    assert res.mode == "interleaved" and res.spinning is False and res.threads == 1
    assert res.provider == "CPUExecutionProvider"
    assert "spinning off" in res.summary_lines()[0]
    json.dumps(res.to_dict())


def test_a_budget_too_small_skips_the_batch_size_and_says_why(models):
    tmp, _ = models
    # One run takes far more than a microsecond: no batch size fits three runs.
    res = measure_latency(tmp / "proc.onnx", tmp / "vanilla.onnx", batches=(1, 4), warmup=0,
                          iters=5, max_seconds=1e-6, min_iters=3, skip_over_budget=True)
    assert res.timings == [] and res.ratios == {} and set(res.skipped) == {1, 4}
    assert "3 runs do not fit the 0.00 s budget" in res.skipped[1]
    assert res.summary_lines()[-1].startswith("  batch 4: not timed (one run of each model")
    assert res.to_dict()["skipped"]["1"] == res.skipped[1]
    # Without the flag a budget only shortens the runs, never below min_iters.
    kept = measure_latency(tmp / "proc.onnx", batches=(2,), warmup=0, iters=9,
                           max_seconds=1e-6, min_iters=2)
    assert [t.iters for t in kept.timings] == [2] and kept.skipped == {}


def test_a_batch_size_predicted_not_to_fit_is_skipped_before_it_runs():
    from fairdeploy.bench import _predicted_overrun

    # 2 ms a round per sample at the smaller batch → about 128 ms a round at batch 64,
    # more than a 0.1 s budget: skipped unseen. At batch 40 (80 ms) one warm-up round
    # decides instead (the linear prediction overestimates).
    why = _predicted_overrun(2e-3, 64, 3, 0.1)
    assert why.startswith("one run of each model would take about 0.13 s")
    assert "3 runs do not fit the 0.10 s budget" in why
    assert _predicted_overrun(2e-3, 40, 3, 0.1) == ""
    assert _predicted_overrun(0.0, 10**6, 3, 0.1) == ""  # nothing timed yet


def test_blocks_mode_without_baseline(models):
    tmp, _ = models
    res = measure_latency(tmp / "proc.onnx", batches=[3], warmup=0, iters=3, interleaved=False)
    assert [t.model for t in res.timings] == ["candidate"] and res.ratios == {}
    assert res.mode == "blocks"


def test_extracted_layer_computes_the_layer(models):
    tmp, proc = models
    sub = extract_layer(tmp / "proc.onnx", "2")
    ops = [n.op_type for n in onnx.load_from_string(sub).graph.node]
    assert ops.count("MatMul") == 4 and "Gemm" not in ops and "Relu" not in ops
    sess = ort.InferenceSession(sub, providers=["CPUExecutionProvider"])
    h = torch.randn(6, 32)
    # The layer's input/output features are in the folded (permuted) order: compare the
    # sub-graph with the export layout's module on the same permuted input.
    from fairdeploy.export import prepare_for_export

    ready, _ = prepare_for_export(proc)
    got = sess.run(None, {sess.get_inputs()[0].name: h.numpy()})[0]
    np.testing.assert_allclose(got, ready[2](h).detach().numpy(), rtol=1e-5, atol=1e-5)
    dense_sub = onnx.load_from_string(extract_layer(tmp / "vanilla.onnx", "2"))
    assert [n.op_type for n in dense_sub.graph.node] == ["Gemm"]


def test_layer_latency_against_dense_layer(models):
    tmp, _ = models
    res = measure_layer_latency(tmp / "proc.onnx", "2", tmp / "vanilla.onnx", batches=(2,),
                                warmup=1, iters=3)
    assert set(res.ratios) == {2} and res.label == "layer 2"


def test_unknown_layer_and_bad_options_are_user_errors(models):
    tmp, _ = models
    with pytest.raises(FairDeployError, match="has no nodes"):
        extract_layer(tmp / "proc.onnx", "classifier.9")
    with pytest.raises(FairDeployError, match="--batch"):
        measure_latency(tmp / "proc.onnx", batches=(0,))
    with pytest.raises(FairDeployError, match="does not exist"):
        measure_latency(tmp / "nope.onnx")
    with pytest.raises(FairDeployError, match="--threads"):
        make_session(tmp / "proc.onnx", threads=0)
    with pytest.raises(FairDeployError, match="--provider"):
        resolve_providers("tpu")


def test_provider_resolution_follows_onnxruntime():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if has_cuda:
        assert resolve_providers("cuda")[0] == "CUDAExecutionProvider"
    else:
        with pytest.warns(UserWarning, match="CUDAExecutionProvider is not available"):
            assert resolve_providers("cuda") == ["CPUExecutionProvider"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_providers("auto") == ["CPUExecutionProvider"]


def test_cli_bench(models, tmp_path):
    tmp, _ = models
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(tmp / "proc.onnx"), "--baseline",
                                  str(tmp / "vanilla.onnx"), "--batch", "1,2", "--iters", "3",
                                  "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "layer 2" in r.output
    assert re.search(r"proc\.onnx is \d+\.\d\d× (as fast as|slower than) vanilla\.onnx", r.output)
    payload = json.loads(out.read_text())
    assert [x["label"] for x in payload["results"]] == ["model", "layer 2"]
    r = CliRunner().invoke(main, ["bench", str(tmp / "proc.onnx"), "--batch", "a"])
    assert r.exit_code == 2 and "--batch" in r.output


def test_bench_on_a_file_that_is_not_onnx_is_one_line(tmp_path):
    from click.testing import CliRunner

    from fairdeploy.cli import main

    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04 not onnx")
    result = CliRunner().invoke(main, ["bench", str(bad), "--batch", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot be loaded by ONNX Runtime" in lines[0]


def test_a_damaged_name_scope_in_a_dynamo_export_is_no_traceback(models, tmp_path) -> None:
    """Found by the thorough property profile: a byte of a node's
    ``pkg.torch.onnx.name_scopes`` that is not UTF-8 came back from protobuf as bytes, and
    ``bench`` raised TypeError looking for the layer's nodes in it."""
    from fairdeploy.export import ExportOptions
    from fairdeploy.export._sizes import layer_table

    tmp, proc = models
    path = tmp_path / "proc.onnx"
    export_onnx(proc, torch.randn(2, 8), path, options=ExportOptions(exporter="dynamo"))
    raw = path.read_bytes()
    at = raw.index(b"name_scopes")
    at = raw.index(b"'2'", at) + 1  # the scope of the factorized layer, '2'
    path.write_bytes(raw[:at] + b"\xf2" + raw[at + 1:])
    r = CliRunner().invoke(main, ["bench", str(path), "--baseline", str(tmp / "vanilla.onnx"),
                                  "--batch", "1", "--iters", "1", "--warmup", "0"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code in (0, 1) and "Traceback" not in r.output
    assert [row["layer"] for row in layer_table(path)] == ["2"]
    # The file-level metadata damaged the same way is refused in one line.
    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == "fairdeploy.layers":
            p.value = "[not json"
    onnx.save(model, str(path))
    with pytest.raises(FairDeployError, match=r"damaged fairdeploy\.layers metadata"):
        layer_table(path)
