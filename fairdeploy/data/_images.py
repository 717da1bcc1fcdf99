"""Checking image files at load time: missing, undecodable and oversized files are skipped.

An image over :data:`~fairdeploy._image_limit.MAX_IMAGE_PIXELS` (64 megapixels) counts
as a bad image (see :mod:`fairdeploy._image_limit`); the check reads only the header.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fairdeploy._image_limit import MAX_IMAGE_PIXELS, open_image
from fairdeploy.errors import FairDeployError

__all__ = ["MAX_IMAGE_PIXELS", "check_image_files", "open_image"]

_OK, _MISSING, _BAD = 0, 1, 2


def _status(path: Path, mode: str) -> int:
    try:
        if mode == "none":
            return _OK if path.is_file() else _MISSING
        with open_image(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if mode == "full":
                im.load()
        return _OK
    except FileNotFoundError:
        return _MISSING
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return _BAD


def check_image_files(
    paths: Sequence[Path],
    *,
    mode: str,
    max_bad: float,
    where: str,
    missing_counts_as_bad: bool = True,
) -> tuple[np.ndarray, dict[str, int]]:
    """Which images can be used.

    Parameters
    ----------
    paths : sequence of Path
        The image files.
    mode : {"header", "full", "none"}
        ``header`` opens each file and parses its header (fast; catches missing,
        empty, non-image and oversized files); ``full`` decodes every image (slow, catches
        truncated data too); ``none`` only checks that the file exists.
    max_bad : float
        Largest allowed fraction of unusable files; more raises.
    where : str
        Names the dataset in messages.
    missing_counts_as_bad : bool
        Whether missing files count toward ``max_bad`` (Fitzpatrick-17k users fetch
        images themselves, so its missing files are only counted).

    Returns
    -------
    keep : numpy.ndarray
        Boolean mask of usable files.
    skipped : dict
        ``{"missing_image": n, "bad_image": m}``.
    """
    with ThreadPoolExecutor(max_workers=8) as pool:
        status = np.fromiter(
            pool.map(lambda p: _status(p, mode), paths, chunksize=256), dtype=np.int8,
            count=len(paths),
        )
    missing, bad = int((status == _MISSING).sum()), int((status == _BAD).sum())
    n = len(paths)
    if n and missing == n:
        raise FairDeployError(
            f"{where}: none of the {n} images exists (first expected at {paths[0]}): "
            "check data.root"
        )
    counted = bad + (missing if missing_counts_as_bad else 0)
    if n and counted / n > max_bad:
        first = [str(p) for p, s in zip(paths, status, strict=True) if s != _OK][:3]
        raise FairDeployError(
            f"{where}: {counted} of {n} images are unusable ({missing} missing, {bad} "
            f"undecodable or over {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; e.g. "
            f"{', '.join(first)}), more than data.max_bad_images = {max_bad}: "
            "fix the files or raise data.max_bad_images"
        )
    return status == _OK, {"missing_image": missing, "bad_image": bad}
