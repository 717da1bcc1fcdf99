"""Compact ONNX storage of partly-int8 and pruned weight tensors, rebuilt when a session loads.

A weight whose entries fall into up to three classes — *zero* (pruned), *int8* (quantized
per output channel: ``value = q · scale[c]``) and *float* (left as float32) — is stored
without the float copy of the entries that do not need it:

* a bit-packed mask (``np.packbits``, 1 bit per entry) saying which entries belong to the
  most numerous class, and, when all three classes occur, a second mask over the remaining
  entries;
* the int8 values of the quantized entries only (1 byte each) and the per-channel float32
  scales (one per output channel, axis 0 of the PyTorch weight);
* the float32 values of the float entries only (4 bytes each); zeros cost nothing.

A small graph made only of initializers rebuilds the dense float tensor under the
initializer's old name (``BitwiseAnd``, or ``Mod`` and ``Greater`` below opset 18,
unpacks the mask, ``CumSum``/``Gather`` place the
compact values, ``Cast``/``Mul`` de-quantize, ``Where`` merges the classes, ``Reshape`` and,
for a weight the exporter stored transposed, ``Transpose``). Every input of that graph is a
constant, so ONNX Runtime's constant folding (graph optimization level ``basic`` and above,
on by default) replaces it by the plain float tensor when the session loads: inference then
runs the same ``Gemm``/``MatMul``/``Conv`` on the same weights as a dense export, at dense
speed and with bit-identical outputs. ``DequantizeLinear`` is deliberately not used: ONNX
Runtime keeps it unfolded (QDQ patterns are preserved for quantized kernels). With graph
optimizations disabled (``ORT_DISABLE_ALL``) the rebuild would run on every inference:
correct, but slow.

Only the classes are given (:class:`PackSpec`); how the masks were chosen (FairPrune,
FairQuantize, anything else) does not matter here. Each tensor is packed only if that makes
it smaller, counting the serialized bytes of the rebuild nodes too; otherwise it stays dense
and the report says why.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fairdeploy._json import JsonRecord
from fairdeploy.errors import FairDeployError

__all__ = [
    "PackReport", "PackSpec", "PackedTensor", "UnpackReport", "pack_weights", "unpack_weights",
]

ZERO, INT8, FLOAT = "zero", "int8", "float"
#: Class order used to break ties when choosing which class the first mask marks.
_CLASSES = (ZERO, INT8, FLOAT)
#: CumSum and Slice-with-inputs need opset 11.
_MIN_OPSET = 11
#: Prefix of the names of rebuild intermediates and shared constants; kept short because
#: every name is stored in the file (twice for a node output).
_PREFIX = "_pk"


@dataclass(frozen=True, eq=False)
class PackSpec:
    """How the entries of one PyTorch weight are stored.

    Attributes
    ----------
    weight : array-like
        The parameter exactly as the model that was exported holds it (float32; the
        de-quantized and pruned values). Used to find its initializer in the ONNX graph (by
        name, then by value, as stored or transposed) and to check the classes below.
    quantized : array-like of bool, optional
        Entries stored as int8, same shape as ``weight``.
    int8_values : array-like of int, optional
        The int8 values of the quantized entries: same shape as ``weight`` (entries outside
        ``quantized`` are ignored) or one value per quantized entry in row-major order.
    scales : array-like of float, optional
        Per-output-channel scales, shape ``(weight.shape[0],)``: a quantized entry in
        channel ``c`` is ``float32(q) · float32(scales[c])``, and ``weight`` must hold
        exactly that float32 product.
    pruned : array-like of bool, optional
        Entries that are zero (pruned), same shape as ``weight``; ``weight`` must be 0 there.

    Entries in neither mask are stored as float32.
    """

    weight: Any
    quantized: Any = None
    int8_values: Any = None
    scales: Any = None
    pruned: Any = None


@dataclass(frozen=True)
class PackedTensor(JsonRecord):
    """What :func:`pack_weights` stored for one weight.

    Attributes
    ----------
    parameter, initializer : str
        The PyTorch parameter name and the ONNX initializer that held it.
    transposed : bool
        The initializer holds the transpose of the PyTorch weight (a Linear exported as
        ``MatMul``); the rebuild ends with a ``Transpose``.
    stored : {"packed", "dense"}
        Whether compact storage was used or the dense tensor kept.
    reason : str
        Why (bytes saved or what packing would have cost).
    entries, zero, int8, float : int
        Entries in total and per class.
    dense_bytes, packed_bytes : int
        Initializer bytes of the dense float32 tensor and of the compact storage (masks,
        values, scales, the tensor's own index constants; not the constants shared by all
        rebuilds, which :attr:`PackReport.shared_bytes` counts once).
    dense_file_bytes, packed_file_bytes : int
        Serialized protobuf bytes of the same: the dense initializer, and the compact
        initializers plus the rebuild nodes (what the ``.onnx`` file grows or shrinks by).
    """

    parameter: str
    initializer: str
    transposed: bool
    stored: str
    reason: str
    entries: int
    zero: int
    int8: int
    float: int
    dense_bytes: int
    packed_bytes: int
    dense_file_bytes: int
    packed_file_bytes: int

    @property
    def bits_per_entry(self) -> float:
        """Stored bits per weight entry (32 for a dense float32 tensor)."""
        stored = self.packed_bytes if self.stored == "packed" else self.dense_bytes
        return 8.0 * stored / self.entries

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = super().to_dict()
        out["bits_per_entry"] = self.bits_per_entry
        return out


@dataclass(frozen=True)
class PackReport:
    """Per-tensor storage and whole-model sizes before and after :func:`pack_weights`.

    Attributes
    ----------
    tensors : tuple of PackedTensor
        One per entry of the packing mapping, in its order.
    shared_bytes : int
        Initializer bytes of the small constants all rebuilds share (bit shifts, shapes).
    initializer_bytes_before, initializer_bytes_after : int
        Sum over the model's initializers of elements × element size.
    model_bytes_before, model_bytes_after : int or None
        Serialized model size (the size of a single-file ``.onnx``); None when the packing
        ran inside :func:`~fairdeploy.export.export_onnx`, whose result holds the written
        file's sizes (measuring them here would serialize the whole model twice).
    checked : bool
        Whether the rebuild graphs were (or, for an export with ``defer``, are to
        be) checked to reproduce every packed weight bit for bit.
    """

    tensors: tuple[PackedTensor, ...]
    shared_bytes: int
    initializer_bytes_before: int
    initializer_bytes_after: int
    model_bytes_before: int | None
    model_bytes_after: int | None
    checked: bool = field(default=False)

    @property
    def initializer_ratio(self) -> float:
        """Initializer bytes before ÷ after (the measured byte C.R. of the packing)."""
        return self.initializer_bytes_before / self.initializer_bytes_after

    @property
    def file_ratio(self) -> float | None:
        """Serialized model bytes before ÷ after (None when they were not measured)."""
        if self.model_bytes_before is None or self.model_bytes_after is None:
            return None
        return self.model_bytes_before / self.model_bytes_after

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for report.json)."""
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "shared_bytes": self.shared_bytes,
            "initializer_bytes_before": self.initializer_bytes_before,
            "initializer_bytes_after": self.initializer_bytes_after,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "initializer_ratio": self.initializer_ratio,
            "file_ratio": self.file_ratio,
            "checked": self.checked,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: one per tensor, then the totals."""
        lines = []
        for t in self.tensors:
            lines.append(
                f"{t.parameter} -> {t.initializer}{' (transposed)' if t.transposed else ''}: "
                f"{t.stored}, {t.entries} entries (zero {t.zero}, int8 {t.int8}, float "
                f"{t.float}), {t.dense_bytes} -> "
                f"{t.packed_bytes if t.stored == 'packed' else t.dense_bytes} bytes "
                f"({t.bits_per_entry:.2f} bits/entry)"
            )
        total = (f"initializers {self.initializer_bytes_before} -> "
                 f"{self.initializer_bytes_after} bytes ({self.initializer_ratio:.4f}x)")
        if self.file_ratio is not None:
            total += (f", model {self.model_bytes_before} -> {self.model_bytes_after} bytes "
                      f"({self.file_ratio:.4f}x)")
        lines.append(total)
        return lines


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True, eq=False)
class _Classes:
    """One weight's entry classes, validated, in PyTorch layout (flattened row-major)."""

    parameter: str
    weight: np.ndarray  # float32, PyTorch shape
    is_zero: np.ndarray  # bool, flat
    is_int8: np.ndarray  # bool, flat
    q: np.ndarray  # int8 values of the quantized entries, row-major
    scales: np.ndarray  # float32 (Dout,)

    @property
    def counts(self) -> dict[str, int]:
        nz, nq = int(self.is_zero.sum()), int(self.is_int8.sum())
        return {ZERO: nz, INT8: nq, FLOAT: self.weight.size - nz - nq}


