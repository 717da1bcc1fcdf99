"""Recipes that import code need an explicit opt-in, checked before importing (issue 21
item 15). A module on the import path writes a marker file when imported: the marker
must not appear unless the recipe is trusted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from fairdeploy._trust import TRUST_ENV, check_import_allowed, trusting_recipes
from fairdeploy.errors import FairDeployError
from fairdeploy.methods import get_method
from fairdeploy.models import build_model
from fairdeploy.recipe import load_recipe, parse_recipe

PLUGIN = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

def factory(num_classes, **kw):
    import torch
    return torch.nn.Linear(4, num_classes)

class Thing:
    pass
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module with a side effect at import, on sys.path, under a fresh name."""
    name = f"evil_plugin_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    yield name, marker
    sys.modules.pop(name, None)


def _recipe(**over) -> dict:
    recipe = {
        "model": {"arch": "mlp", "num_classes": 3,
                  "kwargs": {"in_features": 8, "widths": [32, 32]}},
        "data": {"kind": "npz", "path": "data.npz", "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}]},
    }
    recipe.update(over)
    return recipe


def _refused(call, marker: Path) -> str:
    with pytest.raises(FairDeployError) as info:
        call()
    msg = str(info.value)
    assert "--trust-recipe" in msg and TRUST_ENV in msg and "\n" not in msg
    assert not marker.exists(), "the module was imported before the refusal"
    return msg


def test_every_way_a_recipe_names_code_is_refused_before_importing(
    plugin: tuple[str, Path], tmp_path: Path
) -> None:
    name, marker = plugin
    cases = [
        lambda: get_method(f"{name}:Thing"),
        lambda: build_model(f"{name}:factory", 3),
        lambda: parse_recipe(_recipe(method={"name": f"{name}:Thing"}), source="r.yaml"),
        lambda: parse_recipe(_recipe(model={"arch": f"{name}:factory", "num_classes": 3}),
                             source="r.yaml"),
        lambda: parse_recipe(_recipe(compare=["vanilla", {"name": f"{name}:Thing"}]),
                             source="r.yaml"),
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(compare=[{"name": f"{name}:Thing"}])))
    cases.append(lambda: load_recipe(path))
    for call in cases:
        msg = _refused(call, marker)
        assert name in msg


def test_trusted_recipes_import(plugin: tuple[str, Path], monkeypatch) -> None:
    name, marker = plugin
    with trusting_recipes():
        model = build_model(f"{name}:factory", 3)
    assert model.out_features == 3 and marker.exists()
    marker.unlink()
    # Trust ends with the block: the next use is refused again, even though imported.
    _refused(lambda: build_model(f"{name}:factory", 3), marker)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert build_model(f"{name}:factory", 3).out_features == 3
    monkeypatch.setenv(TRUST_ENV, "yes")  # only 1 trusts
    _refused(lambda: build_model(f"{name}:factory", 3), marker)


def test_fairdeploy_modules_need_no_opt_in(monkeypatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)
    check_import_allowed("fairdeploy.methods.fairlrf:FairLRF", "method")
    check_import_allowed("fairdeploy:__version__", "model.arch")
    with pytest.raises(FairDeployError):
        check_import_allowed("fairdeployx:f", "model.arch")
    with pytest.raises(FairDeployError):
        check_import_allowed("os:system", "method")


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from _reliability import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _with_method(tiny, tmp_path: Path, method: str | None, arch: str = "mlp") -> Path:
    text = tiny.recipe.read_text()
    start, end = text.index("method:"), text.index("train:")
    if method is not None:
        text = text[:start] + f"method: {{name: '{method}', layer: layers.2}}\n" + text[end:]
    text = text.replace("arch: mlp", f"arch: '{arch}'")
    text = text.replace("path: data.npz", f"path: {tiny.data}")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_every_command_refuses_an_untrusted_import_string(
    plugin: tuple[str, Path], tiny, tmp_path: Path
) -> None:
    from _reliability import check_contract, invoke

    name, marker = plugin
    by_method = _with_method(tiny, tmp_path, f"{name}:Thing")
    (tmp_path / "a").mkdir()
    by_arch = _with_method(tiny, tmp_path / "a", None, arch=f"{name}:factory")
    ck, out = tiny.ckpt, tmp_path / "run"
    calls = [
        ["optimize", ck, "--recipe", by_method, "--dry-run"],
        ["optimize", ck, "--recipe", by_arch, "--dry-run"],
        ["optimize", ck, "--recipe", by_method, "--out", out],
        ["compare", ck, "--recipe", by_arch, "--out", out],
        ["sweep", ck, "--recipe", tiny.recipe, "--method", f"{name}:Thing", "--grid",
         "sr=0.1", "--out", out],
        ["verify", tmp_path / "m.onnx", "--checkpoint", ck, "--recipe", by_arch],
        ["train", "--recipe", by_arch, "-o", tmp_path / "t.pt"],
    ]
    (tmp_path / "m.onnx").write_bytes(b"")
    for args in calls:
        result = invoke(*args)
        assert check_contract(result) == "error", (args, result.text)
        assert "--trust-recipe" in result.text and name in result.text, (args, result.text)
        assert not marker.exists(), args
        assert not out.exists()


def test_trust_recipe_lets_the_import_happen(plugin: tuple[str, Path], tiny, tmp_path) -> None:
    from _reliability import invoke

    name, marker = plugin
    by_arch = _with_method(tiny, tmp_path, None, arch=f"{name}:factory")
    result = invoke("optimize", tiny.ckpt, "--recipe", by_arch, "--dry-run", "--trust-recipe")
    assert marker.exists(), result.text  # imported (the checkpoint then does not fit its Linear)
    marker.unlink()
    # The trust ended with the command.
    invoke("optimize", tiny.ckpt, "--recipe", by_arch, "--dry-run")
    assert not marker.exists()
