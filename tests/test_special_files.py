"""FIFOs and other special files are refused before they are read, in one line, and a
model's metadata cannot ask for an unbounded resize (issue 21 items 9 and 10)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _reliability import without_blocking
from PIL import Image

from fairdeploy._image_limit import NotARegularFile, open_image
from fairdeploy.data._images import check_image_files
from fairdeploy.errors import FairDeployError
from fairdeploy.serve import MAX_INPUT_SIDE, check_metadata, read_inputs

IMAGE_META = {"preprocessing": {"kind": "image", "resize": [8, 8], "crop": [8, 8],
                                "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_open_image_refuses_a_fifo_before_opening(fifo: Path) -> None:
    got = without_blocking([fifo], lambda: open_image(fifo), timeout=15)
    assert isinstance(got, NotARegularFile) and isinstance(got, ValueError)


def test_an_image_csv_row_pointing_at_a_fifo_is_a_bad_image(tmp_path: Path, fifo: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    for mode in ("header", "full"):
        keep, skipped = without_blocking(
            [fifo], lambda mode=mode: check_image_files([good, fifo, good], mode=mode,
                                                        max_bad=0.5, where="data.csv"),
            timeout=15,
        )
        assert keep.tolist() == [True, False, True] and skipped["bad_image"] == 1


@pytest.mark.parametrize("name", ["rows.npy", "rows.csv", "pipe.png"])
def test_predict_inputs_that_are_fifos_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    os.mkfifo(path)
    meta = IMAGE_META if name.endswith(".png") else {"preprocessing": {"kind": "tabular"}}
    for strict in (True, False):
        got = without_blocking([path], lambda strict=strict: read_inputs([path], meta,
                                                                         strict=strict),
                               timeout=15)
        assert isinstance(got, FairDeployError), got
        assert "not a regular file" in str(got) and str(path) in str(got)


def test_a_character_device_is_refused(tmp_path: Path) -> None:
    got = without_blocking(
        [], lambda: read_inputs(["/dev/zero"], {"preprocessing": {}}), timeout=15)
    assert isinstance(got, FairDeployError) and "not a regular file" in str(got)


@pytest.mark.parametrize("key", ["resize", "crop"])
def test_metadata_asking_for_a_huge_resize_is_refused_up_front(tmp_path: Path, key: str) -> None:
    meta = {"preprocessing": dict(IMAGE_META["preprocessing"], **{key: [30000, 30000]})}
    with pytest.raises(FairDeployError, match=rf"preprocessing\.{key} is \[30000, 30000\] "
                                              rf"\(each side must be 1 to {MAX_INPUT_SIDE}"):
        check_metadata(meta, tmp_path / "m.onnx")
    meta["preprocessing"][key] = [MAX_INPUT_SIDE, 1]
    check_metadata(meta, tmp_path / "m.onnx")  # the limit itself is allowed


def test_a_regular_image_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(path)
    inputs = read_inputs([path], IMAGE_META)
    assert inputs.x.shape == (1, 3, 8, 8)
    assert np.allclose(inputs.x[0, 0], 1.0) and np.allclose(inputs.x[0, 1], -1.0)
