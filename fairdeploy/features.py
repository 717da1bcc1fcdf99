"""The feature cache: cut a model before its first target layer, run the frozen part once.

FairLRF changes only the layers from the first target layer on, so everything before it
(the *trunk*) is frozen. :func:`split_model` cuts a traced model at the input of a named
layer into ``trunk`` and ``head``; :func:`compute_features` runs the trunk once over a
dataset; :class:`fairdeploy.cache.FeatureCache` keeps the result on disk, keyed by
everything it depends on, so scoring, selection, evaluation and sweeps run on the small
head alone.

The graph comes from :func:`fairdeploy.structure.trace_graph`, the tracer every reader of
the model's structure shares (traced here in the model's own train/eval mode).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fairdeploy.data._loader import batch_loader
from fairdeploy.errors import FairDeployError
from fairdeploy.progress import phase
from fairdeploy.structure import ancestors, describe_node, is_inplace, trace_graph

__all__ = [
    "FeatureSet",
    "compute_features",
    "layers_in_call_order",
    "split_model",
]

# --------------------------------------------------------------------------- split


def _check_submodule(model: nn.Module, layer: str, where: str) -> None:
    try:
        model.get_submodule(layer)
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        raise FairDeployError(
            f"{where}: the model has no submodule {layer!r}; its Linear layers are "
            f"{', '.join(names) or '(none)'}"
        ) from None
    if not layer:
        raise FairDeployError(f"{where}: give the name of a submodule, not the whole model")


def layers_in_call_order(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The named layers sorted by when ``forward`` first calls them.

    The first one is where :func:`split_model` must cut when several layers are
    optimized: every later target layer then lies in the head.

    Raises
    ------
    FairDeployError
        If a name is not a submodule, the model cannot be traced, or a layer is never
        called.
    """
    where = f"cannot order layers {list(layers)!r} of {type(model).__name__}"
    for layer in layers:
        _check_submodule(model, layer, where)
    graph = trace_graph(model, layers, where)
    order = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "call_module" and n.target in layers:
            order.setdefault(n.target, i)
    missing = [layer for layer in layers if layer not in order]
    if missing:
        raise FairDeployError(f"{where}: forward() never calls {', '.join(missing)}")
    return sorted(dict.fromkeys(layers), key=order.__getitem__)


