"""The memory-fit planner: for a device profile, predict peak memory of every variant and placement,
choose the best that fits, and explain the choice.

Torch-free. The memory model (constants in ``quantize.calibration``):

    weights(component) = quantizable * bytes(qtype) + other * bytes(compute dtype)
    act(transformer)   = batch * cfg * (patches + caption tokens) * dim * bytes * TRANSFORMER_ACT_FACTOR
    act(vae)           = batch * height * width * full-res channels * bytes * VAE_ACT_FACTOR
    act(text encoder)  = batch * cfg * max_sequence_length * hidden * bytes * (layers + 1 + LIVE_FACTOR)

Placements, fastest first:
- ``resident``: every component resident on the device;
- ``model_offload``: components live in host RAM and move to the GPU while they run (dedicated GPUs;
  on unified memory host and device are one pool, so it saves nothing);
- ``te_freed``: the text encoder is loaded for encoding and freed before denoising (the only way to
  trade speed for memory on unified memory);
- ``sequential_offload``: weights stream to the GPU block by block (dedicated GPUs; slowest).

The choice is the fastest placement that fits, and within it the best-quality variant that fits and
that the device can run (fp8 needs sm >= 80). A ``MemoryCalibration`` measured on the device
(``quantize.calibration``) scales the activations and adds the runtime's overhead to every device peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from quantize import calibration as cal
from quantize.calibration import MemoryCalibration
from quantize.profiles import DeviceProfile
from quantize.specs import Z_IMAGE_TURBO, ComponentSpec, ModelSpec
from quantize.variants import QTYPES, VARIANTS, ComponentRecipe, VariantRecipe
from zimage_edge.device import GIB
from zimage_edge.request import DEFAULT_MAX_SEQUENCE_LENGTH, SIZE_MULTIPLE, GenerationRequest

_REQUEST = GenerationRequest.model_fields


class Placement(StrEnum):
    RESIDENT = "resident"
    MODEL_OFFLOAD = "model_offload"
    TE_FREED = "te_freed"
    SEQUENTIAL_OFFLOAD = "sequential_offload"


PLACEMENT_ORDER = (Placement.RESIDENT, Placement.MODEL_OFFLOAD, Placement.TE_FREED, Placement.SEQUENTIAL_OFFLOAD)
DEDICATED_ONLY = frozenset({Placement.MODEL_OFFLOAD, Placement.SEQUENTIAL_OFFLOAD})


@dataclass(frozen=True)
class Workload:
    width: int = _REQUEST["width"].default
    height: int = _REQUEST["height"].default
    batch: int = 1
    cfg: bool = False  # Turbo runs without classifier-free guidance
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % SIZE_MULTIPLE or self.height % SIZE_MULTIPLE:
            raise ValueError(f"resolution {self.width}x{self.height} must be positive multiples of {SIZE_MULTIPLE}")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")

    @property
    def cfg_mult(self) -> int:
        return 2 if self.cfg else 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes by component, for one variant on one device dtype."""

    weights: dict[str, int]
    activations: dict[str, int]
    largest_unit: int
    overhead: int = 0  # measured runtime memory beyond the weights (a device's calibration), else 0

    @property
    def total_weights(self) -> int:
        return sum(self.weights.values())


@dataclass(frozen=True)
class PlanRow:
    variant: str
    placement: Placement
    device_bytes: int
    host_bytes: int
    budget_bytes: int
    host_budget_bytes: int
    fits: bool
    reason: str

    @property
    def margin_bytes(self) -> int:
        return self.budget_bytes - self.device_bytes


@dataclass(frozen=True)
class Plan:
    profile: DeviceProfile
    workload: Workload
    model: ModelSpec
    dtype: str
    rows: list[PlanRow]
    choice: PlanRow | None
    calibration: MemoryCalibration | None = None

    def explain(self) -> str:
        if self.choice is None:
            short_rows = [r for r in self.rows if r.reason.startswith("short")]
            closest = max(short_rows, key=lambda r: r.margin_bytes, default=None)
            short = ""
            if closest is not None:
                short = f"; closest: {closest.variant}/{closest.placement}, {closest.reason}"
            return (
                f"nothing fits {self.profile.description} at {self.workload.width}x{self.workload.height} "
                f"batch {self.workload.batch}{short}"
            )
        c = self.choice
        return (
            f"{c.variant} with placement {c.placement}: needs {gib(c.device_bytes)} of "
            f"{gib(c.budget_bytes)} ({gib(c.margin_bytes)} spare) on {self.profile.description} "
            f"in {self.dtype}; it is the fastest placement that fits and the best-quality variant within it"
            + (f"; {self.calibration.describe()}" if self.calibration else "")
        )


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _component_weights(spec: ComponentSpec, recipe: ComponentRecipe, dtype_bytes: int) -> int:
    if recipe.qtype is None:
        return spec.total_params * dtype_bytes
    info = QTYPES[recipe.qtype]
    return int(spec.quantizable_params * info.bytes_per_weight + spec.other_params * dtype_bytes)


