"""``fairquantize``: FairQuantize (Guo et al. 2024): the ``quantize_ratio`` fraction of the
chosen weights with the lowest score ``½Δθ²(h0 − βh1)`` (Δθ the rounding change of
symmetric per-output-channel int8) is quantized, in ``steps``, optionally fine-tuning the
float weights between steps (:func:`fairdeploy.fairquantize.fairquantize`).

Compression: the paper's theoretical C.R. counts a quantized weight as 8 bits of 32:
``32·P / (32·P − 24·Nq)`` with P every parameter of the model and Nq the weights
quantized (``⌊q·n_l⌋`` per layer, or ``⌊q·Σn_l⌋`` with ``scope: global``): the paper's
``32 / (32 − 24q)`` when every weight is chosen. The export stores the quantized entries
as int8 (plus a bit mask and per-channel scales, :func:`~fairdeploy.export.pack_weights`),
rebuilt into the float weight when ONNX Runtime loads the session, so inference runs the
same float MatMul/Conv as the dense export and the file really shrinks (measured C.R. beside
the theoretical one, with the mask's bit: ``32 / (32 − 24q + 1)``).

Fine-tuning (``finetune_epochs`` > 0) trains every float parameter of the WHOLE model (the
trunk included) on the training split after each step, as the reference does: it cannot
use the feature cache, so scoring then runs on the scoring samples' own inputs through the
whole model, and evaluation runs the processed model over the validation and test splits.
It is seeded (``scoring.seed``), so a compare row with fine-tuning is reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator
from torch import nn

from fairdeploy._schema import NonNegFloat, NonNegInt, PosFraction, PosInt, Strict, schema_error
from fairdeploy.fairquantize import FINETUNE_DEFAULTS
from fairdeploy.methods._base import Processed, estimator_inputs
from fairdeploy.methods._registry import register_method
from fairdeploy.methods._weights import WeightMethod, WeightPlan, weight_layers
from fairdeploy.plan import Plan

if TYPE_CHECKING:
    from fairdeploy.context import Context

__all__ = ["FairQuantize", "FairQuantizePlan", "FinetuneSpec"]


class FinetuneSpec(Strict):
    """Optimizer of the fine-tuning between steps (the reference's defaults: SGD lr 1e-3,
    no momentum, no weight decay, lr × 0.57 every 4 epochs, batch 128)."""

    model_config = ConfigDict(frozen=True)

    lr: NonNegFloat = FINETUNE_DEFAULTS["lr"]
    momentum: NonNegFloat = FINETUNE_DEFAULTS["momentum"]
    weight_decay: NonNegFloat = FINETUNE_DEFAULTS["weight_decay"]
    step_epochs: PosInt = FINETUNE_DEFAULTS["step_epochs"]
    gamma: NonNegFloat = FINETUNE_DEFAULTS["gamma"]
    batch_size: PosInt = FINETUNE_DEFAULTS["batch_size"]


class FairQuantizePlan(WeightPlan):
    """The quantized fraction and its scope, steps, fine-tuning, chosen layers, β, scoring."""

    quantize_ratio: PosFraction
    scope: Literal["layer", "global"] = "layer"
    steps: PosInt = 1
    finetune_epochs: NonNegInt = 0
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)

    def reads_scoring_seed_without_a_draw(self) -> bool:
        # Fine-tuning seeds its shuffling with scoring.seed + step.
        return bool(self.finetune_epochs) or super().reads_scoring_seed_without_a_draw()

    @model_validator(mode="after")
    def _finetune_settings_are_read(self) -> FairQuantizePlan:
        """``finetune:`` is read only when there is fine-tuning, and ``gamma`` only when an
        lr step happens before the last epoch: other values than the defaults are refused
        rather than ignored."""
        changed = self.finetune.changed_fields()
        if changed and not self.finetune_epochs:
            raise schema_error(
                "fd_finetune_unread",
                "finetune.{key}: read only when fine-tuning (finetune_epochs ≥ 1; it is 0): "
                "set finetune_epochs, or remove finetune",
                {"key": changed[0]},
            )
        ft = self.finetune
        if "gamma" in changed and self.finetune_epochs <= ft.step_epochs:
            raise schema_error(
                "fd_finetune_gamma_unread",
                "finetune.gamma: never applied: the lr steps every {s} epochs and each "
                "fine-tuning runs {e}; lower finetune.step_epochs below finetune_epochs, or "
                "remove gamma",
                {"s": ft.step_epochs, "e": self.finetune_epochs},
            )
        return self


@register_method
class FairQuantize(WeightMethod[FairQuantizePlan]):
    """FairQuantize: quantize to int8 the weights whose rounding costs least."""

    name: ClassVar[str] = "fairquantize"
    label: ClassVar[str] = "FairQuantize"
    order: ClassVar[int] = 50

    def example(self, model: nn.Module) -> Plan:
        return self.plan_class(method=self.name, quantize_ratio=0.3)

    def describe_ratio(self, plan: FairQuantizePlan) -> str:
        text = f"int8 {plan.quantize_ratio:.0%}"
        if plan.scope == "global":
            text += " global"
        if plan.steps > 1:
            text += f" in {plan.steps} steps"
        if plan.finetune_epochs:
            text += f", fine-tuned {plan.finetune_epochs} ep/step"
        return text

    # ------------------------------------------------------------------ accounting

    def changed_weights(self, plan: FairQuantizePlan, model: nn.Module) -> int:
        from fairdeploy.fairquantize import planned_quantized_count

        return planned_quantized_count(
            model,
            plan.quantize_ratio,
            layers=weight_layers(plan, model),
            scope=plan.scope,
        )

    def saved_bits(self, plan: FairQuantizePlan, model: nn.Module) -> int:
        return 24 * self.changed_weights(plan, model)

    def theoretical_cr(self, plan: FairQuantizePlan, model: nn.Module) -> float:
        from fairdeploy.fairquantize import fairquantize_cr

        return fairquantize_cr(model, self.changed_weights(plan, model))

    # ------------------------------------------------------------------ doing it

    def runs_on_model(self, plan: FairQuantizePlan, ctx: Context) -> bool:
        # Fine-tuning trains the whole model on the training split.
        return bool(plan.finetune_epochs) or super().runs_on_model(plan, ctx)

    def apply(self, plan: FairQuantizePlan, ctx: Context) -> Processed:
        from fairdeploy.fairquantize import fairquantize

        full = self.runs_on_model(plan, ctx)
        samples, settings = estimator_inputs(
            self.scoring_data(plan, ctx, full_model=full), plan.scoring
        )
        result = fairquantize(
            self.on_device(ctx.model, ctx) if full else ctx.head,
            *samples,
            quantize_ratio=plan.quantize_ratio,
            beta=plan.beta,
            layers=weight_layers(plan, ctx.model),
            scope=plan.scope,
            steps=plan.steps,
            finetune_epochs=plan.finetune_epochs,
            train_set=ctx.splits["train"] if plan.finetune_epochs else None,
            finetune=self.finetune_settings(plan, ctx),
            group_ids=(ctx.unprivileged, ctx.privileged),
            # The first step scores the vanilla weights: shared with FairPrune's cache.
            hessians=self.hessians(plan, ctx, full_model=full),
            progress=ctx.progress,
            **settings,
        )
        details: dict[str, Any] = {
            "quantized": dict(result.counts),
            "weights": dict(result.sizes),
            "quantized_fraction": result.quantized_fraction,
            "history": result.history,
            "masks": result.masks,
            "int8_values": result.values,
            "scales": result.scales,
        }
        notes = self.run_notes(plan, ctx, full=full)
        return self.processed(plan, result.model, full=full, details=details, notes=notes)

    def finetune_settings(
        self, plan: FairQuantizePlan, ctx: Context
    ) -> dict[str, Any] | None:
        """The optimizer and loader settings of the fine-tuning, None without it."""
        if not plan.finetune_epochs:
            return None
        return {
            **plan.finetune.model_dump(),
            "device": ctx.device,
            "progress": ctx.progress,
            "num_workers": ctx.recipe.data.num_workers,
        }

    def run_notes(self, plan: FairQuantizePlan, ctx: Context, *, full: bool) -> list[str]:
        """The report's notes: where it ran (the whole model when fine-tuned or when a
        chosen layer is in the trunk) and that later steps are not cached."""
        notes = []
        if plan.finetune_epochs:
            notes.append(self.trunk_note(
                plan, ctx,
                f"fine-tuning trains the whole model ({plan.finetune_epochs} epoch(s) after "
                f"each of {plan.steps} step(s), on the training split)",
            ))
        elif full:
            notes.append(self.trunk_note(plan, ctx, "the chosen layers include the trunk"))
        if plan.steps > 1:
            notes.append(
                f"{self.describe(plan)}: steps after the first recompute the Hessians on the "
                "partly quantized model (not cached)"
            )
        return notes

    def pack_specs(self, processed: Processed) -> dict[str, dict[str, Any]]:
        d = processed.details
        return {
            n: {
                "quantized": m.cpu().numpy(),
                "int8_values": d["int8_values"][n].cpu().numpy(),
                "scales": d["scales"][n].cpu().numpy(),
            }
            for n, m in d["masks"].items()
        }