def _as_array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise FairDeployError(f"{what} cannot be read as an array ({exc})") from None


def _mask(x: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    m = _as_array(x, what)
    if m.dtype != np.bool_:
        raise FairDeployError(f"{what} has dtype {m.dtype}: give a boolean mask")
    if m.shape != shape:
        raise FairDeployError(f"{what} has shape {m.shape}: give the weight's shape {shape}")
    return m.reshape(-1)


def _checked_weight(parameter: str, spec: PackSpec) -> np.ndarray:
    """The float32, non-empty, contiguous weight of ``spec`` (else one error line)."""
    if not isinstance(spec, PackSpec):
        raise FairDeployError(
            f"packing[{parameter!r}] is a {type(spec).__name__}: give a PackSpec"
        )
    w = _as_array(spec.weight, f"packing[{parameter!r}].weight")
    if w.dtype != np.float32:
        raise FairDeployError(
            f"packing[{parameter!r}].weight has dtype {w.dtype}: only float32 weights are packed"
        )
    if w.ndim < 1 or w.size == 0:
        raise FairDeployError(
            f"packing[{parameter!r}].weight has shape {w.shape}: give a non-empty weight"
        )
    if w.size >= 2**31:
        raise FairDeployError(
            f"packing[{parameter!r}].weight has {w.size} entries: at most 2**31 - 1 are packed"
        )
    return np.ascontiguousarray(w)


def _classes(parameter: str, spec: PackSpec) -> _Classes:
    w = _checked_weight(parameter, spec)
    shape = tuple(w.shape)
    n = w.size
    where = f"packing[{parameter!r}]"
    is_zero = (
        np.zeros(n, bool) if spec.pruned is None else _mask(spec.pruned, shape, f"{where}.pruned")
    )
    flat = w.reshape(-1)
    if np.any(flat[is_zero] != 0):
        bad = int(np.count_nonzero(flat[is_zero]))
        raise FairDeployError(
            f"{where}: {bad} pruned entries of the weight are not 0: give the weight of the "
            "pruned model (zeros where the mask is set)"
        )
    scales = np.zeros(0, np.float32)
    q = np.zeros(0, np.int8)
    if spec.quantized is None:
        is_int8 = np.zeros(n, bool)
        if spec.int8_values is not None or spec.scales is not None:
            raise FairDeployError(
                f"{where}: int8_values or scales were given without a quantized mask: give "
                "quantized= (the boolean mask of int8 entries) too"
            )
    else:
        is_int8 = _mask(spec.quantized, shape, f"{where}.quantized")
        if np.any(is_int8 & is_zero):
            raise FairDeployError(
                f"{where}: {int(np.sum(is_int8 & is_zero))} entries are both pruned and "
                "quantized: an entry belongs to one class"
            )
        q, scales = _int8_parts(where, is_int8, spec, shape)
        per_channel = is_int8.reshape(shape[0], -1).sum(axis=1)
        deq = q.astype(np.float32) * np.repeat(scales, per_channel)
        # Compare bits, so -0.0 and NaN are not glossed over.
        diff = deq.view(np.uint32) != flat[is_int8].view(np.uint32)
        if np.any(diff):
            worst = float(np.max(np.abs(deq[diff].astype(np.float64) - flat[is_int8][diff])))
            raise FairDeployError(
                f"{where}: {int(diff.sum())} of {deq.size} quantized entries differ from "
                f"float32(int8 value) × float32(scale) (max |Δ| {worst:g}): the weight must "
                "hold exactly the de-quantized values, computed in float32 as "
                "q.float() * scale[c]"
            )
    return _Classes(parameter, w, is_zero, is_int8, q, scales)


def _int8_parts(
    where: str, is_int8: np.ndarray, spec: PackSpec, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    if spec.int8_values is None or spec.scales is None:
        raise FairDeployError(
            f"{where}: a quantized mask needs int8_values and scales (one per output channel)"
        )
    v = _as_array(spec.int8_values, f"{where}.int8_values")
    if not np.issubdtype(v.dtype, np.integer):
        raise FairDeployError(f"{where}.int8_values has dtype {v.dtype}: give integers (int8)")
    nq = int(is_int8.sum())
    if v.shape == shape:
        v = v.reshape(-1)[is_int8]
    elif v.shape != (nq,):
        raise FairDeployError(
            f"{where}.int8_values has shape {v.shape}: give the weight's shape {shape} or one "
            f"value per quantized entry ({nq},)"
        )
    if v.size and (v.min() < -128 or v.max() > 127):
        raise FairDeployError(
            f"{where}.int8_values range over [{v.min()}, {v.max()}]: int8 holds [-128, 127]"
        )
    s = _as_array(spec.scales, f"{where}.scales")
    if s.shape != (shape[0],) or not np.issubdtype(s.dtype, np.floating):
        raise FairDeployError(
            f"{where}.scales has shape {s.shape} and dtype {s.dtype}: give one float per "
            f"output channel, shape ({shape[0]},)"
        )
    s = s.astype(np.float32)
    if not np.all(np.isfinite(s)):
        raise FairDeployError(f"{where}.scales holds non-finite values: give finite scales")
    return v.astype(np.int8), s


# --------------------------------------------------------------------------- finding weights


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _find_initializer(
    parameter: str, weight: np.ndarray, inits: dict[str, onnx.TensorProto]
) -> tuple[str, bool]:
    """The initializer holding ``weight`` (or its transpose): by name, then by value."""
    candidates = []
    if parameter in inits:
        candidates.append(parameter)
    candidates += [name for name in inits if name != parameter]
    shapes = {tuple(weight.shape)}
    if weight.ndim == 2:
        shapes.add(tuple(weight.shape[::-1]))
    found: list[tuple[str, bool]] = []
    for name in candidates:
        t = inits[name]
        if t.data_type != TensorProto.FLOAT or tuple(t.dims) not in shapes:
            continue
        arr = numpy_helper.to_array(t)
        if _same_bits(arr, weight):
            found.append((name, False))
        elif weight.ndim == 2 and _same_bits(arr, weight.T):
            found.append((name, True))
        if found and found[0][0] == parameter:
            return found[0]  # the exporter kept the parameter's name
    if len(found) == 1:
        return found[0]
    if not found:
        named = (
            f" (initializer {parameter!r} has shape {tuple(inits[parameter].dims)} and other "
            "values)" if parameter in inits else ""
        )
        raise FairDeployError(
            f"weight {parameter!r} {tuple(weight.shape)} was not found in the ONNX model: no "
            f"float32 initializer holds its values (as stored or transposed){named}. Export "
            "the model that holds exactly these (de-quantized, pruned) weights, and pack that "
            "export"
        )
    raise FairDeployError(
        f"weight {parameter!r} matches {len(found)} initializers by value "
        f"({', '.join(n for n, _ in found)}) and none by name: cannot tell which to pack"
    )


# --------------------------------------------------------------------------- graph building


class _Graph:
    """Names in use, and the small constants all rebuild graphs share (stored once)."""

    def __init__(self, taken: set[str], *, opset: int = 18) -> None:
        self.taken = set(taken)
        self.opset = opset
        self.shared: dict[str, onnx.TensorProto] = {}
        self._keys: dict[str, str] = {}
        self._n = 0

    def unique(self, name: str) -> str:
        """``name``, or ``name`` with a suffix if the model already uses it."""
        out, i = name, 0
        while out in self.taken:
            i += 1
            out = f"{name}_{i}"
        self.taken.add(out)
        return out

    def fresh(self) -> str:
        """A new short name for an intermediate value."""
        self._n += 1
        return self.unique(f"{_PREFIX}{self._n}")

    def const(self, key: str, value: np.ndarray) -> str:
        """A constant used by every rebuild (stored once)."""
        if key not in self._keys:
            name = self.unique(f"{_PREFIX}.{key}")
            self._keys[key] = name
            self.shared[name] = numpy_helper.from_array(value, name)
        return self._keys[key]


class _Tensor:
    """Builds one tensor's rebuild nodes and compact initializers."""

    def __init__(self, graph: _Graph, target: str) -> None:
        self.g = graph
        self.target = target
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, key: str, value: np.ndarray) -> str:
        name = self.g.unique(f"{self.target}.{key}")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.g.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def unpack(self, bits: np.ndarray, key: str, *, exact: bool) -> str:
        """bool per entry of ``bits``, stored bit-packed (np.packbits: first entry in the
        top bit). ``exact``: cut to ``len(bits)``; else up to 7 padding False follow.

        Every step is defined for every input, and computed alike, in every runtime
        (DESIGN.md "Portable artifacts"): opset ≥ 18 ANDs each byte with 128, 64, …, 1
        and casts to bool (nonzero is True); older opsets widen to int32 and test
        ``byte mod 2^(8−k) > 2^(7−k) − 1``. Not ``BitShift``: the former ``(x << k) >> 7``
        relied on the left shift wrapping in 8 bits, which OpenVINO does not do, and
        OpenVINO's constant folding of a uint8 right shift rounds (195 >> 7 gave 2).
        """
        g = self.g
        packed = self.init(key, np.packbits(bits).reshape(-1, 1))
        if g.opset >= 18:
            x = self.node("BitwiseAnd", [packed, g.const(
                "bits", np.array([128, 64, 32, 16, 8, 4, 2, 1], np.uint8))])
            x = self.node("Cast", [x], to=TensorProto.BOOL)
        else:
            x = self.node("Cast", [packed], to=TensorProto.INT32)
            x = self.node("Mod", [x, g.const(
                "mods", np.array([256, 128, 64, 32, 16, 8, 4, 2], np.int32))])
            x = self.node("Greater", [x, g.const(
                "tops", np.array([127, 63, 31, 15, 7, 3, 1, 0], np.int32))])
        x = self.node("Reshape", [x, g.const("flat", np.array([-1]))])
        if exact and bits.size % 8:
            end = self.init(key + "_len", np.array([bits.size]))
            x = self.node("Slice", [x, g.const("start", np.array([0])), end])
        return x

    def position(self, indicator: str) -> str:
        """For each entry, how many entries before it have ``indicator`` 1 (int32): the
        entry's position in its class's compact values where the indicator is 1."""
        return self.node("CumSum", [indicator, self.g.const("axis0", np.array(0, np.int32))],
                         exclusive=1)


def _pack_order(counts: dict[str, int]) -> list[str]:
    present = [c for c in _CLASSES if counts[c] > 0]
    return sorted(present, key=lambda c: -counts[c])  # stable: ties keep _CLASSES order


def _build_tensor(graph: _Graph, cls: _Classes, target: str, transposed: bool) -> _Tensor:
    """Compact initializers and rebuild nodes whose last output is ``target``.

    ONNX Runtime's constant folding costs about as much per byte of every intermediate
    tensor as loading the weight itself, so the graph keeps full-size intermediates few and
    narrow: uint8 bits, one int32 CumSum per class (exclusive, so no "− 1"; each compact
    table carries one padding entry so the count after a class's last entry is still a
    valid index), int8 until de-quantization. ``NonZero``/``ScatterND`` would be cheaper
    for a rare class, but ONNX Runtime does not fold ``NonZero``.
    """
    rebuild = _Rebuild(_Tensor(graph, target), cls, transposed)
    order = _pack_order(cls.counts)
    if len(order) == 1:  # one class: no mask needed (float alone is never packed)
        rebuild.single_class(order[0])
    else:
        rebuild.merged_classes(order)
    if transposed:
        rebuild.t.node("Transpose", [rebuild.dense_name], target, perm=[1, 0])
    return rebuild.t


class _Rebuild:
    """The nodes that rebuild one dense weight (PyTorch layout) from its compact storage,
    ending in ``dense_name`` (the target, or an intermediate the Transpose reads)."""

    def __init__(self, t: _Tensor, cls: _Classes, transposed: bool) -> None:
        self.t, self.cls = t, cls
        self.shape = tuple(cls.weight.shape)
        self.flat = cls.weight.reshape(-1)
        self.pshape = t.init("shape", np.array(self.shape, np.int64))
        self.is_class = {
            ZERO: cls.is_zero, INT8: cls.is_int8, FLOAT: ~(cls.is_zero | cls.is_int8)
        }
        self.dense_name = t.g.fresh() if transposed else t.target
        self._made: dict[str, str] = {}

    def dequantized(self, index: str | None, *, flat_out: bool) -> str:
        """The int8 values times their channel's scale: all entries (``index`` None), or
        gathered at ``index``; flat, or in the weight's shape as ``dense_name``."""
        t, cls, shape = self.t, self.cls, self.shape
        if index is None:
            x = t.node("Reshape", [t.init("int8", cls.q), self.pshape])
        else:
            x = t.node("Gather", [t.init("int8", np.append(cls.q, np.int8(0))), index])
            x = t.node("Reshape", [x, self.pshape])  # int8: a quarter of the bytes of float
        x = t.node("Cast", [x], to=TensorProto.FLOAT)
        bshape = (shape[0],) + (1,) * (len(shape) - 1)
        x = t.node("Mul", [x, t.init("scales", cls.scales.reshape(bshape))],
                   None if flat_out else self.dense_name)
        return t.node("Reshape", [x, t.g.const("flat", np.array([-1]))]) if flat_out else x

    def values(self, c: str, indicator: Any) -> str:
        """Flat values of class ``c`` at every entry (valid where ``indicator()``, an int32
        0/1 tensor made on demand, is 1; a zero class needs none)."""
        t = self.t
        if c == ZERO:
            return t.g.const("zero", np.array(0, np.float32))  # broadcast by Where
        index = t.position(indicator())
        if c == INT8:
            return self.dequantized(index, flat_out=True)
        table = np.append(self.flat[self.is_class[FLOAT]], np.float32(0))
        return t.node("Gather", [t.init("float", table), index])

    def single_class(self, c: str) -> None:
        """Every entry in class ``c`` (zero or int8): no mask."""
        if c == ZERO:
            self.t.node("ConstantOfShape", [self.pshape], self.dense_name,
                        value=numpy_helper.from_array(np.zeros(1, np.float32)))
        else:
            self.dequantized(None, flat_out=False)

    def _once(self, key: str, make: Any) -> str:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def merged_classes(self, order: list[str]) -> None:
        """Two or three classes: a mask marks the most numerous (A); with three, a second
        mask over the other entries marks B among them; ``Where`` merges the values."""
        t, g, i32 = self.t, self.t.g, TensorProto.INT32
        a = order[0]
        bits_a = t.unpack(self.is_class[a], "mask", exact=True)

        def ind_a() -> str:
            return self._once("a", lambda: t.node("Cast", [bits_a], to=i32))  # bool → 0/1

        def not_a() -> str:
            one = g.const("one", np.array(1, np.int32))
            return self._once("not_a", lambda: t.node("Sub", [one, ind_a()]))

        v_a = self.values(a, ind_a)
        if len(order) == 2:
            v_rest = self.values(order[1], not_a)
        else:
            b, c = order[1], order[2]
            rest = ~self.is_class[a]
            # One bit per non-A entry (plus a padding bit, so the count after the last
            # non-A entry still indexes a bit), spread over all entries by position; the
            # value read at an A entry is meaningless and overridden by the outer Where.
            bits_b = t.unpack(np.append(self.is_class[b][rest], False), "mask2", exact=False)
            b_any = t.node("Gather", [bits_b, t.position(not_a())])

            def ind_b() -> str:
                return self._once("b", lambda: t.node(
                    "Mul", [t.node("Cast", [b_any], to=i32), not_a()]))

            v_b = self.values(b, ind_b)
            v_c = self.values(c, lambda: t.node("Sub", [not_a(), ind_b()]))
            v_rest = t.node("Where", [b_any, v_b, v_c])
        merged = t.node("Where", [bits_a, v_a, v_rest])
        t.node("Reshape", [merged, self.pshape], self.dense_name)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


# --------------------------------------------------------------------------- self-check


def _check_rebuild(
    graph: _Graph, built: list[tuple[_Tensor, np.ndarray]], opset: int, ir_version: int
) -> None:
    """Run only the rebuild graphs in ONNX Runtime and compare with the expected tensors,
    bit for bit (pruned entries as +0.0). A mismatch is a bug in this module."""
    import onnxruntime as ort

    nodes = [n for t, _ in built for n in t.nodes]
    inits = [i for t, _ in built for i in t.inits] + list(graph.shared.values())
    outs = [
        helper.make_tensor_value_info(t.target, TensorProto.FLOAT, list(e.shape))
        for t, e in built
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "rebuild", [], outs, inits),
        opset_imports=[helper.make_opsetid("", opset)],
        # The exported model's IR version: the newest onnx writes may be newer than the
        # installed ONNX Runtime reads (seen: onnx 1.23 writes IR 14, ORT 1.30 reads ≤ 13).
        ir_version=ir_version,
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Executed, not folded: the same kernels, several times faster than constant folding.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {})
    for (t, expected), g in zip(built, got, strict=True):
        if not _same_bits(np.ascontiguousarray(g), expected):
            raise RuntimeError(f"packed storage of {t.target} does not rebuild its weight")


