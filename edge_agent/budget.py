"""The node's request budget: what the loaded model can draw on this device without running out of memory.

The guard's static limits (``max_side``, ``max_images``) are the site's policy; this is physics. The
planner's memory model (``quantize.planner``) predicts the peak of a request — the loaded variant's
weights plus the activations of ``images`` images of ``width x height`` — for the device the model
was loaded on (or the profile the operator names), and a request whose peak does not fit the
device's budget is refused with a 422 before it is queued, instead of running for minutes and
failing, or taking the node down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from quantize.identity import LoadedModel
from quantize.planner import Placement, PlanRow, Workload, gib, plan
from quantize.profiles import DeviceProfile, profile_from_facts
from quantize.specs import ModelSpec
from quantize.variants import VARIANTS, VariantRecipe
from zimage_edge.request import GenerationRequest


class OverBudget(Exception):
    """A request would not fit the device's memory."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class RequestBudget:
    """The loaded model (its parameter counts and variant) on a device profile."""

    profile: DeviceProfile
    model: ModelSpec
    variant: VariantRecipe
    # The agent keeps every component resident (no offload), so only that placement counts.
    placement: Placement = Placement.RESIDENT

    def check(self, request: GenerationRequest) -> None:
        """Raise ``OverBudget`` naming the need and the budget when ``request`` would not fit."""
        workload = Workload(
            width=request.width,
            height=request.height,
            batch=request.num_images,
            cfg=request.uses_cfg,
            max_sequence_length=request.max_sequence_length,
        )
        row = _row(self, workload)
        if not row.fits:
            raise OverBudget(
                f"{request.num_images} image(s) of {request.width}x{request.height} need about "
                f"{gib(row.device_bytes)} on {self.profile.description} ({self.variant.name}, "
                f"{gib(row.budget_bytes)} usable): {row.reason}; ask for fewer or smaller images"
            )


@lru_cache(maxsize=1024)
def _row(budget: RequestBudget, workload: Workload) -> PlanRow:
    """The planner's row for the budget's placement (pure arithmetic, cached per workload)."""
    result = plan(budget.profile, workload, budget.model, [budget.variant])
    return next(r for r in result.rows if r.placement is budget.placement)


def make_budget(model: LoadedModel, profile: DeviceProfile | None = None) -> RequestBudget:
    """The budget of a freshly loaded model (blocking: counts its parameters; run it off the loop).

    ``profile`` names the device to plan for (a simulated node, or an operator's override); by
    default it is the device the model was loaded on, as detected just before the load.
    """
    from quantize.specs import spec_from_pipeline

    identity = model.identity
    manifest = identity.manifest
    variant = VariantRecipe.from_dict(manifest.variant.model_dump()) if manifest else VARIANTS["bf16"]
    return RequestBudget(
        profile=profile or profile_from_facts(model.pipeline.facts),
        model=spec_from_pipeline(model.pipe, identity.source),
        variant=variant,
    )
