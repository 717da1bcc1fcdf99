"""``optimize`` with rr = 0: the shipped model has the dead neurons removed, still passes
``verify`` against PyTorch's outputs, and the shape-only count predicts what it stores."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch
from test_cli_pipeline import RECIPE, _invoke, _make_data

from fairdeploy.compression import layer_table
from fairdeploy.export import deployed_params, read_metadata
from fairdeploy.models import build_model
from fairdeploy.plan import LayerPlan, Plan


@pytest.mark.parametrize("eliminate", [True, False])
def test_optimize_rr0_eliminates_and_verifies(tmp_path: Path, eliminate: bool) -> None:
    _make_data(tmp_path / "data.npz", n=600)
    text = RECIPE.format(data="data.npz", method="fairlrf", layer="layers.2", rank=8)
    flag = str(eliminate).lower()
    text = text.replace("rr: 0.5", "rr: 0").replace(
        "export: {verify_samples: 200}",
        f"export: {{verify_samples: 150, simplify: false, eliminate_dead: {flag}}}",
    ).replace("epochs: 4", "epochs: 1")
    (tmp_path / "recipe.yaml").write_text(text)
    code, out = _invoke("train", "--recipe", str(tmp_path / "recipe.yaml"),
                        "-o", str(tmp_path / "ckpt.pt"))
    assert code == 0, out
    code, out = _invoke("optimize", str(tmp_path / "ckpt.pt"), "--recipe",
                        str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"),
                        "--exports", str(tmp_path / "exports"), "--no-cache")
    assert code == 0, out
    assert re.search(r"ONNX verification .*: PASSED", out), out
    path = tmp_path / "run" / "model.onnx"
    inits = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    dead = 8  # ⌊0.25·32⌋ rows of U and columns of V, zeroed whole
    live = 32 - dead if eliminate else 32
    assert inits["layers.0.weight"] == (live, 8)
    assert inits["layers.4.weight"] == (3, live)
    meta = read_metadata(path)
    assert meta["deployed"]["eliminate_dead"] is eliminate
    layer = meta["layers"][0]
    assert layer["eliminated_inputs"] == (dead if eliminate else 0)
    # The dry-run count from shapes equals what the file stores (no BatchNorm here).
    with torch.device("meta"):
        model = build_model("mlp", 3, in_features=8, widths=[32, 32])
    plan = Plan("fairlrf", layers=(LayerPlan("layers.2", 8, 0.25, 0.0, 5 / 9),))
    shape = deployed_params(model, layer_table(model, plan), eliminate=eliminate)
    assert shape.params == meta["deployed"]["deployed_params"]
    assert shape.params == meta["deployed"]["stored_float_elements"]
    assert shape.ratio == pytest.approx(meta["deployed"]["deployed_cr"])
