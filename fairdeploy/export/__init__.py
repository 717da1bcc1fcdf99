"""ONNX export with factorized layers as real smaller MatMuls, dead-neuron elimination,
metadata, measured sizes."""

from fairdeploy.export._eliminate import DeployedLayer, DeployedParams, deployed_params
from fairdeploy.export._layout import (
    SPARSE_LAYOUTS,
    ExportFactorized,
    LayerLayout,
    prepare_for_export,
)
from fairdeploy.export._onnx import (
    METADATA_PREFIX,
    ExportResult,
    check_factor_structure,
    export_onnx,
    read_metadata,
    update_metadata,
    verify_npz_path,
)
from fairdeploy.export._packed import PackedTensor, PackReport, PackSpec, pack_weights
from fairdeploy.export._sizes import layer_table, measured_cr, onnx_sizes

__all__ = [
    "METADATA_PREFIX",
    "SPARSE_LAYOUTS",
    "DeployedLayer",
    "DeployedParams",
    "ExportFactorized",
    "ExportResult",
    "LayerLayout",
    "PackReport",
    "PackSpec",
    "PackedTensor",
    "check_factor_structure",
    "deployed_params",
    "export_onnx",
    "layer_table",
    "measured_cr",
    "onnx_sizes",
    "pack_weights",
    "prepare_for_export",
    "read_metadata",
    "update_metadata",
    "verify_npz_path",
]
