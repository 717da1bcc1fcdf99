"""Recipe files: a key given twice is refused naming both lines, and a FIFO is refused
before it is opened (issue 21 items 3 and 9)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fairdeploy.errors import FairDeployError
from fairdeploy.recipe import load_recipe

RECIPE = """\
model:
  arch: mlp
  num_classes: 3
  kwargs: {in_features: 8, widths: [32, 32]}
data: {kind: npz, path: data.npz, split: {mode: column}}
sensitive:
  attribute: group
  groups: {a: [0], b: [1]}
method:
  name: fairlrf
  beta: 5/9
  layers:
    - {layer: layers.2, rank: 8, sr: 0.25}
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "first", "key"),
    [
        ("  beta: 5/9\n", "  beta: 5/9\n  beta: 1/3\n", 12, 11, "beta"),
        ("  num_classes: 3\n", "  num_classes: 3\n  num_classes: 2\n", 4, 3, "num_classes"),
        ("{layer: layers.2, rank: 8, sr: 0.25}", "{layer: layers.2, rank: 8, sr: 0.25, rank: 4}",
         13, 13, "rank"),
        ("sensitive:\n", "method: {name: vanilla}\nsensitive:\n", 10, 6, "method"),
    ],
)
def test_a_key_given_twice_is_refused_naming_the_lines(
    tmp_path: Path, old: str, new: str, line: int, first: int, key: str
) -> None:
    path = tmp_path / "r.yaml"
    assert old in RECIPE
    path.write_text(RECIPE.replace(old, new, 1))
    with pytest.raises(FairDeployError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: key {key!r} is given twice"), msg
    assert f"first on line {first}" in msg


def test_merge_keys_and_anchors_are_not_duplicates(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"")
    text = RECIPE.replace("sensitive:\n", "x-groups: &g {a: [0], b: [1]}\nsensitive:\n")
    text = text.replace("  groups: {a: [0], b: [1]}", "  groups: {<<: *g, b: [1]}")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(FairDeployError) as info:
        load_recipe(path)
    assert "given twice" not in str(info.value)  # refused for the unknown x-groups key only


def test_a_fifo_recipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(outcome, fifo), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "w"):
            pass
        pytest.fail("load_recipe blocked on a FIFO")
    assert isinstance(outcome[0], FairDeployError)
    assert "not a regular file" in str(outcome[0])


def _catch(outcome: list[BaseException], path: Path) -> None:
    t0 = time.perf_counter()
    try:
        load_recipe(path)
    except BaseException as exc:  # handed to the test thread
        outcome.append(exc)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("value", [".inf", ".nan", "1e400"])
def test_an_infinite_int8_tolerance_is_refused_when_the_recipe_is_read(
    tmp_path: Path, value: str
) -> None:
    """Issue 21 item 13: it passed --dry-run and failed only after the export."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + f"export: {{quantize: int8, int8: {{atol_scale: {value}}}}}\n")
    with pytest.raises(FairDeployError, match=r"r\.yaml:14: export\.int8\.atol_scale: "):
        load_recipe(path)
