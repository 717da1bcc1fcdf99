"""A small torchvision VisionTransformer end to end on fixture images (Fitzpatrick
layout): the cut inside an encoder block, optimize, compare (all seven rows), sweep
``layer=all``, export and verification; MultiheadAttention's out_proj refused by name.

Configuration: image 32, patch 8 (16 patches + the class token = 17 tokens), 2 encoder
layers, hidden 32, MLP 64, 2 heads (``vision_transformer`` in the models registry).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from _fixtures import make_fitzpatrick
from click.testing import CliRunner

from fairdeploy.cli import main
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.features import split_model
from fairdeploy.models import build_model
from fairdeploy.recipe import parse_recipe

VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
       "mlp_dim": 64}
BLOCK0 = "encoder.layers.encoder_layer_0"
# Scoring a layer before LayerNorm/GELU/attention warns that 'exact' is the Gauss–Newton
# diagonal there (tested in tests/test_scoring.py); expected here.
pytestmark = pytest.mark.filterwarnings("ignore::fairdeploy.scoring.HessianApproximationWarning")
MLP_LAYERS = [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in (0, 1) for j in (0, 3)]


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vision_transformer", 4, **VIT).eval()
    # torchvision starts the classifier at zero (constant logits): give it weights.
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def _recipe(root: Path) -> dict:
    return {
        "model": {"arch": "vision_transformer", "num_classes": 4, "kwargs": VIT},
        "data": {"kind": "fitzpatrick17k", "root": str(root), "csv": "fitzpatrick17k.csv",
                 "images": "images", "target": "label",
                 "split": {"mode": "stratified", "train": 0.6, "val": 0.2, "test": 0.2,
                           "seed": 4242},
                 "preprocessing": {"size": 36, "crop": 32}},
        "sensitive": {"attribute": "fitzpatrick_scale",
                      "groups": {"light": [1, 2, 3], "dark": [4, 5, 6]}},
        "method": {"name": "fairlrf", "layers": [
            {"layer": f"{BLOCK0}.mlp.0", "rank": 8, "sr": 0.25, "rr": 0.0}],
            "scoring": {"samples_per_group": 8}},
        "compare": ["vanilla", "truncated_svd", "slr_w", "slr_a",
                    {"name": "fairprune", "prune_ratio": 0.35, "beta": "1/3", "layers": "all",
                     "scope": "layer"},
                    {"name": "fairquantize", "quantize_ratio": 0.2, "beta": "5/9",
                     "layers": "all", "steps": 1, "finetune_epochs": 0},
                    "fairlrf"],
        # The TorchScript exporter: the dynamo exporter takes ~3x longer on a ViT.
        "export": {"verify_samples": 8, "exporter": "torchscript", "opset": 17},
        "report": {"latency_batches": [1], "latency_warmup": 1, "latency_iterations": 3},
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vit")
    make_fitzpatrick(root, n_per_class=12)
    torch.save(_vit().state_dict(), root / "ckpt.pt")
    (root / "r.yaml").write_text(yaml.safe_dump(_recipe(root)))
    return root


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("layer", [*MLP_LAYERS, "heads.head"])
def test_vit_cut_at_every_reachable_linear_composes(layer):
    model = _vit()
    x = torch.randn(3, 3, 32, 32)
    trunk, head = split_model(model, layer, example_input=x[:2])
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), model(x), atol=1e-5, rtol=1e-5)
    if layer != "heads.head":  # inside a block: the LayerNorm output and the residual
        assert [v.shape for v in head.cut_values] == [(17, 64 if layer.endswith(".3") else 32),
                                                      (17, 32)]


def test_vit_attention_out_proj_is_refused_by_name():
    with pytest.raises(FairDeployError, match=r"out_proj.*MultiheadAttention.*functionally"):
        split_model(_vit(), f"{BLOCK0}.self_attention.out_proj")


def test_vit_fairlrf_head_on_cached_tokens_equals_the_model_and_exports(task, tmp_path):
    exp = Experiment(parse_recipe(_recipe(task)), _vit())
    fair = exp.apply(exp.recipe.method)
    full = exp.model_of(fair)
    x, _, _ = exp.test_inputs(5)
    with torch.no_grad():
        direct = full(x)
    torch.testing.assert_close(exp.logits(fair, "test")[:5], direct, atol=1e-5, rtol=1e-5)
    result = exp.export(fair, tmp_path / "m.onnx")
    (lay,) = result.layers
    # Real smaller MatMuls: rows of U and columns of V zeroed whole (rr = 0) are gone;
    # the dead MLP neurons are removed from mlp.3 across GELU (elementwise), and the
    # input side stays (LayerNorm normalizes over the features: not elementwise).
    assert (lay.kept_rows, lay.kept_cols) == (24, 48)
    assert lay.output_elimination == f"removed:{BLOCK0}.mlp.3"
    assert "LayerNorm" in lay.input_elimination and "not elementwise" in lay.input_elimination
    sizes = [int(np.prod(t.dims)) for t in onnx.load(tmp_path / "m.onnx").graph.initializer]
    # Of the four dense 32×64 MLP weights only block 1's two remain: block 0's mlp.0 is
    # two smaller MatMuls, its mlp.3 lost the 16 dead inputs.
    assert sizes.count(32 * 64) == 2 and sizes.count(32 * 48) == 1
    verdict = exp.verify(tmp_path / "m.onnx")
    assert verdict and verdict.n_samples == 8


def test_vit_optimize_cli(task):
    code, out = _invoke("optimize", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"),
                        "--out", str(task / "opt"), "--exports", str(task / "exports"),
                        "--no-latency")
    assert code == 0, out
    assert "ONNX verification" in out and "PASSED" in out
    report = (task / "opt" / "report.json").read_text()
    assert f"{BLOCK0}.mlp.0" in report and json.loads(report)


def test_vit_compare_all_seven_rows(task):
    code, out = _invoke("compare", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"),
                        "--out", str(task / "cmp"), "--exports", str(task / "exports"))
    assert code == 0, out
    assert "7 of 7 rows PASSED" in out


def test_vit_sweep_per_layer_table(task):
    code, out = _invoke("sweep", str(task / "ckpt.pt"), "--recipe", str(task / "r.yaml"),
                        "--grid", "layer=all", "--grid", "sr=0.25", "--out", str(task / "sw"),
                        "--exports", str(task / "exports"), "--no-plots")
    assert code == 0, out
    md = (task / "sw" / "sweep.md").read_text()
    assert "Per layer (the paper's Table 3)" in md
    for layer in MLP_LAYERS:
        assert f"fairlrf (layer={layer}," in md
    assert md.count("uses its weights functionally") == 2  # the two out_proj rows


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_by_name_cut_at_fc(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    trunk, head = split_model(model, "fc", example_input=x)
    with torch.no_grad():
        feats = trunk(x)
        assert feats.shape == (2, 512 if arch == "resnet18" else 2048)  # one value crosses
        torch.testing.assert_close(head(feats), model(x))
