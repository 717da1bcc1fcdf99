"""``vanilla``: the model as trained, the reference every other method is compared with."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

from fairdeploy.methods._base import Method, Processed
from fairdeploy.methods._registry import register_method
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.context import Context

__all__ = ["Vanilla", "VanillaPlan"]


class VanillaPlan(Plan):
    """The unmodified model: no settings."""



@register_method
class Vanilla(Method[VanillaPlan]):
    """The unmodified model (C.R. 1)."""

    name: ClassVar[str] = "vanilla"
    label: ClassVar[str] = "Vanilla"
    default_compare: ClassVar[bool] = True
    order: ClassVar[int] = 0

    def apply(self, plan: VanillaPlan, ctx: Context) -> Processed:
        return Processed(plan, head=copy.deepcopy(ctx.head))
