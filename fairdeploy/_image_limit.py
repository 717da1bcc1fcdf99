"""The largest image fairdeploy decodes (torch-free, so serving can use it too).

An image over :data:`MAX_IMAGE_PIXELS` (64 megapixels, e.g. 8192×8192) is refused from
its header, before decoding: decoding it whole would take gigabytes for one sample (a
144-megapixel file decodes to 432 MB of RGB before it is resized to 128×128), and it is
far above any classifier's input. Pillow's own limit (a warning at 89 megapixels, an
error at 179) is replaced by this one.
"""

from __future__ import annotations

import os
import stat
import warnings

from PIL import Image

__all__ = ["MAX_IMAGE_PIXELS", "ImageTooLarge", "NotARegularFile", "open_image"]

#: Largest image (width × height) that is decoded; larger files are bad images.
MAX_IMAGE_PIXELS = 64_000_000


class ImageTooLarge(ValueError):
    """An image over :data:`MAX_IMAGE_PIXELS`."""


class NotARegularFile(ValueError):
    """A path that is a FIFO, socket or device: reading it could block forever."""


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` with the pixel cap checked from the header, before any decoding.

    Raises :class:`NotARegularFile` (a ``ValueError``) for a FIFO, socket or device,
    checked before opening; :class:`ImageTooLarge` (a ``ValueError``) over the cap; and
    whatever ``Image.open`` raises for missing or unreadable files. Pillow's
    decompression-bomb warning is silenced: this cap is stricter.
    """
    mode = os.stat(path).st_mode  # FileNotFoundError for a missing file, as before
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise NotARegularFile("not a regular file (a pipe, socket or device)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise ImageTooLarge(
            f"{w}×{h} = {w * h / 1e6:.0f} megapixels, over the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit"
        )
    return im