# --------------------------------------------------------------------------- public API


@dataclass(eq=False)
class _Plan:
    """How one weight will be stored (filled in while deciding)."""

    cls: _Classes
    initializer: onnx.TensorProto
    transposed: bool
    dense_file: int  # serialized bytes of the dense initializer
    built: _Tensor | None = None  # the rebuild graph, when packing pays
    packed_file: int = 0
    reason: str = ""

    def record(self) -> PackedTensor:
        counts = self.cls.counts
        dense_bytes = _tensor_bytes(self.initializer)
        packed = self.built is not None
        return PackedTensor(
            parameter=self.cls.parameter,
            initializer=self.initializer.name,
            transposed=self.transposed,
            stored="packed" if packed else "dense",
            reason=self.reason,
            entries=self.cls.weight.size,
            zero=counts[ZERO],
            int8=counts[INT8],
            float=counts[FLOAT],
            dense_bytes=dense_bytes,
            packed_bytes=(sum(_tensor_bytes(i) for i in self.built.inits)  # type: ignore[union-attr]
                          if packed else dense_bytes),
            dense_file_bytes=self.dense_file,
            packed_file_bytes=self.packed_file if packed else self.dense_file,
        )


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    from fairdeploy.export._sizes import _load_header

    _load_header(model)  # user-facing error for a missing or corrupt file
    return onnx.load(os.fspath(model))