def split_model(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """Cut a model at the input of a named layer into a frozen trunk and a head.

    ``trunk(x)`` returns the activations entering ``layer`` (its positional input);
    ``head(features)`` computes the model's output from there on, ``layer`` included,
    so ``head(trunk(x))`` equals ``model(x)``.

    Parameters
    ----------
    model : nn.Module
        The classifier. It is traced with ``torch.fx`` and not modified.
    layer : str
        Qualified name of the first layer to optimize, e.g. ``"classifier.3"``.

    Returns
    -------
    trunk, head : nn.Module
        ``torch.fx.GraphModule`` deep copies (parameters are not shared with ``model``),
        each in ``model``'s train/eval mode. Modules keep their qualified names, so
        ``head.get_submodule("classifier.3")`` exists and can be replaced (e.g. by a
        ``FactorizedLinear``) with ``head.set_submodule``.

    Notes
    -----
    Tracing records one path through ``forward``: Python branches (e.g. on
    ``self.training`` inside a custom, non-leaf module) are fixed at the mode the model
    is in when it is split. Standard ``torch.nn`` layers are leaves and keep switching
    with ``train()``/``eval()``. When several layers are optimized, cut at the first
    one called (:func:`layers_in_call_order`).

    Raises
    ------
    FairDeployError
        If ``layer`` is not a submodule, the model cannot be traced, ``layer`` is not
        called exactly once, or a value other than the layer's input crosses the cut
        (a skip connection around the layer): then no frozen trunk exists.
    """
    where = f"cannot cut {type(model).__name__} at layer {layer!r}"
    _check_submodule(model, layer, where)
    graph = trace_graph(model, [layer], where)
    layer_node = _called_once(graph, layer, where)
    cut = layer_node.args[0]
    before = ancestors(cut)
    head_nodes = _head_nodes(graph, cut, before, where)
    if layer_node not in head_nodes:
        raise FairDeployError(f"{where}: the model's output does not depend on the layer")
    trunk = _graph_module(model, _trunk_graph(graph, cut, before))
    head = _graph_module(model, _head_graph(model, graph, cut, head_nodes))
    return trunk, head


def _called_once(graph: fx.Graph, layer: str, where: str) -> fx.Node:
    """The one call of ``layer`` in the traced graph, with a positional input."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise FairDeployError(
            f"{where}: the layer is called {len(calls)} times in forward(); it must be "
            "called exactly once"
        )
    (layer_node,) = calls
    if not layer_node.args or not isinstance(layer_node.args[0], fx.Node):
        raise FairDeployError(f"{where}: the layer is not called with a positional input")
    return layer_node


def _head_nodes(
    graph: fx.Graph, cut: fx.Node, before: set[fx.Node], where: str
) -> set[fx.Node]:
    """The nodes after the cut: walk back from the output, stopping at the cut.
    Reaching any other value computed before the cut means it flows past the layer."""
    (output,) = (n for n in graph.nodes if n.op == "output")
    head_nodes: set[fx.Node] = set()
    stack: list[fx.Node] = [output]
    while stack:
        n = stack.pop()
        if n is cut or n in head_nodes:
            continue
        if n.op == "placeholder" or (n in before and n.op != "get_attr"):
            raise FairDeployError(
                f"{where}: the part after the cut also uses {describe_node(n)}, which is "
                "computed before the layer (e.g. a skip connection around it), so the "
                "layer's input is not the only value crossing the cut; choose a layer "
                "where it is"
            )
        # get_attr nodes (constants, parameters used functionally) are simply copied.
        head_nodes.add(n)
        stack.extend(n.all_input_nodes)
    return head_nodes


def _trunk_graph(graph: fx.Graph, cut: fx.Node, before: set[fx.Node]) -> fx.Graph:
    """The model's inputs to the cut's value."""
    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        # Keep every placeholder so the trunk has the model's call signature.
        if n.op == "placeholder" or n in before:
            env[n] = trunk_graph.node_copy(n, env.__getitem__)
    trunk_graph.output(env[cut])
    return trunk_graph


def _head_graph(
    model: nn.Module, graph: fx.Graph, cut: fx.Node, head_nodes: set[fx.Node]
) -> fx.Graph:
    """The cut's value (input ``features``) to the model's output."""
    head_graph = fx.Graph()
    features = head_graph.placeholder("features")
    if any(is_inplace(model, user) for user in cut.users if user in head_nodes):
        # An in-place op on the head's input would overwrite the caller's (cached)
        # features: work on a copy, which the model computed anyway.
        features = head_graph.call_method("clone", (features,))
    env = {cut: features}
    for n in graph.nodes:
        if n in head_nodes:
            env[n] = head_graph.node_copy(n, env.__getitem__)
    return head_graph


def _graph_module(model: nn.Module, g: fx.Graph) -> fx.GraphModule:
    """A deep-copied GraphModule of ``g`` over ``model``'s submodules, each in the mode
    its counterpart in ``model`` is in."""
    # GraphModule(root, graph) references root's submodules; the deep copy detaches
    # them so the caller's model is never shared or changed.
    g.lint()
    part = copy.deepcopy(fx.GraphModule(model, g, class_name=type(model).__name__))
    part.train(model.training)
    # train() recursed into the submodules: restore their own modes (e.g. a frozen
    # BatchNorm kept in eval mode inside a training model).
    for name, sub in part.named_modules():
        # (Intermediate containers that fx created have no counterpart; unused.)
        if name:
            with contextlib.suppress(AttributeError):
                sub.training = model.get_submodule(name).training
    return part


# --------------------------------------------------------------------------- features


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """Activations entering a layer, with the labels and groups of their samples.

    A map-style dataset: ``fs[i]`` is ``(features[i], targets[i], groups[i])``, the same
    ``(x, y, group)`` triple the image datasets yield, so the head can be evaluated,
    scored or fine-tuned with a ``DataLoader`` over it.

    Attributes
    ----------
    features : torch.Tensor
        float32, shape (N, D) for a Linear layer (the layer's input shape in general).
    targets : torch.Tensor
        long, shape (N,), the class labels.
    groups : torch.Tensor
        long, shape (N,), the sensitive group of each sample (−1 where unknown).
    """

    features: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor

    def __post_init__(self) -> None:
        n = self.features.shape[0] if self.features.ndim else -1
        if self.targets.shape != (n,) or self.groups.shape != (n,):
            raise ValueError(
                f"inconsistent FeatureSet shapes: features {tuple(self.features.shape)}, "
                f"targets {tuple(self.targets.shape)}, groups {tuple(self.groups.shape)}"
            )
        if (
            self.features.dtype != torch.float32
            or self.targets.dtype != torch.long
            or self.groups.dtype != torch.long
        ):
            raise ValueError(
                "FeatureSet needs float32 features and long targets/groups, got "
                f"{self.features.dtype}, {self.targets.dtype}, {self.groups.dtype}"
            )

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.features[i], self.targets[i], self.groups[i]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> FeatureSet:
        """The samples at ``indices`` (integer positions or a boolean mask), in that order."""
        idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.dtype != torch.bool:
            idx = idx.long()
        return FeatureSet(self.features[idx], self.targets[idx], self.groups[idx])


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def compute_features(
    trunk: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    description: str = "Computing features",
) -> FeatureSet:
    """Run the trunk once over a dataset and collect its outputs.

    Parameters
    ----------
    trunk : nn.Module
        The frozen part of the model (from :func:`split_model`). It runs in eval mode
        under ``torch.inference_mode``; its own mode and device are left unchanged (it
        is copied when it must move to ``device``).
    dataset : torch.utils.data.Dataset
        Map-style, yielding ``(x, y, group)`` triples. Read in order, unshuffled.
    batch_size, num_workers : int
        DataLoader settings.
    device : str or torch.device
        Where the trunk runs; the features are returned on the CPU.
    progress : bool
        Report progress (:mod:`fairdeploy.progress`: a bar on a terminal, one log line
        otherwise).
    description : str
        The progress bar's label, e.g. ``"features: test split"``.

    Returns
    -------
    FeatureSet
        float32 features in dataset order, long targets and groups.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FairDeployError(f"batch_size={batch_size!r} is not allowed: use an integer ≥ 1")
    n = len(dataset)
    if n == 0:
        raise FairDeployError(f"cannot compute features for {description!r}: the dataset is empty")
    device = torch.device(device)
    on_device = all(t.device == device for t in (*trunk.parameters(), *trunk.buffers()))
    module = trunk if on_device else copy.deepcopy(trunk).to(device)
    dtype = _param_dtype(module)
    was_training = [(m, m.training) for m in module.modules()]
    loader = batch_loader(
        dataset, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    features: torch.Tensor | None = None
    targets = torch.empty(n, dtype=torch.long)
    groups = torch.empty(n, dtype=torch.long)
    pos = 0
    module.eval()
    # Plain fp32 on CUDA too (no TF32): the features feed a parity check at atol 1e-4.
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode(), phase(description, total=n, enabled=progress) as bar:
            for batch in loader:
                x, y, g = _unpack(batch, description)
                if x.is_floating_point():
                    x = x.to(dtype)
                out = module(x.to(device, non_blocking=True))
                if not torch.is_tensor(out):
                    raise TypeError(f"the trunk returned {type(out).__name__}, not a tensor")
                b = out.shape[0]
                if features is None:
                    # Preallocate: concatenating batches would double peak memory.
                    features = torch.empty((n, *out.shape[1:]), dtype=torch.float32)
                features[pos : pos + b] = out.float().cpu()
                targets[pos : pos + b] = torch.as_tensor(y).long()
                groups[pos : pos + b] = torch.as_tensor(g).long()
                pos += b
                bar.advance(b)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for m, mode in was_training:
            m.training = mode
    if pos != n or features is None:
        raise RuntimeError(f"the data loader yielded {pos} samples, the dataset has {n}")
    finite = torch.isfinite(features.reshape(n, -1)).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise FairDeployError(
            f"{description}: the trunk's outputs are not finite (NaN or infinity) for "
            f"{len(bad)} of {n} samples (first: sample {int(bad[0])}): the inputs or the weights "
            "overflow float32; check the data's scale and the checkpoint"
        )
    return FeatureSet(features, targets, groups)


def _unpack(batch: Any, what: str) -> tuple[torch.Tensor, Any, Any]:
    if not isinstance(batch, list | tuple) or len(batch) != 3:
        raise FairDeployError(
            f"{what}: the dataset must yield (x, y, group) triples, got "
            f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
        )
    return batch[0], batch[1], batch[2]
