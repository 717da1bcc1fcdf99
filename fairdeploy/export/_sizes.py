"""Measured compression: what the exported files really store."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from fairdeploy.errors import FairDeployError

__all__ = ["layer_table", "measured_cr", "onnx_sizes", "proto_sizes", "size_ratios"]

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
#: Initializer types that hold weight values: floats, and int8 (quantized weights, e.g. the
#: int8 entries of a packed weight); uint8 bit masks and integer index/shape constants are not.
_PARAM_TYPES = _FLOAT_TYPES | {onnx.TensorProto.INT8}


def _load_header(path: str | os.PathLike[str]) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FairDeployError(
            f"ONNX model {str(path)!r} does not exist: give the path of a .onnx file"
        )
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise FairDeployError(f"{str(path)!r} is not a readable ONNX model ({exc})") from None


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


# Inputs that hold quantization scales and zero points, by op (not weights themselves).
_QUANT_PARAM_INPUTS = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
}
# Inputs that hold quantized weights (int8/uint8, or int32 biases), by op.
_QUANT_WEIGHT_INPUTS = {
    "DequantizeLinear": (0,),
    "MatMulInteger": (1,),
    "ConvInteger": (1,),
    "QLinearMatMul": (3,),
    "QLinearConv": (3, 8),
}


def _quantization_roles(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Names of (scale/zero-point tensors, quantized weight tensors) in a quantized graph.

    Dynamic quantization multiplies the int32 product by ``x_scale · w_scale`` with a
    ``Mul``; its float initializer input next to a DynamicQuantizeLinear scale is a scale.
    """
    params: set[str] = set()
    weights: set[str] = set()
    dyn_scales = {n.output[1] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"}
    for node in model.graph.node:
        ins = list(node.input)
        params.update(ins[i] for i in _QUANT_PARAM_INPUTS.get(node.op_type, ()) if i < len(ins))
        weights.update(ins[i] for i in _QUANT_WEIGHT_INPUTS.get(node.op_type, ()) if i < len(ins))
        if node.op_type == "Mul" and dyn_scales.intersection(ins):
            params.update(i for i in ins if i not in dyn_scales)
    return params, weights - params


def onnx_sizes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes and parameters an ONNX model stores.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file; weights in external data files are counted too.

    Returns
    -------
    dict
        ``initializer_bytes`` (sum over initializers of elements × element size: int8 and
        uint8 count 1 byte; a ``sparse_initializer`` counts its values and its indices),
        ``file_bytes`` (the .onnx file plus every external data file it references),
        ``parameters`` (elements of the weights and biases as stored: floating-point
        initializers, int8 ones (the int8 entries of a packed weight, quantized weights),
        the int32 biases of a quantized graph, the values of a sparse initializer — not
        bit masks, index constants, or the scales and zero points of quantization),
        ``int8_parameters`` (the 8-bit ones among them), ``quantization_bytes`` (bytes of
        scales and zero points), ``initializers`` (their number, sparse ones included).
    """
    model = _load_header(path)
    sizes, data_files = _tensor_sizes(model)
    file_bytes = Path(path).stat().st_size
    for loc in data_files:
        f = Path(path).parent / loc
        if f.is_file():
            file_bytes += f.stat().st_size
    return _with_file_bytes(sizes, file_bytes)


def proto_sizes(model: onnx.ModelProto, *, file_bytes: int | None = None) -> dict[str, int]:
    """:func:`onnx_sizes` of a model held in memory, as ``onnx.save_model`` would write it
    to one file (``file_bytes`` is its serialized size — pass it when the model is already
    serialized, which saves serializing it again; weights in external data are not
    supported here: save the model and call :func:`onnx_sizes`)."""
    sizes, data_files = _tensor_sizes(model)
    if data_files:
        raise ValueError("proto_sizes: the model references external data; use onnx_sizes")
    return _with_file_bytes(sizes, model.ByteSize() if file_bytes is None else file_bytes)


def _with_file_bytes(sizes: dict[str, int], file_bytes: int) -> dict[str, int]:
    return {"initializer_bytes": sizes["initializer_bytes"], "file_bytes": file_bytes} | sizes


def size_ratios(sizes: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Measured compression: vanilla ÷ processed initializer bytes, file bytes, parameters.

    ``sizes`` holds the :func:`onnx_sizes` of ``"vanilla"`` and of ``"processed"``; the
    keys returned (``initializer_cr``, ``file_cr``, ``parameter_cr``) are those of the
    ``measured_cr`` metadata entry and of the report. The one measured-ratio function:
    :func:`measured_cr` and the int8 and float exports all call it.
    """
    a, b = sizes["vanilla"], sizes["processed"]
    return {
        "initializer_cr": a["initializer_bytes"] / b["initializer_bytes"],
        "file_cr": a["file_bytes"] / b["file_bytes"],
        "parameter_cr": a["parameters"] / b["parameters"],
    }


def _tensor_sizes(model: onnx.ModelProto) -> tuple[dict[str, int], set[str]]:
    """Everything :func:`onnx_sizes` reports but ``file_bytes``, and the external data
    files the initializers reference."""
    quant_params, quant_weights = _quantization_roles(model)
    init_bytes = params = int8_params = quant_bytes = 0
    data_files: set[str] = set()
    dense = list(model.graph.initializer)
    sparse = list(model.graph.sparse_initializer)
    tensors = [(t, True) for t in dense] + [(sp.values, True) for sp in sparse]
    for t, holds_values in tensors + [(sp.indices, False) for sp in sparse]:
        n = _numel(t)
        nbytes = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        init_bytes += nbytes
        if t.name in quant_params:
            quant_bytes += nbytes
        elif holds_values and (t.data_type in _PARAM_TYPES or t.name in quant_weights):
            params += n
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                int8_params += n
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            data_files.add(info.location)
    return {
        "initializer_bytes": init_bytes,
        "parameters": params,
        "int8_parameters": int8_params,
        "quantization_bytes": quant_bytes,
        "initializers": len(dense) + len(sparse),
    }, data_files


def measured_cr(
    vanilla_path: str | os.PathLike[str], processed_path: str | os.PathLike[str]
) -> dict[str, float]:
    """Measured compression ratios of a processed model against the vanilla one.

    Returns
    -------
    dict
        ``initializer_cr``, ``file_cr`` and ``parameter_cr``: vanilla ÷ processed
        initializer bytes, file bytes and parameters (:func:`size_ratios`, the keys of the
        ``measured_cr`` metadata entry). Compare ``parameter_cr`` with the theoretical C.R.
        (DESIGN.md §4): the exported graph stores only non-zero blocks, so the two agree
        within 1 % for LRF methods.
    """
    return size_ratios(
        {"vanilla": onnx_sizes(vanilla_path), "processed": onnx_sizes(processed_path)}
    )


def layer_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per factorized layer of an exported model: Din, Dout, k, kept rows/cols, stored
    parameters and how the permutations were laid out (from its ``fairdeploy.layers``
    metadata), plus the parameters its initializers actually hold where they can be found
    by name."""
    model = _load_header(path)
    try:
        props = {p.key: p.value for p in model.metadata_props}
    except UnicodeDecodeError:  # protobuf strings must be UTF-8
        props = {"fairdeploy.layers": b""}
    if "fairdeploy.layers" not in props:
        return []
    raw = props["fairdeploy.layers"]
    try:
        rows = json.loads(raw) if isinstance(raw, str) else None  # damaged: bytes
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "layer" in r for r in rows):
        raise FairDeployError(
            f"ONNX model {str(path)!r} has damaged fairdeploy.layers metadata: re-export it "
            "with fairdeploy optimize"
        )
    sizes: dict[str, int] = {}
    quant_params, quant_weights = _quantization_roles(model)
    for t in model.graph.initializer:
        # Index arrays of run-time Gathers and quantization scales are not weights.
        if t.name in quant_weights or (t.data_type in _FLOAT_TYPES and t.name not in quant_params):
            sizes[t.name] = _numel(t)
    for row in rows:
        prefix = row["layer"] + "."
        found = [n for name, n in sizes.items() if name.startswith(prefix)]
        row["measured_params"] = sum(found) if found else None
    return rows
