"""The structure around a layer, worked out once on the model's ``torch.fx`` graph.

Four parts of fairdeploy need to know what surrounds a layer, and all of them read this
module (one tracer, one table of elementwise operations, one notion of a *link*):

- the feature cache cuts the model at a layer's input (:func:`fairdeploy.features.split_model`
  traces with :func:`trace_graph`);
- FairLRF scoring needs to know whether everything after the layer is piecewise linear
  (then its closed-form Gauss–Newton diagonal is the exact Hessian diagonal) and whether
  the layer's output reaches the logits through elementwise operations and at most one
  Linear (then a faster closed form applies): :meth:`ModelStructure.not_piecewise_linear_after`,
  :meth:`ModelStructure.chain_to_output`;
- the export folds row/column permutations into, and removes dead neurons from, the
  Linear layers next to a factorized layer when only elementwise operations lie between:
  :meth:`ModelStructure.preceding`, :meth:`ModelStructure.following`;
- ``slr_a`` sums the activation that follows a layer: :meth:`ModelStructure.following_activation`.

**The elementwise table** (:func:`elementwise_op`). An operation is *elementwise* here when
it maps every feature (the last axis, the one ``nn.Linear`` acts on) on its own, works at
any width, and is deterministic in eval mode. For each, the table records:

- ``kind``: ``"activation"`` (ReLU family, LeakyReLU, PReLU, RReLU, ELU, CELU, SELU, GELU,
  SiLU, Mish, Tanh, Sigmoid, Hardtanh, Hardsigmoid, Hardswish, Softplus, Softsign, …),
  ``"noop"`` (Dropout and its variants in eval mode, Identity, ``clone``, ``contiguous``,
  ``flatten`` when it leaves a 2-D tensor unchanged) or ``"affine"`` (BatchNorm1d in eval
  mode on a 2-D input, ``x * c``, ``x + c``, ``x / c``, ``-x`` with a Python number c);
- ``piecewise_linear``: the derivative is piecewise constant (ReLU, LeakyReLU, PReLU,
  Hardtanh, affine maps, …; not ELU, GELU, SiLU, Mish, Tanh, Sigmoid, Hardswish, …). After
  the scored layer such operations keep the Gauss–Newton diagonal equal to the Hessian
  diagonal;
- ``zero_to_zero``: ``f(0) = 0`` (false for Sigmoid, Hardsigmoid, Softplus, LogSigmoid,
  BatchNorm, ``x + c``). Dead-neuron elimination uses it: a neuron fixed at 0 stays 0
  through such operations, so the next layer needs no bias for it;
- ``feature_params``: one parameter per feature (PReLU with ``num_parameters > 1``,
  BatchNorm1d). Such a module is elementwise but not identical across features, so a
  permutation or a removal of features must be applied to its parameters too.

Operations whose meaning depends on the input's rank (BatchNorm1d normalizes dim 1;
``flatten`` is a no-op only on a tensor it leaves unchanged) count as elementwise only when
an example input shows a 2-D tensor whose shape they keep (shapes come from
``torch.fx.passes.shape_prop`` on the example, so the meta device works); without an example
they are not elementwise.

The graph is traced in eval mode (dropout off, batch norm on running statistics), with
``nn.Linear``, :class:`~fairdeploy.lrf.FactorizedLinear` and every other ``torch.nn`` module
as leaves; custom modules are traced through, so a functional ``F.relu`` inside a custom
``forward`` is seen like an ``nn.ReLU``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf._factorized import FactorizedLinear

__all__ = [
    "ELEMENTWISE_MODULES",
    "LAYER_TYPES",
    "PIECEWISE_LINEAR_MODULES",
    "Elementwise",
    "Link",
    "ModelStructure",
    "Step",
    "analyze_structure",
    "ancestors",
    "describe_node",
    "elementwise_module",
    "is_inplace",
    "propagate_shapes",
    "trace_graph",
]

#: Module types a link ends at: the layers whose weights can absorb a permutation or lose
#: features (a removed output row, a removed input column).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, FactorizedLinear)


@dataclass(frozen=True)
class Elementwise:
    """What the table says about one elementwise operation at one call site.

    Attributes
    ----------
    name : str
        The module type (``"ReLU"``), function (``"relu"``) or method (``"relu_"``) name.
    kind : {"activation", "noop", "affine"}
        An activation function, an identity in eval mode, or an affine map.
    piecewise_linear : bool
        The derivative is piecewise constant (the second derivative is zero almost
        everywhere).
    zero_to_zero : bool
        ``f(0) == 0`` for this instance (e.g. Hardtanh with ``min_val ≤ 0 ≤ max_val``).
    feature_params : bool
        The module holds one parameter per feature (PReLU with ``num_parameters > 1``,
        BatchNorm1d): permuting or removing features must permute or remove them too.
    rank_dependent : bool
        Elementwise on the feature axis only for a 2-D input whose shape it keeps
        (BatchNorm1d, flatten): needs an example input to be accepted.
    """

    name: str
    kind: str
    piecewise_linear: bool
    zero_to_zero: bool
    feature_params: bool = False
    rank_dependent: bool = False


def _act(name: str, pl: bool, zero: bool = True) -> Elementwise:
    return Elementwise(name, "activation", pl, zero)


def _noop(name: str) -> Elementwise:
    return Elementwise(name, "noop", True, True)


_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# The table, by module type. Entries whose flags depend on the instance (PReLU,
# Hardtanh, Threshold, BatchNorm1d, Flatten) are refined by elementwise_module().
_MODULE_TABLE: dict[type[nn.Module], Elementwise] = {
    nn.ReLU: _act("ReLU", True),
    nn.ReLU6: _act("ReLU6", True),
    nn.LeakyReLU: _act("LeakyReLU", True),
    nn.PReLU: _act("PReLU", True),
    nn.RReLU: _act("RReLU", True),  # eval mode: a fixed slope (lower + upper) / 2
    nn.Hardtanh: _act("Hardtanh", True),
    nn.Threshold: _act("Threshold", True),
    nn.Hardshrink: _act("Hardshrink", True),
    nn.Softshrink: _act("Softshrink", True),
    nn.Hardsigmoid: _act("Hardsigmoid", True, zero=False),
    nn.ELU: _act("ELU", False),
    nn.CELU: _act("CELU", False),
    nn.SELU: _act("SELU", False),
    nn.GELU: _act("GELU", False),
    nn.SiLU: _act("SiLU", False),
    nn.Mish: _act("Mish", False),
    nn.Tanh: _act("Tanh", False),
    nn.Softsign: _act("Softsign", False),
    nn.Tanhshrink: _act("Tanhshrink", False),
    nn.Hardswish: _act("Hardswish", False),  # x·relu6(x + 3)/6 is quadratic on (−3, 3)
    nn.Sigmoid: _act("Sigmoid", False, zero=False),
    nn.Softplus: _act("Softplus", False, zero=False),
    nn.LogSigmoid: _act("LogSigmoid", False, zero=False),
    nn.Identity: _noop("Identity"),
    **{cls: _noop(cls.__name__) for cls in _DROPOUT_MODULES},
    nn.BatchNorm1d: Elementwise(
        "BatchNorm1d", "affine", True, False, feature_params=True, rank_dependent=True
    ),
    nn.Flatten: Elementwise("Flatten", "noop", True, True, rank_dependent=True),
}

#: Module types the elementwise table knows (whether a given instance qualifies is
#: decided by :func:`elementwise_module`).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = tuple(_MODULE_TABLE)

#: Modules that are linear or piecewise linear in their input in eval mode but not
#: elementwise; with the piecewise-linear elementwise ones, they keep the Gauss–Newton
#: diagonal of a layer before them equal to the true Hessian diagonal.
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    FactorizedLinear,
    nn.Bilinear,  # linear in each input: fine when only one depends on the layer
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.BatchNorm1d,  # affine in eval mode
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Upsample,  # nearest/linear interpolation is linear
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)


def elementwise_module(module: nn.Module, *, eval_mode: bool = True) -> Elementwise | None:
    """The table's entry for a module instance, or None when it is not elementwise.

    Instance-dependent flags are filled in: PReLU with one parameter per feature has
    ``feature_params``; Hardtanh and Threshold map 0 to 0 only for some settings;
    BatchNorm1d qualifies only in eval mode with running statistics (in training mode
    or without them it mixes samples); Dropout and RReLU only in eval mode.

    Parameters
    ----------
    module : nn.Module
        The instance.
    eval_mode : bool
        Judge the module as it runs in eval mode (default: how every reader runs the
        model); ``False`` judges it in its current mode.
    """
    training = module.training and not eval_mode
    entry = None
    for cls in type(module).__mro__:
        if cls in _MODULE_TABLE:
            entry = _MODULE_TABLE[cls]
            break
    if entry is None:
        return None
    if isinstance(module, (*_DROPOUT_MODULES, nn.RReLU)):
        return None if training else entry
    if isinstance(module, nn.PReLU):
        return _replace(entry, feature_params=module.num_parameters > 1)
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return _replace(entry, zero_to_zero=module.min_val <= 0 <= module.max_val)
    if isinstance(module, nn.Threshold):
        return _replace(entry, zero_to_zero=module.threshold < 0 or module.value == 0)
    stats = getattr(module, "running_mean", None) is not None
    if isinstance(module, nn.BatchNorm1d) and (training or not stats):
        return None
    return entry


def _replace(entry: Elementwise, **changes: Any) -> Elementwise:
    return dataclasses.replace(entry, **changes)


# --------------------------------------------------------------- functions and methods

_SCALAR = (int, float)


def _is_scalar(v: object) -> bool:
    return isinstance(v, _SCALAR) and not isinstance(v, bool)


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _dropout_fn(name: str, training_pos: int) -> Callable[[tuple, dict], Elementwise | None]:
    def rule(args: tuple, kwargs: dict) -> Elementwise | None:
        # F.dropout defaults to training=True: only an explicit False is the identity.
        return _noop(name) if _arg(args, kwargs, training_pos, "training", True) is False else None

    return rule


def _fixed(entry: Elementwise) -> Callable[[tuple, dict], Elementwise | None]:
    return lambda args, kwargs: entry


def _hardtanh_fn(args: tuple, kwargs: dict) -> Elementwise | None:
    lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    if not (_is_scalar(lo) and _is_scalar(hi)):
        return None
    return _act("hardtanh", True, zero=lo <= 0 <= hi)


def _clamp_method(args: tuple, kwargs: dict) -> Elementwise | None:
    lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    if not all(v is None or _is_scalar(v) for v in (lo, hi)):
        return None
    zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return _act("clamp", True, zero=zero)


# Functions whose first argument is the value; the rest must be constants.
_FUNCTION_TABLE: dict[Any, Callable[[tuple, dict], Elementwise | None]] = {
    F.relu: _fixed(_act("relu", True)),
    torch.relu: _fixed(_act("relu", True)),
    F.relu_: _fixed(_act("relu_", True)),
    torch.relu_: _fixed(_act("relu_", True)),
    F.relu6: _fixed(_act("relu6", True)),
    F.leaky_relu: _fixed(_act("leaky_relu", True)),
    F.leaky_relu_: _fixed(_act("leaky_relu_", True)),
    F.hardtanh: _hardtanh_fn,
    F.hardtanh_: _hardtanh_fn,
    F.hardshrink: _fixed(_act("hardshrink", True)),
    F.softshrink: _fixed(_act("softshrink", True)),
    F.hardsigmoid: _fixed(_act("hardsigmoid", True, zero=False)),
    F.elu: _fixed(_act("elu", False)),
    F.elu_: _fixed(_act("elu_", False)),
    F.celu: _fixed(_act("celu", False)),
    F.selu: _fixed(_act("selu", False)),
    torch.selu: _fixed(_act("selu", False)),
    F.gelu: _fixed(_act("gelu", False)),
    F.silu: _fixed(_act("silu", False)),
    F.mish: _fixed(_act("mish", False)),
    F.tanh: _fixed(_act("tanh", False)),
    torch.tanh: _fixed(_act("tanh", False)),
    F.softsign: _fixed(_act("softsign", False)),
    F.tanhshrink: _fixed(_act("tanhshrink", False)),
    F.hardswish: _fixed(_act("hardswish", False)),
    F.sigmoid: _fixed(_act("sigmoid", False, zero=False)),
    torch.sigmoid: _fixed(_act("sigmoid", False, zero=False)),
    F.softplus: _fixed(_act("softplus", False, zero=False)),
    F.logsigmoid: _fixed(_act("logsigmoid", False, zero=False)),
    F.dropout: _dropout_fn("dropout", 2),
    F.alpha_dropout: _dropout_fn("alpha_dropout", 2),
    F.feature_alpha_dropout: _dropout_fn("feature_alpha_dropout", 2),
    F.dropout1d: _dropout_fn("dropout1d", 2),
    F.dropout2d: _dropout_fn("dropout2d", 2),
    F.dropout3d: _dropout_fn("dropout3d", 2),
    torch.flatten: _fixed(Elementwise("flatten", "noop", True, True, rank_dependent=True)),
}

# Methods called on the value (``x.relu()``); the other arguments must be constants.
_METHOD_TABLE: dict[str, Callable[[tuple, dict], Elementwise | None]] = {
    "relu": _fixed(_act("relu", True)),
    "relu_": _fixed(_act("relu_", True)),
    "sigmoid": _fixed(_act("sigmoid", False, zero=False)),
    "sigmoid_": _fixed(_act("sigmoid_", False, zero=False)),
    "tanh": _fixed(_act("tanh", False)),
    "tanh_": _fixed(_act("tanh_", False)),
    "clamp": _clamp_method,
    "clamp_": _clamp_method,
    "clone": _fixed(_noop("clone")),
    "contiguous": _fixed(_noop("contiguous")),
    "flatten": _fixed(Elementwise("flatten", "noop", True, True, rank_dependent=True)),
}

# Arithmetic with one Python number: affine, identical on every feature.
_ARITHMETIC_FUNCTIONS = {
    operator.mul: "mul",
    operator.add: "add",
    operator.sub: "sub",
    operator.truediv: "truediv",
    operator.neg: "neg",
    operator.pos: "pos",
}
_ARITHMETIC_METHODS = {
    "mul": "mul", "mul_": "mul", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "div": "truediv", "div_": "truediv", "neg": "neg", "neg_": "neg",
}  # fmt: skip


def _arithmetic(kind: str, value_pos: int, const: Any) -> Elementwise | None:
    """``value ∘ const`` (or ``const ∘ value``) with a Python number: affine or None."""
    if kind in ("neg", "pos"):
        return Elementwise(kind, "affine", True, True)
    if not _is_scalar(const):
        return None
    if kind == "truediv" and (value_pos != 0 or const == 0):
        return None  # c / x is not affine
    if kind == "mul":
        return Elementwise("mul", "affine", True, True)
    if kind == "truediv":
        return Elementwise("truediv", "affine", True, True)
    return Elementwise(kind, "affine", True, const == 0)  # add / sub: x ± c


# Functions and methods that are linear (or piecewise linear) in every argument that
# depends on the layer, or that only read shapes: they keep the scoring exact.
_LINEAR_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, getattr,
    torch.add, torch.sub, torch.cat, torch.stack, torch.flatten, torch.reshape,
    torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.sum, torch.mean,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pad,
    F.conv1d, F.conv2d, F.conv3d, F.batch_norm,
}  # fmt: skip
_LINEAR_METHODS = {
    "add", "add_", "sub", "sub_", "neg", "neg_", "view", "reshape", "flatten", "squeeze",
    "unsqueeze", "transpose", "permute", "contiguous", "clone", "sum", "mean", "size",
    "dim", "expand", "expand_as", "view_as", "reshape_as", "t", "to", "float", "double",
    "type_as", "detach",
}  # fmt: skip
# Linear in each argument: piecewise linear when at most one argument depends on the layer.
_BILINEAR_FUNCTIONS = {operator.mul, operator.matmul, torch.mul, torch.matmul, torch.mm,
                       torch.bmm, F.linear, F.bilinear}
_BILINEAR_METHODS = {"mul", "mul_", "matmul", "mm", "bmm"}


# --------------------------------------------------------------------------- tracing


class _LeafTracer(fx.Tracer):
    """The default tracer (``torch.nn`` modules are leaves, custom modules are traced
    through), plus the named modules, every :class:`FactorizedLinear` and every module
    whose class sets ``fx_leaf = True`` (the head's unpacking of a cut) as leaves.

    The default tracer traces *through* containers (``nn.Sequential``) and custom
    modules, so a cut at such a module would find no ``call_module`` node for it.
    """

    def __init__(self, *leaves: str) -> None:
        super().__init__()
        self._leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self._leaves
            or isinstance(m, FactorizedLinear)
            or getattr(type(m), "fx_leaf", False) is True
            or super().is_leaf_module(m, module_qualified_name)
        )


_CACHE_CONSEQUENCE = "features before the layer cannot be cached"


def trace_graph(
    model: nn.Module,
    leaves: Sequence[str],
    where: str,
    *,
    consequence: str = _CACHE_CONSEQUENCE,
) -> fx.Graph:
    """Trace ``model`` (in its current train/eval mode) with the named modules as leaves.

    Raises
    ------
    FairDeployError
        ``"<where>: torch.fx cannot trace the model (...); <consequence> for a model whose
        forward has data-dependent control flow"`` when tracing fails.
    """
    try:
        return _LeafTracer(*leaves).trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise FairDeployError(
            f"{where}: torch.fx cannot trace the model ({type(exc).__name__}: {exc}); "
            f"{consequence} for a model whose forward has data-dependent control flow"
        ) from None


def propagate_shapes(
    model: nn.Module, graph: fx.Graph, example: torch.Tensor
) -> dict[fx.Node, Any]:
    """The shape and dtype (``torch.fx.passes.shape_prop.TensorMetadata``) of every
    tensor-valued node of ``graph`` (traced from ``model``) on ``example``.

    The model runs once in eval mode under ``no_grad`` (the meta device works); every
    module's train/eval mode is restored after. Nodes whose value is not a tensor
    (Python numbers, tuples) are absent.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.GraphModule(model, graph)
    with _eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(example.clone())
    out = {}
    for n in graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[n] = meta
    return out


def _reachable(
    start: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]
) -> set[fx.Node]:
    """``start`` and every node reached from it by repeated ``step`` (inputs or users)."""
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    return _reachable([node], lambda n: n.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that depends on ``node`` (not ``node`` itself)."""
    return _reachable(node.users, lambda n: n.users)


_INPLACE_OPERATORS = {
    getattr(operator, name)
    for name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
                 "iand", "ior", "ixor", "ilshift", "irshift")
}


def is_inplace(model: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` may modify its inputs in place (``ReLU(inplace=True)``, ``x.add_``)."""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        return (
            bool(node.kwargs.get("inplace", False))
            or node.target in _INPLACE_OPERATORS
            or getattr(node.target, "__name__", "").endswith("_")
        )
    return False


def _dependent_operands(node: fx.Node, dependent: set[fx.Node]) -> int:
    """How many operands of ``node`` depend on the layer, counted as written: ``h * h``
    has two (``all_input_nodes`` would count ``h`` once and call it linear)."""
    count = 0
    for operand in (*node.args, *node.kwargs.values()):
        found: list[fx.Node] = []
        fx.node.map_arg(operand, found.append)  # the nodes inside (lists, tuples, dicts)
        count += any(n in dependent for n in found)
    return count


def describe_node(node: fx.Node) -> str:
    """A phrase naming what a node computes, for messages."""
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"the output of module {node.target!r}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"the result of {name} ({node.name!r})"


def _op_name(model: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the duration, each restored to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------- links


@dataclass(frozen=True, eq=False)
class Step:
    """One elementwise operation on the path between two layers.

    Attributes
    ----------
    node : torch.fx.Node
        The call in the traced graph.
    source : torch.fx.Node
        The node whose value the operation transforms (the previous step or the layer).
    op : Elementwise
        The table's entry for this call.
    target : str
        Qualified module name (``call_module``), else the function or method name.
    module : nn.Module or None
        The module, for ``call_module`` steps.
    in_place : bool
        The call writes into its input.
    """

    node: fx.Node
    source: fx.Node
    op: Elementwise
    target: str
    module: nn.Module | None
    in_place: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operation to ``x`` (a copy of it when the operation is in place)."""
        if self.in_place:
            x = x.clone()
        if self.module is not None:
            return self.module(x)
        args, kwargs = fx.node.map_arg((self.node.args, self.node.kwargs), lambda _n: x)
        if self.node.op == "call_method":
            return getattr(args[0], str(self.node.target))(*args[1:], **kwargs)
        return self.node.target(*args, **kwargs)  # type: ignore[operator]


@dataclass(frozen=True, eq=False)
class Link:
    """What lies between a layer and the neighbouring layer on one side of it.

    Attributes
    ----------
    layer : str
        The layer the link starts from.
    side : {"input", "output"}
        ``"input"``: from the layer that produces this layer's input; ``"output"``: to
        the layer that consumes its output.
    neighbour : str or None
        Qualified name of that ``nn.Linear`` / ``FactorizedLinear``, when the two are
        joined by elementwise operations only, nothing else reads the values in
        between (no fan-out, no skip connection), and each layer is called once.
    steps : tuple of Step
        The elementwise operations, in data-flow order (producer to consumer). When
        there is no neighbour: those found before the path stopped.
    reason : str
        Why there is no neighbour ("" when there is one).
    to_output : bool
        ``side == "output"`` and the layer's output reaches the model's output
        through ``steps`` alone.
    """

    layer: str
    side: str
    neighbour: str | None
    steps: tuple[Step, ...]
    reason: str = ""
    to_output: bool = False

    @property
    def plain(self) -> bool:
        """A neighbouring layer was found."""
        return self.neighbour is not None

    @property
    def zero_to_zero(self) -> bool:
        """Every step maps 0 to 0 (a neuron fixed at 0 stays 0)."""
        return all(s.op.zero_to_zero for s in self.steps)

    @property
    def piecewise_linear(self) -> bool:
        """Every step is piecewise linear."""
        return all(s.op.piecewise_linear for s in self.steps)

    @property
    def feature_modules(self) -> tuple[Step, ...]:
        """The steps whose module holds one parameter per feature."""
        return tuple(s for s in self.steps if s.op.feature_params)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Run the steps on ``x`` (e.g. a constant pre-activation, to fold it)."""
        for step in self.steps:
            x = step(x)
        return x


class ModelStructure:
    """The traced graph of a model in eval mode and the questions fairdeploy asks of it.

    Build it with :func:`analyze_structure`. The model is not modified and not copied:
    the analysis refers to its modules, so a caller that changes a module's weights in
    place (the export's private copy) keeps a valid analysis.
    """

    def __init__(
        self, model: nn.Module, graph: fx.Graph, example_input: torch.Tensor | None
    ) -> None:
        self.model = model
        self.graph = graph
        self._example = example_input
        self._shapes: dict[fx.Node, tuple[int, ...]] | None = None
        self._calls: dict[str, list[fx.Node]] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                self._calls.setdefault(str(n.target), []).append(n)
        (self._output,) = (n for n in graph.nodes if n.op == "output")

    # ------------------------------------------------------------------ basics

    def calls(self, name: str) -> int:
        """How many times ``forward`` calls the module ``name``."""
        return len(self._calls.get(name, []))

    def call_node(self, name: str) -> fx.Node:
        """The graph node of the single call of module ``name``.

        Raises
        ------
        FairDeployError
            If the module is not called exactly once.
        """
        calls = self._calls.get(name, [])
        if len(calls) != 1:
            raise FairDeployError(
                f"module {name!r} is called {len(calls)} times in forward(); the structure "
                "analysis needs a layer called exactly once"
            )
        return calls[0]

    def call_order(self, name: str) -> int:
        """Position of the first call of ``name`` in the graph (for sorting by data flow)."""
        first = self._calls[name][0]
        for i, n in enumerate(self.graph.nodes):
            if n is first:
                return i
        raise KeyError(name)  # pragma: no cover - the node is in the graph

    def _module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(str(node.target))

    def _is_layer(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self._module(node), LAYER_TYPES)

    def _shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The shape of ``node``'s value on the example input (None without one)."""
        if self._example is None:
            return None
        if self._shapes is None:
            try:
                metas = propagate_shapes(self.model, self.graph, self._example)
                self._shapes = {n: tuple(int(d) for d in m.shape) for n, m in metas.items()}
            except Exception:  # shapes are an optional refinement: unknown is safe
                self._shapes = {}
        return self._shapes.get(node)

    # ------------------------------------------------------------- elementwise

    def step(self, node: fx.Node) -> Step | None:
        """The node as an elementwise :class:`Step` on a single value, or None."""
        nodes = node.all_input_nodes
        if node.op not in ("call_module", "call_function", "call_method") or len(nodes) != 1:
            return None
        (source,) = nodes
        args, kwargs = node.args, dict(node.kwargs)
        module = None
        op: Elementwise | None
        if node.op == "call_module":
            module = self._module(node)
            if args != (source,) or kwargs:
                return None
            op = elementwise_module(module)
            target = str(node.target)
        elif node.op == "call_function":
            target = getattr(node.target, "__name__", str(node.target))
            if node.target in _ARITHMETIC_FUNCTIONS:
                if kwargs or source not in args or len(args) > 2:
                    return None
                pos = args.index(source)
                const = args[1 - pos] if len(args) == 2 else None
                op = _arithmetic(_ARITHMETIC_FUNCTIONS[node.target], pos, const)
            elif node.target in _FUNCTION_TABLE and args and args[0] is source:
                op = _FUNCTION_TABLE[node.target](args, kwargs)
            else:
                op = None
        else:
            target = str(node.target)
            if not args or args[0] is not source:
                return None
            if target in _ARITHMETIC_METHODS:
                if kwargs or len(args) > 2:
                    return None
                op = _arithmetic(_ARITHMETIC_METHODS[target], 0, args[1] if len(args) > 1 else None)
            elif target in _METHOD_TABLE:
                op = _METHOD_TABLE[target](args, kwargs)
            else:
                op = None
        if op is None:
            return None
        if op.rank_dependent:
            before, after = self._shape(source), self._shape(node)
            if before is None or len(before) != 2 or after != before:
                return None
        if op.feature_params and node.op == "call_module":
            # Per-channel parameters (PReLU's slopes) act on axis 1: the features of (N, C)
            # rows, but the tokens of (N, T, C). Where shapes are known, only rows link.
            before = self._shape(source)
            if before is not None and len(before) != 2:
                return None
        return Step(
            node=node,
            source=source,
            op=op,
            target=target,
            module=module,
            in_place=is_inplace(self.model, node),
        )

    # ------------------------------------------------------------------- links

    def _shared_feature_module(self, step: Step) -> str:
        """Why a step cannot be part of a link: its module holds per-feature parameters
        and is called elsewhere too (permuting or slicing it would change that call)."""
        if step.module is None or not step.op.feature_params or self.calls(step.target) == 1:
            return ""
        return (
            f"{step.target!r} holds one parameter per feature and is called "
            f"{self.calls(step.target)} times in forward()"
        )

    def _layer_node(self, layer: str) -> tuple[fx.Node | None, str]:
        n = self.calls(layer)
        if n != 1:
            return None, f"{layer!r} is called {n} times in forward()"
        return self._calls[layer][0], ""

    def following(self, layer: str) -> Link:
        """The path from ``layer``'s output to the next Linear (see :class:`Link`)."""
        node, why = self._layer_node(layer)
        if node is None:
            return Link(layer, "output", None, (), why)
        steps: list[Step] = []
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                what = "is not used" if not users else f"is used {len(users)} times (fan-out)"
                return Link(layer, "output", None, tuple(steps), f"{describe_node(cur)} {what}")
            (nxt,) = users
            if nxt is self._output:
                to_output = nxt.args == (cur,)
                why = "it feeds the model's output" if to_output else "it feeds a model output"
                return Link(layer, "output", None, tuple(steps), why, to_output=to_output)
            if self._is_layer(nxt):
                name = str(nxt.target)
                if nxt.args != (cur,) or nxt.kwargs:
                    return Link(layer, "output", None, tuple(steps),
                                f"{name!r} is called with more than this value")
                if self.calls(name) != 1:
                    return Link(layer, "output", None, tuple(steps),
                                f"{name!r} is called {self.calls(name)} times in forward()")
                return Link(layer, "output", name, tuple(steps))
            step = self.step(nxt)
            if step is None or step.source is not cur:
                return Link(layer, "output", None, tuple(steps),
                            f"{_op_name(self.model, nxt)} ({nxt.name!r}) is not elementwise")
            shared = self._shared_feature_module(step)
            if shared:
                return Link(layer, "output", None, tuple(steps), shared)
            steps.append(step)
            cur = nxt

    def preceding(self, layer: str) -> Link:
        """The path from the Linear that produces ``layer``'s input (see :class:`Link`)."""
        node, why = self._layer_node(layer)
        if node is None:
            return Link(layer, "input", None, (), why)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return Link(layer, "input", None, (), f"{layer!r} is not called with one input")
        steps: list[Step] = []
        consumer = node
        cur = node.args[0]
        while True:
            users = list(cur.users)
            if users != [consumer]:
                return Link(layer, "input", None, tuple(reversed(steps)),
                            f"{describe_node(cur)} is used {len(users)} times (fan-out)")
            if cur.op == "placeholder":
                return Link(layer, "input", None, tuple(reversed(steps)),
                            "its input is the model's input")
            if self._is_layer(cur):
                name = str(cur.target)
                if self.calls(name) != 1:
                    return Link(layer, "input", None, tuple(reversed(steps)),
                                f"{name!r} is called {self.calls(name)} times in forward()")
                return Link(layer, "input", name, tuple(reversed(steps)))
            step = self.step(cur)
            if step is None:
                what = (
                    "its input" if cur.op == "get_attr"
                    else f"{_op_name(self.model, cur)} ({cur.name!r})"
                )
                return Link(layer, "input", None, tuple(reversed(steps)),
                            f"{what} is not elementwise")
            shared = self._shared_feature_module(step)
            if shared:
                return Link(layer, "input", None, tuple(reversed(steps)), shared)
            steps.append(step)
            consumer, cur = cur, step.source

    # ---------------------------------------------------------------- readers

    def chain_to_output(self, layer: str) -> tuple[tuple[Step, ...], str | None] | None:
        """``(steps, final)`` when the logits are ``final(steps(layer output))`` — the
        layer's output passes through elementwise steps and at most one Linear (or
        FactorizedLinear) whose output is the model's output — else None."""
        link = self.following(layer)
        if link.to_output:
            return link.steps, None
        if link.neighbour is None:
            return None
        final = self._calls[link.neighbour][0]
        if list(final.users) == [self._output] and self._output.args == (final,):
            return link.steps, link.neighbour
        return None

    def not_piecewise_linear_after(self, layer: str) -> list[str]:
        """Sorted names of the operations after ``layer`` that are not (piecewise) linear
        in it. Empty: the logits are piecewise linear in the layer's output."""
        node, _ = self._layer_node(layer)
        starts = [node] if node is not None else self._calls.get(layer, [])
        after: set[fx.Node] = set()
        for s in starts:
            after |= _descendants(s)
        bad = {
            _op_name(self.model, n)
            for n in after
            if not self._piecewise_linear(n, after | set(starts))
        }
        return sorted(bad)

    def _piecewise_linear(self, node: fx.Node, dependent: set[fx.Node]) -> bool:
        if node.op in ("output", "placeholder", "get_attr"):
            return True
        if node.op == "call_module":
            module = self._module(node)
            entry = elementwise_module(module)
            if entry is not None:
                return entry.piecewise_linear
            return isinstance(module, PIECEWISE_LINEAR_MODULES)
        step = self.step(node)
        if step is not None:
            return step.op.piecewise_linear
        target = node.target
        if node.op == "call_function":
            if target in _LINEAR_FUNCTIONS:
                return True
            if target in _BILINEAR_FUNCTIONS or target is operator.truediv:
                if target is operator.truediv:
                    return not (len(node.args) > 1 and node.args[1] in dependent)
                return _dependent_operands(node, dependent) <= 1
            return False
        if target in _LINEAR_METHODS:
            return True
        if target in _BILINEAR_METHODS or target in ("div", "div_"):
            if target in ("div", "div_"):
                return not (len(node.args) > 1 and node.args[1] in dependent)
            return _dependent_operands(node, dependent) <= 1
        return False

    def following_activation(self, layer: str) -> str | None:
        """Qualified name of the activation module that follows ``layer``, if any.

        The first operation after the layer that is not a no-op (Dropout in eval mode,
        Identity), when it is an activation *module* (ReLU, GELU, PReLU, …) that receives
        the layer's output alone. None when the layer's output goes elsewhere first, is
        used more than once, or the activation is a function call (it has no module to
        hook).
        """
        for step in self.following(layer).steps:
            if step.op.kind == "noop":
                continue
            if step.op.kind == "activation" and step.module is not None:
                return step.target
            return None
        return None


def analyze_structure(
    model: nn.Module,
    *,
    leaves: Sequence[str] = (),
    example_input: torch.Tensor | None = None,
) -> ModelStructure:
    """Trace ``model`` in eval mode and return its :class:`ModelStructure`.

    Parameters
    ----------
    model : nn.Module
        Any model (the meta device works). Its modules' train/eval modes are restored
        after tracing; nothing else is touched.
    leaves : sequence of str
        Extra qualified module names to keep as leaves (``nn`` modules and
        ``FactorizedLinear`` always are).
    example_input : torch.Tensor, optional
        A batch the model accepts (may be on the meta device). Only needed to accept
        rank-dependent operations (BatchNorm1d, flatten) as elementwise; shapes are
        propagated once, when first needed.

    Raises
    ------
    FairDeployError
        If the model cannot be traced (data-dependent control flow in ``forward``).
    """
    with _eval_mode(model):
        graph = trace_graph(
            model,
            leaves,
            f"cannot analyse {type(model).__name__}",
            consequence="what surrounds its layers cannot be worked out",
        )
    return ModelStructure(model, graph, example_input)
