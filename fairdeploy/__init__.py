"""fairdeploy: fairness-oriented low-rank factorization (FairLRF) of PyTorch
classifiers, exported as smaller ONNX models that ONNX Runtime serves, verified and
reported with accuracy, group fairness, compression and latency.
"""

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.plan import LayerPlan, Plan

__version__ = "0.1.0"

__all__ = ["FactorizedLinear", "FairDeployError", "LayerPlan", "Plan", "__version__"]