def estimate(
    model: ModelSpec,
    variant: VariantRecipe,
    dtype: str,
    workload: Workload,
    calibration: MemoryCalibration | None = None,
) -> MemoryEstimate:
    """Weights and activation peaks per component (activations scaled by the device's calibration)."""
    b = cal.DTYPE_BYTES[dtype]
    weights = {
        name: _component_weights(model.component(name), variant.component(name), b)
        for name in ("transformer", "text_encoder", "vae")
    }
    patches = (workload.height // 16) * (workload.width // 16)
    n = workload.batch * workload.cfg_mult
    act_tr = n * (patches + cal.CAPTION_TOKENS) * model.transformer_dim * b * cal.TRANSFORMER_ACT_FACTOR
    act_vae = workload.batch * workload.height * workload.width * model.vae_full_res_channels * b * cal.VAE_ACT_FACTOR
    act_te = (
        n
        * workload.max_sequence_length
        * model.text_hidden
        * b
        * (model.text_layers + 1 + cal.TEXT_ENCODER_LIVE_FACTOR)
    )
    largest = max(
        _component_weights(
            ComponentSpec(spec.largest_unit_params, min(spec.largest_unit_params, spec.quantizable_params), 0),
            variant.component(name),
            b,
        )
        for name, spec in (("transformer", model.transformer), ("text_encoder", model.text_encoder), ("vae", model.vae))
    )
    scale = calibration.activation_scale if calibration else 1.0
    return MemoryEstimate(
        weights=weights,
        activations={
            "transformer": int(act_tr * scale),
            "vae": int(act_vae * scale),
            "text_encoder": int(act_te * scale),
        },
        largest_unit=largest,
        overhead=calibration.overhead_bytes if calibration else 0,
    )


def placement_bytes(est: MemoryEstimate, placement: Placement) -> tuple[int, int]:
    """(device bytes, host bytes) at the peak, before context and headroom."""
    w, a, extra = est.weights, est.activations, est.overhead
    denoise_and_decode = w["transformer"] + w["vae"] + max(a["transformer"], a["vae"])
    if placement is Placement.RESIDENT:
        return w["text_encoder"] + denoise_and_decode + extra, 0
    if placement is Placement.MODEL_OFFLOAD:
        device = max(w["text_encoder"] + a["text_encoder"], w["transformer"] + a["transformer"], w["vae"] + a["vae"])
        return device + extra, est.total_weights
    if placement is Placement.TE_FREED:
        device = max(w["text_encoder"] + a["text_encoder"], denoise_and_decode)
        # The encoder is read from disk for each batch; nothing extra stays in host RAM.
        return device + extra, 0
    device = est.largest_unit + max(a.values())
    return device + extra, est.total_weights


def budget(profile: DeviceProfile) -> tuple[int, int]:
    """Usable device bytes and host bytes for the model."""
    memory = int(profile.memory_gib * GIB) - int(profile.reserved_gib * GIB)
    if profile.kind.value != "cpu":
        memory -= cal.CUDA_CONTEXT_BYTES
    memory = int(memory * (1 - cal.HEADROOM_FRACTION))
    host = int(profile.host_ram_gib * GIB * (1 - cal.HEADROOM_FRACTION))
    return memory, host


def plan(
    profile: DeviceProfile,
    workload: Workload | None = None,
    model: ModelSpec = Z_IMAGE_TURBO,
    variants: list[VariantRecipe] | None = None,
    calibration: MemoryCalibration | None = None,
) -> Plan:
    """Rows for every variant x placement, and the choice (with the device's calibration, when given)."""
    workload = workload or Workload()
    candidates = sorted(variants or list(VARIANTS.values()), key=lambda v: v.quality_rank)
    policy = profile.policy()
    device_budget, host_budget = budget(profile)
    rows: list[PlanRow] = []
    for placement in PLACEMENT_ORDER:
        for variant in candidates:
            est = estimate(model, variant, policy.dtype, workload, calibration)
            device, host = placement_bytes(est, placement)
            if placement in DEDICATED_ONLY and profile.unified:
                reason = "n/a: unified memory"
                fits = False
            elif variant.needs_fp8_support and not policy.supports_fp8:
                reason = "n/a: no fp8 kernels"
                fits = False
            elif device > device_budget:
                reason = f"short {gib(device - device_budget)} device"
                fits = False
            elif host > host_budget:
                reason = f"short {gib(host - host_budget)} host RAM"
                fits = False
            else:
                reason = "fits"
                fits = True
            rows.append(PlanRow(variant.name, placement, device, host, device_budget, host_budget, fits, reason))
    choice = next((r for r in rows if r.fits), None)
    return Plan(
        profile=profile,
        workload=workload,
        model=model,
        dtype=policy.dtype,
        rows=rows,
        choice=choice,
        calibration=calibration,
    )


def plan_variants(
    profile: DeviceProfile,
    workload: Workload | None,
    candidates: list[tuple[VariantRecipe, ModelSpec]],
    model: ModelSpec = Z_IMAGE_TURBO,
    calibration: MemoryCalibration | None = None,
) -> Plan:
    """``plan`` for variants that are not all of one model: each candidate is sized by its own spec (a
    distilled student has fewer parameters than its teacher). Rows and choice follow ``plan``'s order:
    placement first, then quality rank; with one spec for all it gives ``plan``'s answer. ``model`` is
    the release's full model, reported as the plan's model."""
    workload = workload or Workload()
    ranked = sorted(candidates, key=lambda candidate: candidate[0].quality_rank)
    per_variant = [plan(profile, workload, spec, [recipe], calibration).rows for recipe, spec in ranked]
    rows = [row for placement in PLACEMENT_ORDER for rows in per_variant for row in rows if row.placement is placement]
    return Plan(
        profile=profile,
        workload=workload,
        model=model,
        dtype=profile.policy().dtype,
        rows=rows,
        choice=next((row for row in rows if row.fits), None),
        calibration=calibration,
    )