def pack_weights(
    model: str | os.PathLike[str] | onnx.ModelProto,
    packing: Mapping[str, PackSpec],
    *,
    output_path: str | os.PathLike[str] | None = None,
    check: bool = True,
    copy: bool = True,
) -> tuple[onnx.ModelProto, PackReport]:
    """Store pruned and partly-int8 weights of an exported model compactly.

    Each weight named in ``packing`` is found among the model's initializers (by the
    PyTorch parameter name, else by value, as stored or transposed) and replaced by compact
    storage plus a constant-only graph that rebuilds the dense float tensor under the same
    name; ONNX Runtime folds that graph when a session loads (see the module docstring), so
    the packed model computes exactly what the dense export computes, at the same speed.
    A tensor is packed only when that saves serialized bytes; otherwise it stays dense.

    Parameters
    ----------
    model : path-like or onnx.ModelProto
        The exported model holding the de-quantized / pruned weights (not modified).
    packing : mapping of str to PackSpec
        PyTorch parameter name → its entry classes.
    output_path : path-like, optional
        Write the packed model there (atomically; one file, or ``.onnx.data`` beside it
        beyond 2 GB).
    check : bool
        Run the rebuild graphs in ONNX Runtime and require them to reproduce every packed
        weight bit for bit (pruned entries as +0.0) before returning.
    copy : bool
        With a ModelProto: pack a copy (default) or, False, the given model in place.

    Returns
    -------
    (onnx.ModelProto, PackReport)
        The packed model (checked with ``onnx.checker`` full check) and what was stored.

    Raises
    ------
    FairDeployError
        A spec that contradicts its weight (pruned entries not zero, int8 × scale not equal
        to the weight), masks of the wrong shape, a weight not found in the model, an opset
        below 11.
    """
    from fairdeploy.export._metadata import save_atomic

    if not isinstance(packing, Mapping):
        raise FairDeployError(
            f"packing is a {type(packing).__name__}: give a mapping of parameter name to PackSpec"
        )
    if output_path is not None and Path(output_path).suffix != ".onnx":
        raise FairDeployError(f"output path {str(output_path)!r} must end in .onnx")
    proto = model if isinstance(model, onnx.ModelProto) and not copy else _load(model)
    report, _ = _pack(proto, packing, check_now=check, model_bytes=True)
    if not check:
        report = dataclasses.replace(report, checked=False)
    onnx.checker.check_model(proto, full_check=True)
    if output_path is not None:
        save_atomic(proto, Path(output_path))
    return proto, report


