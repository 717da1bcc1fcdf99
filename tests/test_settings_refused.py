"""Settings a command would ignore are refused, not accepted in silence (issue 21 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _reliability import check_contract, invoke, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_compare_refuses_export_quantize_int8(tiny, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    text = tiny.recipe.read_text().replace("export: {", "export: {quantize: int8, ")
    recipe.write_text(text.replace("path: data.npz", f"path: {tiny.data}"))
    out = invoke("compare", tiny.ckpt, "--recipe", recipe, "--out", tmp_path / "cmp",
                 "--exports", tmp_path / "exports")
    assert check_contract(out) == "error", out.text
    assert "export.quantize: int8 is read by optimize only" in out.text
    assert not (tmp_path / "cmp").exists()
