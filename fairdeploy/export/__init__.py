"""ONNX export with factorized layers as real smaller MatMuls, dead-neuron elimination,
metadata, measured sizes, and int8 copies made with ONNX Runtime's quantization tools."""

from fairdeploy.export._eliminate import DeployedParams, deployed_params
from fairdeploy.export._int8 import (
    QUANT_MODES,
    Int8Compression,
    Int8Export,
    Int8Fairness,
    Int8Verification,
    int8_compression,
    int8_fairness,
    quantize_int8,
    verify_int8,
)
from fairdeploy.export._layout import (
    SPARSE_LAYOUTS,
    ExportFactorized,
    LayerLayout,
    prepare_for_export,
)
from fairdeploy.export._metadata import METADATA_PREFIX, read_metadata, update_metadata
from fairdeploy.export._onnx import (
    EXPORTERS,
    Exporter,
    ExportOptions,
    ExportResult,
    check_factor_structure,
    export_onnx,
    verify_npz_path,
)
from fairdeploy.export._packed import (
    PackedTensor,
    PackReport,
    PackSpec,
    UnpackReport,
    pack_weights,
    unpack_weights,
)
from fairdeploy.export._sizes import layer_table, measured_cr, onnx_sizes

__all__ = [
    "EXPORTERS",
    "METADATA_PREFIX",
    "QUANT_MODES",
    "SPARSE_LAYOUTS",
    "DeployedParams",
    "ExportFactorized",
    "ExportOptions",
    "ExportResult",
    "Exporter",
    "Int8Compression",
    "Int8Export",
    "Int8Fairness",
    "Int8Verification",
    "LayerLayout",
    "PackReport",
    "PackSpec",
    "PackedTensor",
    "UnpackReport",
    "check_factor_structure",
    "deployed_params",
    "export_onnx",
    "int8_compression",
    "int8_fairness",
    "layer_table",
    "measured_cr",
    "onnx_sizes",
    "pack_weights",
    "prepare_for_export",
    "quantize_int8",
    "read_metadata",
    "unpack_weights",
    "update_metadata",
    "verify_int8",
    "verify_npz_path",
]
