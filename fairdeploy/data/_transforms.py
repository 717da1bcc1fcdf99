"""Image preprocessing: the eval transform, training augmentation, and its description."""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

from fairdeploy.data_specs import ImagePreprocessing

__all__ = ["image_transform", "preprocessing_dict"]


def image_transform(pre: ImagePreprocessing, *, augment: bool = False) -> T.Compose:
    """Resize to ``size``×``size``, center-crop ``crop``, to tensor, normalize.

    With ``augment`` (training only), a random horizontal flip and a colour jitter
    (brightness, contrast, saturation 0.2, hue 0.05) are applied before cropping —
    the paper's "flipping and color distortion".
    """
    steps: list[Any] = [T.Resize((pre.size, pre.size))]
    if augment:
        steps += [T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2, 0.05)]
    steps += [T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


def preprocessing_dict(pre: ImagePreprocessing) -> dict[str, Any]:
    """A JSON-ready description of the eval preprocessing (stored in ONNX metadata),
    enough to serve the model without the recipe."""
    return {
        "kind": "image",
        "color": "RGB",
        "resize": [pre.size, pre.size],
        "crop": [pre.crop, pre.crop],
        "scale": "1/255",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "layout": "NCHW",
        "input_shape": [3, pre.crop, pre.crop],
    }
