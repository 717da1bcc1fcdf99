"""A user's own method, loaded from a recipe as ``_tiny_method:MagnitudeZero``.

It is the whole diff a new method needs: one module, nothing else in fairdeploy changes.
It zeroes the ``fraction`` of smallest-magnitude weights of one Linear layer of the head
(stored dense: C.R. 1).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from fairdeploy.methods import Method, Processed
from fairdeploy.plan import Plan


class MagnitudeZeroPlan(Plan):
    """The layer and the fraction of its weights to zero."""

    layer: str
    fraction: float = 0.5


class MagnitudeZero(Method):
    """Zero the smallest |w| of one layer."""

    name: ClassVar[str] = "magnitude_zero"
    label: ClassVar[str] = "Magnitude zero"
    plan_class: ClassVar[type[Plan]] = MagnitudeZeroPlan

    def target_layers(self, plan: Plan) -> tuple[str, ...]:
        return (plan.layer,)

    def describe(self, plan: Plan) -> str:
        return f"{self.label} ({plan.layer}, {plan.fraction:.0%})"

    def apply(self, plan: Plan, ctx) -> Processed:
        head = copy.deepcopy(ctx.head)
        weight = head.get_submodule(plan.layer).weight
        n = int(plan.fraction * weight.numel())
        with torch.no_grad():
            order = weight.abs().flatten().argsort(stable=True)
            weight.view(-1)[order[:n]] = 0.0
        return Processed(plan, head=head, details={"zeroed": n})


class NotHere(MagnitudeZero):
    """A method that cannot run in this installation (``unavailable``): refused by
    ``optimize`` before any data is read, skipped by ``compare``."""

    name: ClassVar[str] = "not_here"
    label: ClassVar[str] = "Not here"
    unavailable: ClassVar[str | None] = "it needs a licence server"