def _pack(
    proto: onnx.ModelProto, packing: Mapping[str, PackSpec], *, check_now: bool,
    model_bytes: bool = False,
) -> tuple[PackReport, Callable[[], None] | None]:
    """:func:`pack_weights` of ``proto`` in place, without ``onnx.checker`` (the caller
    checks what it writes) and, unless ``model_bytes``, without measuring the serialized
    model. The bit-for-bit rebuild check runs now (``check_now``) or is returned for the
    caller to run (None when nothing was packed)."""
    opset = _checked_opset(proto)
    classes = [_classes(name, spec) for name, spec in packing.items()]
    init_bytes_before = _initializer_bytes(proto)
    model_bytes_before = proto.ByteSize() if model_bytes else None

    graph = _Graph(
        {t.name for t in proto.graph.initializer}
        | {i.name for i in proto.graph.input}
        | {o for n in proto.graph.node for o in n.output},
        opset=opset,
    )
    plans = _plan_tensors(proto, classes, graph)
    packed, shared = _packed_if_shared_constants_pay(plans, graph)
    check = None
    if packed:
        targets = [(p.built, p.cls, p.transposed) for p in packed]
        check = functools.partial(_check_packed, graph, targets, opset, proto.ir_version)
        if check_now:
            check()
    _replace_initializers(proto, packed, shared)
    records = [p.record() for p in plans]
    if packed:
        _record_packed_metadata(proto, records)
    report = PackReport(
        tensors=tuple(records),
        shared_bytes=sum(_tensor_bytes(c) for c in shared),
        initializer_bytes_before=init_bytes_before,
        initializer_bytes_after=_initializer_bytes(proto),
        model_bytes_before=model_bytes_before,
        model_bytes_after=proto.ByteSize() if model_bytes else None,
        checked=bool(packed),
    )
    return report, None if check_now else check


