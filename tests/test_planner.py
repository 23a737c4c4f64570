from __future__ import annotations

import pytest

from quantize.planner import Placement, Workload, estimate, plan
from quantize.profiles import PROFILES, get_profile, profile_from_facts
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VARIANTS
from zimage_edge.device import GIB, DeviceFacts, DeviceKind

GB = 1e9

# (profile, resolution) -> (variant, placement), for the real Z-Image-Turbo.
EXPECTED = {
    ("jetson-orin-nano-8gb", 512): ("int4-te8", Placement.TE_FREED),
    ("jetson-orin-nano-8gb", 1024): ("int4-te8", Placement.TE_FREED),
    ("jetson-orin-nx-16gb", 512): ("int8-te8", Placement.RESIDENT),
    ("jetson-orin-nx-16gb", 1024): ("int8-te8", Placement.RESIDENT),
    ("jetson-agx-orin-32gb", 512): ("bf16", Placement.RESIDENT),
    ("jetson-agx-orin-32gb", 1024): ("bf16", Placement.RESIDENT),
    ("jetson-agx-orin-64gb", 512): ("bf16", Placement.RESIDENT),
    ("jetson-agx-orin-64gb", 1024): ("bf16", Placement.RESIDENT),
    ("t4-16gb", 512): ("int8-te8", Placement.RESIDENT),
    ("t4-16gb", 1024): ("int8-te8", Placement.RESIDENT),
    ("rtx3060-12gb", 512): ("int8-te8", Placement.RESIDENT),
    ("rtx3060-12gb", 1024): ("int4-te8", Placement.RESIDENT),
    ("l4-24gb", 512): ("bf16", Placement.RESIDENT),
    ("l4-24gb", 1024): ("bf16", Placement.RESIDENT),
    ("a10-24gb", 512): ("bf16", Placement.RESIDENT),
    ("a10-24gb", 1024): ("bf16", Placement.RESIDENT),
    ("cpu", 512): ("int8", Placement.RESIDENT),
    ("cpu", 1024): ("int8", Placement.RESIDENT),
}


@pytest.mark.parametrize(("profile", "size"), sorted(EXPECTED))
def test_choice_per_profile(profile: str, size: int) -> None:
    result = plan(get_profile(profile), Workload(size, size))
    expected = EXPECTED[(profile, size)]
    got = (result.choice.variant, result.choice.placement) if result.choice else None
    assert got == expected, result.explain()
    if result.choice:
        assert result.choice.device_bytes <= result.choice.budget_bytes
        assert result.choice.variant in result.explain()


def test_every_profile_is_covered() -> None:
    assert {p for p, _ in EXPECTED} == set(PROFILES)


def test_nothing_fits_is_a_clear_answer() -> None:
    result = plan(get_profile("jetson-orin-nano-8gb"), Workload(1024, 1024, batch=2))
    assert result.choice is None
    assert not any(r.fits for r in result.rows)
    text = result.explain()
    assert text.startswith("nothing fits Jetson Orin Nano 8 GB at 1024x1024 batch 2")
    assert "closest: int4-te8/te_freed, short" in text


def test_consistent_with_public_figures() -> None:
    bf16 = estimate(Z_IMAGE_TURBO, VARIANTS["bf16"], "bfloat16", Workload(1024, 1024))
    assert bf16.total_weights + bf16.activations["vae"] > 16 * GB  # bf16 does not fit a 16 GB card
    int8 = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", Workload())
    fp8 = estimate(Z_IMAGE_TURBO, VARIANTS["fp8"], "bfloat16", Workload())
    int4 = estimate(Z_IMAGE_TURBO, VARIANTS["int4"], "bfloat16", Workload())
    assert int8.weights["transformer"] / GB == pytest.approx(6.2, abs=0.1)
    assert fp8.weights["transformer"] == int8.weights["transformer"]
    assert int4.weights["transformer"] / GB == pytest.approx(3.3, abs=0.1)
    assert bf16.weights["transformer"] / GB == pytest.approx(12.31, abs=0.01)
    te8 = estimate(Z_IMAGE_TURBO, VARIANTS["int8-te8"], "bfloat16", Workload())
    assert te8.weights["text_encoder"] / GB == pytest.approx(4.4, abs=0.1)


def test_activations_grow_with_resolution_and_batch() -> None:
    small = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", Workload(512, 512))
    large = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", Workload(1024, 1024))
    batch = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", Workload(1024, 1024, batch=4))
    assert large.activations["vae"] == 4 * small.activations["vae"]
    assert batch.activations["transformer"] == 4 * large.activations["transformer"]
    cfg = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", Workload(1024, 1024, cfg=True))
    assert cfg.activations["transformer"] == 2 * large.activations["transformer"]


def test_device_rules_are_respected() -> None:
    t4 = plan(get_profile("t4-16gb"), Workload(512, 512))
    assert all(not r.fits for r in t4.rows if r.variant.startswith("fp8"))
    assert t4.dtype == "float16"
    orin = plan(get_profile("jetson-orin-nx-16gb"), Workload(512, 512))
    offload = [r for r in orin.rows if r.placement in {Placement.MODEL_OFFLOAD, Placement.SEQUENTIAL_OFFLOAD}]
    assert offload
    assert all(r.reason == "n/a: unified memory" for r in offload)


def test_bad_workloads_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        Workload(1000, 1024)
    with pytest.raises(ValueError, match="batch"):
        Workload(batch=0)
    with pytest.raises(ValueError, match="unknown device profile"):
        get_profile("gtx-480")


def test_detected_device_becomes_a_profile() -> None:
    facts = DeviceFacts(
        kind=DeviceKind.JETSON, name="Orin", total_memory=15 * GIB, free_memory=12 * GIB,
        compute_capability=(8, 7), unified_memory=True, system_memory=15 * GIB,
    )  # fmt: skip
    profile = profile_from_facts(facts)
    assert profile.unified
    assert profile.memory_gib == pytest.approx(12.0)
    assert plan(profile, Workload(512, 512)).choice is not None
