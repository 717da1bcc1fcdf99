"""ONNX export with factorized layers as real smaller MatMuls, metadata, measured sizes."""

from fairdeploy.export._layout import ExportFactorized, LayerLayout, prepare_for_export
from fairdeploy.export._onnx import (
    EXPORTERS,
    METADATA_PREFIX,
    ExportResult,
    check_factor_structure,
    export_onnx,
    read_metadata,
    update_metadata,
    verify_npz_path,
)
from fairdeploy.export._sizes import layer_table, measured_cr, onnx_sizes

__all__ = [
    "EXPORTERS",
    "METADATA_PREFIX",
    "ExportFactorized",
    "ExportResult",
    "LayerLayout",
    "check_factor_structure",
    "export_onnx",
    "layer_table",
    "measured_cr",
    "onnx_sizes",
    "prepare_for_export",
    "read_metadata",
    "update_metadata",
    "verify_npz_path",
]
