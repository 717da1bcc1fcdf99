"""fairdeploy: fairness-oriented low-rank factorization (FairLRF) of PyTorch
classifiers, exported as smaller ONNX models that ONNX Runtime serves, verified and
reported with accuracy, group fairness, compression and latency.

The public API is ``__all__``; names load lazily, so ``fairdeploy --help`` does not
import torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FairDeployError": "fairdeploy.errors",
    "LayerPlan": "fairdeploy.plan",
    "Plan": "fairdeploy.methods",  # importing it registers the built-in methods
    "FactorizedLinear": "fairdeploy.lrf",
    "factorize": "fairdeploy.lrf",
    "factorize_model": "fairdeploy.lrf",
    "sparsify": "fairdeploy.lrf",
    "Method": "fairdeploy.methods",
    "Processed": "fairdeploy.methods",
    "register_method": "fairdeploy.methods",
    "get_method": "fairdeploy.methods",
    "list_methods": "fairdeploy.methods",
    "Experiment": "fairdeploy.experiment",
    "hessian_diag": "fairdeploy.scoring",
    "group_hessians": "fairdeploy.scoring",
    "scoring_indices": "fairdeploy.scoring",
    "weight_hessian_diag": "fairdeploy.weight_hessian",
    "group_weight_hessians": "fairdeploy.weight_hessian",
    "fairprune": "fairdeploy.fairprune",
    "fairquantize": "fairdeploy.fairquantize",
    "quantize_per_channel": "fairdeploy.fairquantize",
    "dequantize_per_channel": "fairdeploy.fairquantize",
    "group_metrics": "fairdeploy.metrics",
    "privileged_group": "fairdeploy.metrics",
    "bootstrap_metrics": "fairdeploy.metrics",
    "theoretical_cr": "fairdeploy.compression",
    "layer_table": "fairdeploy.compression",
    "load_recipe": "fairdeploy.recipe",
    "load_checkpoint": "fairdeploy.checkpoint",
    "save_checkpoint": "fairdeploy.checkpoint",
    "load_splits": "fairdeploy.data",
    "build_model": "fairdeploy.models",
    "register_model": "fairdeploy.models",
    "split_model": "fairdeploy.features",
    "compute_features": "fairdeploy.features",
    "train_model": "fairdeploy.train",
    "export_onnx": "fairdeploy.export",
    "ExportOptions": "fairdeploy.export",
    "deployed_params": "fairdeploy.export",
    "analyze_structure": "fairdeploy.structure",
    "read_metadata": "fairdeploy.export",
    "pack_weights": "fairdeploy.export",
    "unpack_weights": "fairdeploy.export",
    "PackSpec": "fairdeploy.export",
    "verify": "fairdeploy.verification",
    "verify_runtimes": "fairdeploy.verification",
    "load_runtime": "fairdeploy.runtimes",
    "quantize_int8": "fairdeploy.export",
    "verify_int8": "fairdeploy.export",
    "int8_fairness": "fairdeploy.export",
    "measure_latency": "fairdeploy.bench",
    "predict_files": "fairdeploy.serve",
    "run_optimize": "fairdeploy.commands.optimize",
    "run_compare": "fairdeploy.commands.compare",
    "OptimizeResult": "fairdeploy.commands.optimize",
    "CompareResult": "fairdeploy.commands.compare",
    "run_sweep": "fairdeploy.commands.sweep",
    "SweepResult": "fairdeploy.commands.sweep",
    "parse_selection": "fairdeploy.sweep",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fairdeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