def _checked_opset(proto: onnx.ModelProto) -> int:
    opset = _opset(proto)
    if opset < _MIN_OPSET:
        raise FairDeployError(
            f"the model uses opset {opset}: packing needs opset ≥ {_MIN_OPSET} (export with "
            f"opset={_MIN_OPSET} or later)"
        )
    return opset


def _plan_tensors(
    proto: onnx.ModelProto, classes: list[_Classes], graph: _Graph
) -> list[_Plan]:
    """Per weight: its initializer, and the rebuild graph where packing saves bytes."""
    inits = {t.name: t for t in proto.graph.initializer}
    graph_inputs = {i.name for i in proto.graph.input}
    plans: list[_Plan] = []
    claimed: dict[str, str] = {}
    for cls in classes:
        target, transposed = _find_initializer(cls.parameter, cls.weight, inits)
        if target in claimed:
            raise FairDeployError(
                f"weights {claimed[target]!r} and {cls.parameter!r} both resolve to initializer "
                f"{target!r}: give each weight once"
            )
        claimed[target] = cls.parameter
        if target in graph_inputs:
            raise FairDeployError(
                f"initializer {target!r} is also a graph input (it can be overridden at run "
                "time), so it cannot be rebuilt from constants: export without "
                "keep_initializers_as_inputs"
            )
        plans.append(_plan_tensor(graph, cls, inits[target], transposed))
    return plans


