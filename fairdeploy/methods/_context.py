"""What a method may ask of the experiment's shared context, below both.

:class:`MethodContext` is the interface that :meth:`Method.apply` receives, written as a
:class:`typing.Protocol`: :class:`fairdeploy.experiment.Context` implements it. Methods
depend on this interface, not on the experiment, so ``methods/`` never imports
``experiment`` (which imports ``methods``): the package's import graph has no cycle.
:class:`ScoringSet` (one draw's per-group scoring samples) lives here for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from fairdeploy.features import FeatureSet
from fairdeploy.plan import SamplingSpec

if TYPE_CHECKING:
    from fairdeploy.lrf import FactorizedLinear

__all__ = ["HessianCompute", "MethodContext", "ScoringSet"]


@dataclass(frozen=True)
class ScoringSet:
    """The per-group scoring sets of one draw, as cached trunk features.

    Attributes
    ----------
    features : FeatureSet
        Features, labels and groups of the scoring samples (group 0's set, then 1's).
    positions : dict
        Group id → positions of that group's samples in ``features``.
    indices : ndarray
        Positions of the samples in the training split, in ``features`` order.
    key : dict
        What identifies the draw (samples per group, seed, sizes), for cache keys.
    """

    features: FeatureSet
    positions: dict[int, np.ndarray]
    indices: np.ndarray
    key: dict[str, Any]

    @property
    def per_group(self) -> int:
        """Samples in the smaller group's set (all sets have this size unless every
        training sample of each group was taken)."""
        return min(len(p) for p in self.positions.values())

    @property
    def sizes(self) -> tuple[int, int]:
        """Samples in group 0's and group 1's set."""
        return len(self.positions[0]), len(self.positions[1])


#: ``compute(data, group_ids)`` of :meth:`MethodContext.hessians`: per group id, name → tensor.
HessianCompute = Callable[[ScoringSet, tuple[int, int]], Mapping[int, Mapping[str, torch.Tensor]]]


class MethodContext(Protocol):
    """The shared context a method's ``apply`` receives (implemented by
    :class:`fairdeploy.experiment.Context`, which documents each member): the recipe, the
    vanilla model and its head after the cut, the splits, the privileged group, and the
    keyed services that build every cache key in one place."""

    recipe: Any
    model: nn.Module
    head: nn.Module
    splits: dict[str, Any]
    privileged: int
    device: str
    progress: bool

    @property
    def unprivileged(self) -> int:
        """Id of the unprivileged group (group 0 of the fairness scores)."""
        ...

    def scoring_set(self, spec: SamplingSpec) -> ScoringSet:
        """The scoring draw of ``spec``, as trunk features."""
        ...

    def scoring_inputs(self, spec: SamplingSpec) -> ScoringSet:
        """The same draw with the model's own inputs in place of trunk features."""
        ...

    def svd(self, layer: str, rank: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Truncated SVD factors ``U``, ``S``, ``V`` of a head layer (cached)."""
        ...

    def factorized(self, layer: str, rank: int, *, seed: int = 0) -> FactorizedLinear:
        """A new factorized copy of a vanilla head layer at ``rank``."""
        ...

    def hessians(
        self,
        spec: SamplingSpec,
        compute: HessianCompute,
        *,
        of: Mapping[str, Any],
        inputs: str = "features",
        kind: str = "hessian",
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Per-group curvature diagonals by role (0 unprivileged, 1 privileged), cached."""
        ...

    def activations(
        self,
        spec: SamplingSpec,
        compute: Callable[[ScoringSet], dict[str, torch.Tensor]],
        *,
        of: Mapping[str, Any],
    ) -> dict[str, torch.Tensor]:
        """Activation statistics on the scoring draw of ``spec`` (kept in memory)."""
        ...
