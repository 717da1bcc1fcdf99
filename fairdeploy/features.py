"""The feature cache: cut a model before its first target layer, run the frozen part once.

FairLRF changes only the layers from the first target layer on, so everything before it
(the *trunk*) is frozen. :func:`split_model` cuts a traced model before a named layer
into ``trunk`` and ``head`` (every value crossing the cut — the layer's input, and inside
a residual or attention block the residual stream — is a trunk output, packed into one
tensor when there are several); :func:`compute_features` runs the trunk once over a
dataset; :class:`fairdeploy.cache.FeatureCache` keeps the result on disk, keyed by
everything it depends on, so scoring, selection, evaluation and sweeps run on the small
head alone.

The graph comes from :func:`fairdeploy.structure.trace_graph`, the tracer every reader of
the model's structure shares (traced here in the model's own train/eval mode).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fairdeploy.data._loader import batch_loader
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.progress import phase
from fairdeploy.structure import (
    ancestors,
    describe_node,
    is_inplace,
    propagate_shapes,
    trace_graph,
)

__all__ = [
    "SPILL_SUPPORTED",
    "UNPACK_NAME",
    "CutValue",
    "FeatureSet",
    "UnpackValues",
    "compute_features",
    "layers_in_call_order",
    "pack_values",
    "split_model",
    "takes_packed_values",
    "uncalled_layers",
    "unpack_values",
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
        reasons = "; ".join(f"{m}: {_why_never_called(model, graph, m)}" for m in missing)
        raise FairDeployError(f"{where}: forward() never calls {', '.join(missing)} ({reasons})")
    return sorted(dict.fromkeys(layers), key=order.__getitem__)


def uncalled_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """The named layers that ``forward`` never calls as modules, each with the reason
    (e.g. ``nn.MultiheadAttention`` uses its ``out_proj`` weights functionally): no cut
    can separate them, so FairLRF cannot reach them.

    Raises
    ------
    FairDeployError
        If a name is not a submodule or the model cannot be traced.
    """
    where = f"cannot trace {type(model).__name__}"
    for layer in layers:
        _check_submodule(model, layer, where)
    graph = trace_graph(model, layers, where)
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    return {
        layer: _why_never_called(model, graph, layer) for layer in layers if layer not in called
    }


def split_model(
    model: nn.Module, layer: str, *, example_input: torch.Tensor | None = None
) -> tuple[nn.Module, nn.Module]:
    """Cut a model before a named layer into a frozen trunk and a head.

    The cut is a partition of the model's ``torch.fx`` graph at the layer's call: the
    nodes before it form the trunk, the layer and every node after it the head. The
    values computed before the cut and used after it *cross* it: the layer's input and,
    inside a residual or attention block, the residual stream, a class token or a mask.
    ``head(trunk(x))`` equals ``model(x)``.

    * One value crosses (the layer's input; a plain feed-forward stack): ``trunk(x)``
      returns it and ``head(features)`` takes it, as always.
    * Several values cross (a skip connection around the layer): ``trunk(x)`` returns
      them packed into one tensor of shape (N, D₁ + D₂ + …), each value flattened after
      its batch axis (the layer's input first, then the others in graph order) in the
      widest floating dtype among them, and the head's first step unpacks them again
      (views; non-floating values such as masks get their dtype back). So the feature
      cache, chunking, evaluation and scoring handle one tensor whatever the block.
      The values' shapes come from ``example_input``, which such a cut requires.

    Values that do not depend on the model's input (parameters used functionally,
    constants built from them) are recomputed in the head rather than cached.

    Parameters
    ----------
    model : nn.Module
        The classifier. It is traced with ``torch.fx`` and not modified.
    layer : str
        Qualified name of the first layer to optimize, e.g. ``"classifier.3"``.
    example_input : torch.Tensor, optional
        A batch the model accepts (two samples suffice), needed when several values
        cross the cut. It runs through the model in eval mode under ``no_grad``.

    Returns
    -------
    trunk, head : nn.Module
        ``torch.fx.GraphModule`` deep copies (parameters are not shared with ``model``),
        each in ``model``'s train/eval mode. Modules keep their qualified names, so
        ``head.get_submodule("classifier.3")`` exists and can be replaced (e.g. by a
        ``FactorizedLinear``) with ``head.set_submodule``. ``head.cut_values`` lists the
        values crossing the cut (:class:`CutValue`).

    Notes
    -----
    Tracing records one path through ``forward``: Python branches (e.g. on
    ``self.training`` inside a custom, non-leaf module) are fixed at the mode the model
    is in when it is split. Standard ``torch.nn`` layers are leaves and keep switching
    with ``train()``/``eval()``. When several layers are optimized, cut at the first
    one called (:func:`layers_in_call_order`): every later one is after the cut.

    Raises
    ------
    FairDeployError
        If ``layer`` is not a submodule, the model cannot be traced, ``layer`` is not
        called exactly once (e.g. its weights are used functionally, as
        ``nn.MultiheadAttention`` uses ``out_proj``), several values cross the cut and
        no ``example_input`` is given, or a value crossing the cut is not a tensor with
        one row per sample (a Python number, a tensor without the batch axis).
    """
    where = f"cannot cut {type(model).__name__} at layer {layer!r}"
    _check_submodule(model, layer, where)
    graph = trace_graph(model, [layer], where)
    layer_node = _called_once(model, graph, layer, where)
    cut = layer_node.args[0]
    head_nodes, crossing, trunk_steps = _partition(model, graph, layer_node)
    if layer_node not in head_nodes:
        raise FairDeployError(f"{where}: the model's output does not depend on the layer")
    # The layer's input first, then the other values in graph order.
    crossing.sort(key=lambda n: (n is not cut, _position(graph, n)))
    _check_no_shared_memory(model, crossing, head_nodes, where)
    if len(crossing) == 1:
        values = [CutValue(crossing[0].name, None, None)]
    else:
        values = _cut_values(model, graph, crossing, example_input, where)
    trunk = _graph_module(model, _trunk_graph(graph, crossing, values, trunk_steps))
    extra = {}
    if len(values) > 1:
        if hasattr(model, UNPACK_NAME):
            raise FairDeployError(f"{where}: the model has a submodule named {UNPACK_NAME!r}")
        extra[UNPACK_NAME] = UnpackValues(tuple((v.shape, v.dtype) for v in values))
    head = _graph_module(model, _head_graph(model, graph, crossing, values, head_nodes), extra)
    head.cut_values = tuple(values)
    return trunk, head


@dataclass(frozen=True)
class CutValue:
    """One value crossing a cut (see :func:`split_model`).

    Attributes
    ----------
    name : str
        The fx node's name (``"ln_2"``, ``"add_1"``, ``"x"``).
    shape : tuple of int or None
        Its shape without the batch axis; None when it is the only value (not packed).
    dtype : torch.dtype or None
        Its dtype, restored after unpacking; None when it is the only value.
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None

    @property
    def width(self) -> int:
        """Elements per sample (its share of the packed tensor's second axis)."""
        return math.prod(self.shape or ())


def pack_values(*values: torch.Tensor) -> torch.Tensor:
    """The trunk's last step when several values cross the cut: each value flattened
    after its batch axis, concatenated along axis 1 in float32 (float64 when a value is).
    Integers above 2^24 are refused (float32 would round them)."""
    # At least float32 (what the feature cache holds): integers (token ids, positions) are
    # exact there up to 2^24, and half precision would round them from 2^11 on.
    floats = [v.dtype for v in values if v.is_floating_point() and torch.finfo(v.dtype).bits > 32]
    dtype = floats[0] if floats else torch.float32
    for v in values:
        if not v.is_floating_point() and v.dtype != torch.bool and v.numel():
            top = int(v.abs().max())
            if top > 2**24:
                raise FairDeployError(
                    f"a value crossing the cut holds integers up to {top:,}, beyond what the "
                    "cached float32 values hold exactly (2^24 = 16,777,216): choose a layer "
                    "before which no such value is computed"
                )
    return torch.cat([v.reshape(v.shape[0], -1).to(dtype) for v in values], dim=1)


def unpack_values(
    packed: torch.Tensor, layout: tuple[tuple[tuple[int, ...], torch.dtype], ...]
) -> tuple[torch.Tensor, ...]:
    """The head's first step: the values :func:`pack_values` packed, as views of
    ``packed`` (copies where a dtype is restored), in their shapes and dtypes."""
    out = []
    start = 0
    n = packed.shape[0]
    for shape, dtype in layout:
        width = math.prod(shape)
        v = packed[:, start : start + width].reshape(n, *shape)
        out.append(v if v.dtype == dtype else v.to(dtype))
        start += width
    if start != packed.shape[1]:
        raise FairDeployError(
            f"the head expects packed features of width {start}, got {packed.shape[1]}: "
            "the features come from another cut; recompute them"
        )
    return tuple(out)


class UnpackValues(nn.Module):
    """The head's first module when several values cross the cut: :func:`unpack_values`
    with the cut's layout. A leaf for every tracer of fairdeploy (``fx_leaf``), so the
    head can be traced again (by the structure analysis of scoring and export)."""

    fx_leaf = True

    def __init__(self, layout: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return unpack_values(packed, self.layout)

    def extra_repr(self) -> str:
        return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in self.layout)


#: The name of the :class:`UnpackValues` module in a head that unpacks a cut.
UNPACK_NAME = "cut_unpack"


def takes_packed_values(module: nn.Module) -> bool:
    """Whether ``module`` is a head that unpacks several values crossing its cut: its
    input is then fed as cached (float32), never cast to the model's dtype, since
    :class:`UnpackValues` restores each value's own dtype (integers included)."""
    return isinstance(getattr(module, UNPACK_NAME, None), UnpackValues)


def _position(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise KeyError(node.name)  # pragma: no cover - the node is in the graph


def _called_once(model: nn.Module, graph: fx.Graph, layer: str, where: str) -> fx.Node:
    """The one call of ``layer`` in the traced graph, with a positional input."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise FairDeployError(f"{where}: {_why_never_called(model, graph, layer)}")
    if len(calls) != 1:
        raise FairDeployError(
            f"{where}: the layer is called {len(calls)} times in forward(); it must be "
            "called exactly once"
        )
    (layer_node,) = calls
    if not layer_node.args or not isinstance(layer_node.args[0], fx.Node):
        raise FairDeployError(f"{where}: the layer is not called with a positional input")
    return layer_node


def _why_never_called(model: nn.Module, graph: fx.Graph, layer: str) -> str:
    """Why forward() has no call of ``layer``: its weights are read functionally (by a
    module that owns it, e.g. ``nn.MultiheadAttention``'s ``out_proj``, or by
    ``F.linear`` in a custom forward), or it is not used at all."""
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    parts = layer.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:i])
        if owner in called:
            module = model.get_submodule(owner)
            kind = type(module).__name__
            if isinstance(module, nn.MultiheadAttention):
                return (
                    f"the layer belongs to {owner!r} ({kind}), which uses its weights "
                    "functionally instead of calling it, so no cut can separate it; choose "
                    "a Linear that forward() calls as a module"
                )
            return (
                f"the layer belongs to {owner!r} ({kind}), a module the tracer runs as one "
                "piece (torch.nn's own modules are not traced inside), so no cut can reach "
                "into it; choose a Linear outside it, or build the block from modules that "
                "call their Linear layers"
            )
    reads = [
        str(n.target) for n in graph.nodes
        if n.op == "get_attr" and str(n.target).startswith(layer + ".")
    ]
    if reads:
        return (
            f"forward() uses the layer's weights functionally ({', '.join(reads)}) instead "
            "of calling the module, so no cut can separate it; call the module instead"
        )
    return "forward() never calls the layer"


def _partition(
    model: nn.Module, graph: fx.Graph, layer_node: fx.Node
) -> tuple[set[fx.Node], list[fx.Node], list[fx.Node]]:
    """The head's nodes, the values crossing the cut, and the trunk's in-place steps.

    Walk back from the output: a node at or after the layer belongs to the head; a node
    before it is a crossing value, unless it does not depend on the model's input
    (``get_attr`` and what is computed from such constants alone), which is copied into
    the head. In-place operations (``h.masked_fill_(...)``, ``ReLU(inplace=True)``) may
    be statements whose result nothing uses: they change a value other nodes read, so
    each is kept where the model runs it, in the head when it comes after the layer
    (walked back from like the output), else in the trunk (returned, with what it needs).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    cut_pos = order[layer_node]
    per_sample: set[fx.Node] = set()  # nodes that depend on the model's input
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in per_sample for a in n.all_input_nodes):
            per_sample.add(n)
    (output,) = (n for n in graph.nodes if n.op == "output")
    inplace = [n for n in graph.nodes if is_inplace(model, n)]
    head_nodes: set[fx.Node] = set()
    crossing: list[fx.Node] = []
    stack: list[fx.Node] = [output, *(n for n in inplace if order[n] > cut_pos)]
    while stack:
        n = stack.pop()
        if n in head_nodes or n in crossing:
            continue
        if order[n] < cut_pos and n in per_sample:
            crossing.append(n)
            continue
        head_nodes.add(n)
        stack.extend(n.all_input_nodes)
    return head_nodes, crossing, [n for n in inplace if order[n] < cut_pos]


#: Operations whose result may share memory with their first argument.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "t",
    "split", "chunk", "unbind", "movedim", "swapaxes", "as_strided", "contiguous",
    "__getitem__", "detach",
})
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk,
    torch.unbind, torch.movedim, torch.swapaxes, torch.t, torch.detach,
})