def _serialized_bytes(t: onnx.TensorProto) -> int:
    """``t.ByteSize()`` without serializing a large ``raw_data``: its length follows from the
    dims and the element type (1 tag byte of field 9, the length's varint, the bytes)."""
    if not t.HasField("raw_data") or t.data_type not in _FIXED_SIZE_TYPES:
        return t.ByteSize()
    head = TensorProto()
    for fd in t.DESCRIPTOR.fields:  # not ListFields(): it would copy raw_data out
        if fd.name == "raw_data":
            continue
        value = getattr(t, fd.name)
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == 3  # protobuf < 5
        if repeated:
            getattr(head, fd.name).extend(value)
        elif fd.message_type is not None:
            if t.HasField(fd.name):
                getattr(head, fd.name).CopyFrom(value)
        elif t.HasField(fd.name) if fd.has_presence else value:
            setattr(head, fd.name, value)
    n = _tensor_bytes(t)
    return head.ByteSize() + 1 + _varint_bytes(n) + n


#: Element types whose raw data is exactly elements × item size (no sub-byte packing).
_FIXED_SIZE_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
    TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL,
})


def _varint_bytes(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint."""
    return max(1, (n.bit_length() + 6) // 7)


def _plan_tensor(
    graph: _Graph, cls: _Classes, initializer: onnx.TensorProto, transposed: bool
) -> _Plan:
    """Build the rebuild graph of one weight and keep it if it is smaller than the dense
    initializer (serialized bytes, nodes included)."""
    plan = _Plan(cls, initializer, transposed, _serialized_bytes(initializer))
    if cls.counts[FLOAT] == cls.weight.size:
        plan.reason = "no pruned or int8 entries"
        return plan
    t = _build_tensor(graph, cls, initializer.name, transposed)
    size = sum(_serialized_bytes(i) for i in t.inits) + sum(n.ByteSize() for n in t.nodes)
    if size < plan.dense_file:
        plan.built, plan.packed_file = t, size
        plan.reason = f"saves {plan.dense_file - size} bytes"
    else:
        plan.reason = f"packing would take {size} bytes, dense takes {plan.dense_file}"
    return plan


def _packed_if_shared_constants_pay(
    plans: list[_Plan], graph: _Graph
) -> tuple[list[_Plan], list[onnx.TensorProto]]:
    """The plans to pack and the shared constants their rebuilds use.

    Shared constants are stored once: keep those the chosen rebuilds use, and pack nothing
    (every plan reverts to dense) if they would cost more than packing saves.
    """
    packed = [p for p in plans if p.built is not None]
    used = {i for p in packed for n in p.built.nodes for i in n.input}  # type: ignore[union-attr]
    shared = [c for name, c in graph.shared.items() if name in used]
    saving = sum(p.dense_file - p.packed_file for p in packed)
    if packed and saving <= sum(c.ByteSize() for c in shared):
        for p in packed:
            p.built, p.packed_file = None, p.dense_file
            p.reason = "the constants shared by the rebuilds would cost more than packing saves"
        packed, shared = [], []
    return packed, shared


def _check_packed(
    graph: _Graph, packed: list[tuple[_Tensor, _Classes, bool]], opset: int, ir_version: int
) -> None:
    """:func:`_check_rebuild` of each (rebuild graph, entry classes, transposed) against
    the weight as the initializer stored it. It holds nothing of the model: a deferred check
    must not keep the model's protobuf arena alive."""
    pairs = []
    for built, cls, transposed in packed:
        w = cls.weight.copy()
        w.reshape(-1)[cls.is_zero] = 0.0  # +0.0: the rebuild writes positive zeros
        pairs.append((built, np.ascontiguousarray(w.T) if transposed else w))
    _check_rebuild(graph, pairs, opset, ir_version)


def _replace_initializers(
    proto: onnx.ModelProto, packed: list[_Plan], shared: list[onnx.TensorProto]
) -> None:
    """In ``proto``, the packed weights' initializers become their compact initializers
    and the shared constants, and the rebuild nodes go before the model's own nodes."""
    replaced = {p.initializer.name for p in packed}
    kept_inits = [i for i in proto.graph.initializer if i.name not in replaced]
    new_inits = [i for p in packed for i in p.built.inits] + shared  # type: ignore[union-attr]
    new_nodes = [n for p in packed for n in p.built.nodes]  # type: ignore[union-attr]
    new_nodes += list(proto.graph.node)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_inits + new_inits)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)


