"""Does the model take the data's inputs? Asked once, on two samples, before any long pass.

A model whose first layer expects 8 features, given rows of 6 (or images cropped to a
size its classifier was not built for), fails deep inside PyTorch with a shape message
and a traceback, possibly after minutes of work. :func:`check_model_takes_inputs` runs the
model in eval mode on the first samples and turns any failure into one
:class:`~fairdeploy.errors.FairDeployError` that says what the model got, what failed
and where to fix it; it also refuses a model whose outputs are not (batch, classes)
logits, or are not finite on real inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fairdeploy.errors import FairDeployError, first_line

__all__ = ["check_model_takes_inputs"]


def check_model_takes_inputs(
    model: nn.Module, dataset: Any, *, what: str, num_classes: int | None = None
) -> None:
    """Run ``model`` on the first two items of ``dataset``; raise a one-line error if it fails.

    Parameters
    ----------
    model : nn.Module
        The model (not modified: its train/eval modes are restored).
    dataset : Dataset or Tensor
        Yields ``(x, y, group)`` items, or is a tensor of inputs.
    what : str
        Names the data in messages, e.g. ``"the test split of data.path d.npz"``.
    num_classes : int, optional
        The number of outputs the model must produce.
    """
    n = min(2, len(dataset))
    if n == 0:
        return
    if torch.is_tensor(dataset):
        x = dataset[:n]
    else:
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
    if x.is_floating_point():
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        x = x.to(dtype) if dtype is not None else x
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            out = model(x.to(device))
    except Exception as exc:  # shape errors surface as RuntimeError, IndexError, ValueError...
        raise FairDeployError(
            f"the model cannot take the inputs of {what} (each of shape {tuple(x.shape[1:])}): "
            f"{type(exc).__name__}: {first_line(exc, limit=300)} — check model.arch and "
            "model.kwargs (e.g. in_features) against the data and its preprocessing"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise FairDeployError(
            f"the model returned {shape} for {n} inputs of {what}: a classifier must return "
            "(batch, classes) logits"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise FairDeployError(
            f"the model returns {out.shape[1]} logits per input but model.num_classes is "
            f"{num_classes}: check model.arch and model.kwargs"
        )
    if not torch.isfinite(out).all():
        raise FairDeployError(
            f"the model's outputs on {what} are not finite (NaN or infinity): the weights or "
            "the inputs overflow float32; check the checkpoint and the data's scale"
        )