def _aliased_to(model: nn.Module, node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` may share: follow views (and in-place steps,
    which return their input) back to the value they were taken from."""
    while True:
        view = (
            (node.op == "call_method" and str(node.target) in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
            or is_inplace(model, node)
        )
        if not view or not node.args or not isinstance(node.args[0], fx.Node):
            return node
        node = node.args[0]


def _check_no_shared_memory(
    model: nn.Module, crossing: list[fx.Node], head_nodes: set[fx.Node], where: str
) -> None:
    """Refuse two crossing values that share memory (one a view of the other) when the
    head updates values in place: cached, they are separate copies, and an update of one
    would no longer reach the other as it does in the model."""
    if len(crossing) < 2 or not any(is_inplace(model, n) for n in head_nodes):
        return
    roots: dict[fx.Node, fx.Node] = {}
    for n in crossing:
        root = _aliased_to(model, n)
        if root in roots:
            raise FairDeployError(
                f"{where}: {describe_node(n)} and {describe_node(roots[root])} cross the "
                "cut as views of one tensor, and the part after the cut updates values in "
                "place: cached separately, an update of one would not reach the other; "
                "choose a layer where one value crosses, or avoid the in-place operation"
            )
        roots[root] = n


def _cut_values(
    model: nn.Module,
    graph: fx.Graph,
    crossing: list[fx.Node],
    example_input: torch.Tensor | None,
    where: str,
) -> list[CutValue]:
    """Shapes and dtypes of the values crossing the cut, read on ``example_input``."""
    if example_input is None:
        other = next(n for n in crossing[1:])
        raise FairDeployError(
            f"{where}: the part after the cut also uses {describe_node(other)}, which is "
            "computed before the layer (e.g. a skip connection around it), so "
            f"{len(crossing)} values cross the cut; pass example_input= (a batch the model "
            "accepts) so that their shapes are known and the trunk can cache them together"
        )
    param = next(iter(model.parameters()), None)
    if param is not None and example_input.is_floating_point():
        example_input = example_input.to(param.device, param.dtype)
    # Two batch sizes: a value's first axis is the batch only if it follows the batch (a
    # sequence-first (T, N, E) tensor whose T equals one batch size would pass one check).
    bigger = torch.cat([example_input, example_input[:1]])
    try:
        metas = propagate_shapes(model, graph, example_input)
        grown = propagate_shapes(model, graph, bigger)
    except Exception as exc:  # the model's own error on a bad example
        raise FairDeployError(
            f"{where}: the model fails on example_input of shape "
            f"{tuple(example_input.shape)} ({type(exc).__name__}: {exc})"
        ) from None
    batch = int(example_input.shape[0])
    values = []
    for n in crossing:
        meta, other = metas.get(n), grown.get(n)
        follows = other is not None and other.shape and int(other.shape[0]) == batch + 1
        if meta is None or not meta.shape or int(meta.shape[0]) != batch or not follows:
            found = "not a tensor" if meta is None else f"of shape {tuple(meta.shape)}"
            raise FairDeployError(
                f"{where}: {describe_node(n)} crosses the cut but is {found}, not a tensor "
                f"with one row per sample (batch {batch}), so it cannot be cached; choose "
                "a later layer"
            )
        values.append(CutValue(n.name, tuple(int(d) for d in meta.shape[1:]), meta.dtype))
    return values


def _trunk_graph(
    graph: fx.Graph, crossing: list[fx.Node], values: list[CutValue], steps: list[fx.Node]
) -> fx.Graph:
    """The model's inputs to the values crossing the cut (packed when several), with the
    in-place ``steps`` before the cut, each where the model runs it."""
    needed: set[fx.Node] = set()
    for n in [*crossing, *steps]:
        needed |= ancestors(n)
    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        # Keep every placeholder so the trunk has the model's call signature.
        if n.op == "placeholder" or n in needed:
            env[n] = trunk_graph.node_copy(n, env.__getitem__)
    if len(crossing) == 1:
        trunk_graph.output(env[crossing[0]])
    else:
        trunk_graph.output(
            trunk_graph.call_function(pack_values, tuple(env[n] for n in crossing))
        )
    return trunk_graph


def _head_graph(
    model: nn.Module,
    graph: fx.Graph,
    crossing: list[fx.Node],
    values: list[CutValue],
    head_nodes: set[fx.Node],
) -> fx.Graph:
    """The values crossing the cut (input ``features``) to the model's output."""
    head_graph = fx.Graph()
    features = head_graph.placeholder("features")
    if len(crossing) == 1:
        inputs = [features]
    else:
        unpacked = head_graph.call_module(UNPACK_NAME, (features,))
        inputs = [head_graph.call_function(operator.getitem, (unpacked, i))
                  for i in range(len(crossing))]
    env: dict[fx.Node, fx.Node] = {}
    # An in-place op in the head, on a crossing value or on a view of one, would overwrite
    # the caller's (cached) features: the head then works on copies, as the model did.
    copies = any(is_inplace(model, n) for n in head_nodes)
    for n, value in zip(crossing, inputs, strict=True):
        env[n] = head_graph.call_method("clone", (value,)) if copies else value
    for n in graph.nodes:
        if n in head_nodes:
            env[n] = head_graph.node_copy(n, env.__getitem__)
    return head_graph


def _graph_module(
    model: nn.Module, g: fx.Graph, extra: dict[str, nn.Module] | None = None
) -> fx.GraphModule:
    """A deep-copied GraphModule of ``g`` over ``model``'s submodules (and the ``extra``
    modules, by name), each in the mode its counterpart in ``model`` is in."""
    # GraphModule(root, graph) references root's submodules; the deep copy detaches
    # them so the caller's model is never shared or changed.
    g.lint()
    root: nn.Module | dict[str, Any] = model
    if extra:
        # The graph's targets by name, as GraphModule would copy them from the model.
        root = dict(extra)
        for n in g.nodes:
            if n.op in ("call_module", "get_attr") and str(n.target) not in root:
                obj: Any = model
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                root[str(n.target)] = obj
    part = copy.deepcopy(fx.GraphModule(root, g, class_name=type(model).__name__))
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
    spill: str | os.PathLike[str] | None = None,
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
    spill : path, optional
        A file to back the features with (shared memory map, created or resized here): each
        batch's outputs are written to it, so the pass holds none of them in anonymous
        memory and the OS writes them out as it needs the room (token tensors of a
        transformer block: about 1.2 MB per ViT-B/16 sample). The caller removes the file;
        the returned features read from it until they are freed. None: in memory. Needs
        :data:`SPILL_SUPPORTED` (Linux); elsewhere an ``OSError`` naming the file.

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
    bad: list[int] = []  # samples whose outputs are not finite
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
                    features = _preallocate((n, *out.shape[1:]), spill)
                features[pos : pos + b] = out.float().cpu()
                targets[pos : pos + b] = torch.as_tensor(y).long()
                groups[pos : pos + b] = torch.as_tensor(g).long()
                # Checked per batch: one mask over the whole set would add a quarter of its
                # size in memory, which a pass backed by a file does not otherwise hold.
                bad.extend((pos + torch.nonzero(~_finite_rows(out)).flatten()).tolist())
                pos += b
                bar.advance(b)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for m, mode in was_training:
            m.training = mode
    if pos != n or features is None:
        raise RuntimeError(f"the data loader yielded {pos} samples, the dataset has {n}")
    if bad:
        raise FairDeployError(
            f"{description}: the trunk's outputs are not finite (NaN or infinity) for "
            f"{len(bad)} of {n} samples (first: sample {bad[0]}): the inputs or the weights "
            "overflow float32; check the data's scale and the checkpoint"
        )
    return FeatureSet(features, targets, groups)


#: Whether :func:`compute_features` can back features with a file here: it allocates the
#: file's blocks first (``os.posix_fallocate``, which macOS and Windows lack; a sparse map
#: would turn a full disk into a SIGBUS).
SPILL_SUPPORTED = hasattr(os, "posix_fallocate")


def _finite_rows(out: torch.Tensor) -> torch.Tensor:
    """Per sample of a batch of trunk outputs, whether all its values (as float32) are
    finite (on the CPU)."""
    return torch.isfinite(out.float()).reshape(out.shape[0], -1).all(dim=1).cpu()


def _preallocate(shape: tuple[int, ...], spill: str | os.PathLike[str] | None) -> torch.Tensor:
    """An uninitialized float32 tensor of ``shape``: in memory, or backed by ``spill``."""
    if spill is None:
        return torch.empty(shape, dtype=torch.float32)
    numel = math.prod(shape)
    if not SPILL_SUPPORTED:
        raise OSError(errno.ENOTSUP, "this platform cannot allocate a file's blocks up front",
                      os.fspath(spill))
    # Allocate the file's blocks first: a full disk or a file size limit is then an OSError
    # here, not a SIGBUS when a page of a sparse mapping is first written.
    try:
        fd = os.open(spill, os.O_RDWR | os.O_CREAT, 0o600)  # private, as the cache folder
        try:
            os.ftruncate(fd, numel * 4)  # exactly the features' size, whatever it held
            os.posix_fallocate(fd, 0, max(1, numel * 4))
        finally:
            os.close(fd)
        flat = torch.from_file(os.fspath(spill), shared=True, size=numel, dtype=torch.float32)
    except (OSError, RuntimeError) as exc:  # named after the file: the caller may fall back
        errno_ = getattr(exc, "errno", None) or errno.EIO
        raise OSError(errno_, getattr(exc, "strerror", None) or first_line(exc),
                      os.fspath(spill)) from None
    return flat.view(shape)


def _unpack(batch: Any, what: str) -> tuple[torch.Tensor, Any, Any]:
    if not isinstance(batch, list | tuple) or len(batch) != 3:
        raise FairDeployError(
            f"{what}: the dataset must yield (x, y, group) triples, got "
            f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
        )
    return batch[0], batch[1], batch[2]