def _record_packed_metadata(proto: onnx.ModelProto, records: list[PackedTensor]) -> None:
    """``packed_weights`` in the model's metadata: per packed initializer, its class
    counts and whether it is transposed."""
    from fairdeploy.export._metadata import encode_metadata, set_metadata

    summary = {r.initializer: {"zero": r.zero, "int8": r.int8, "float": r.float,
                               "transposed": r.transposed}
               for r in records if r.stored == "packed"}
    set_metadata(proto, encode_metadata({"packed_weights": summary}))


# --------------------------------------------------------------------------- unpacking


@dataclass(frozen=True)
class UnpackReport:
    """What :func:`unpack_weights` did.

    Attributes
    ----------
    initializers : tuple of str
        The packed weights written back as dense float32 initializers.
    nodes_removed : int
        Rebuild nodes removed.
    file_bytes_before, file_bytes_after : int
        Serialized model size before and after.
    """

    initializers: tuple[str, ...]
    nodes_removed: int
    file_bytes_before: int
    file_bytes_after: int


def _rebuild_closure(proto: onnx.ModelProto, targets: set[str]) -> list[int]:
    """Indices of the nodes that compute ``targets`` from initializers only (the rebuild
    graphs); a FairDeployError when a target is computed from anything else."""
    producer = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    todo, seen = list(targets), set()
    while todo:
        name = todo.pop()
        if name in inits:
            continue
        if name not in producer:
            raise FairDeployError(
                f"packed weight {name!r} is not computed from constants in this file (it is "
                "a graph input or missing): it cannot be unpacked"
            )
        i = producer[name]
        if i not in seen:
            seen.add(i)
            todo.extend(x for x in proto.graph.node[i].input if x)
    return sorted(seen)


def unpack_weights(
    model: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
) -> UnpackReport:
    """Write a packed model (:func:`pack_weights`) with its rebuild graphs folded: every
    packed weight becomes the dense float32 initializer it rebuilds, once, here.

    The rebuild graphs are run in ONNX Runtime (every runtime computes them alike,
    DESIGN.md "Portable artifacts"), so the unpacked file computes bit for bit what the
    packed file computes, is as large as a dense export, and loads as fast: a runtime has
    nothing left to fold (ONNX Runtime's session creation of a packed file costs several
    times the dense file's, ``bench/bench_packed.py``). The model's metadata loses
    ``packed_weights`` and gains ``unpacked_weights`` (the initializer names).

    Parameters
    ----------
    model : path-like
        A packed ``.onnx`` file (its metadata names the packed weights).
    output_path : path-like
        Where to write (``.onnx``, atomically; not the input file).

    Raises
    ------
    FairDeployError
        A file that is not a packed model, or an output path equal to the input.
    """
    import onnxruntime as ort

    from fairdeploy.export._metadata import (
        METADATA_PREFIX,
        encode_metadata,
        metadata_of,
        save_atomic,
        set_metadata,
    )

    src, out = Path(model), Path(output_path)
    if out.suffix != ".onnx":
        raise FairDeployError(f"output path {str(out)!r} must end in .onnx")
    if out.resolve() == src.resolve():
        raise FairDeployError(f"{str(out)!r} is the input file: write the unpacked model "
                              "beside it (e.g. -o model.unpacked.onnx)")
    proto = _load(src)
    packed = metadata_of(proto, src).get("packed_weights")
    if not isinstance(packed, dict) or not packed:
        raise FairDeployError(
            f"{str(src)!r} holds no packed weights (its metadata has no packed_weights): "
            "it is already dense"
        )
    targets = set(packed)
    closure = _rebuild_closure(proto, targets)
    nodes = [proto.graph.node[i] for i in closure]
    used = {x for n in nodes for x in n.input}
    inits = [t for t in proto.graph.initializer if t.name in used]
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                  for name in sorted(targets)]
    rebuild = helper.make_model(
        helper.make_graph(nodes, "rebuild", [], value_info, inits),
        opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(rebuild.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    dense = dict(zip(sorted(targets), sess.run(None, {}), strict=True))
    del rebuild, sess
    before = proto.ByteSize()
    keep_nodes = [n for i, n in enumerate(proto.graph.node) if i not in set(closure)]
    still_used = {x for n in keep_nodes for x in n.input} | {
        o.name for o in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name not in used or t.name in still_used]
    kept += [numpy_helper.from_array(np.ascontiguousarray(dense[n]), n) for n in sorted(targets)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep_nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    props = [p for p in proto.metadata_props if p.key != METADATA_PREFIX + "packed_weights"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    set_metadata(proto, encode_metadata({"unpacked_weights": sorted(targets)}))
    onnx.checker.check_model(proto, full_check=True)
    after = proto.ByteSize()
    save_atomic(proto, out, size=after)
    return UnpackReport(tuple(sorted(targets)), len(closure), before, after)
