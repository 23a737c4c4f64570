from __future__ import annotations

from pathlib import Path

import pytest

from zimage_edge.device import (
    GIB,
    DeviceFacts,
    DeviceKind,
    SystemProbe,
    detect_device,
    dtype_policy,
    read_meminfo,
)


def facts(kind: DeviceKind, cc: tuple[int, int] | None, gib: int, *, unified: bool = False) -> DeviceFacts:
    return DeviceFacts(
        kind=kind,
        name="injected",
        total_memory=gib * GIB,
        free_memory=gib * GIB,
        compute_capability=cc,
        unified_memory=unified,
    )


@pytest.mark.parametrize(
    ("device", "dtype", "guard", "bf16", "fp8"),
    [
        (facts(DeviceKind.CPU, None, 16, unified=True), "float32", False, False, False),
        (facts(DeviceKind.CUDA, (7, 5), 16), "float16", True, False, False),  # T4
        (facts(DeviceKind.CUDA, (8, 6), 24), "bfloat16", False, True, True),  # A10 / RTX 3090
        (facts(DeviceKind.JETSON, (8, 7), 8, unified=True), "bfloat16", False, True, True),  # Orin 8 GB
        (facts(DeviceKind.CUDA, (8, 9), 24), "bfloat16", False, True, True),  # L4
    ],
)
def test_dtype_policy(device: DeviceFacts, dtype: str, guard: bool, bf16: bool, fp8: bool) -> None:
    policy = dtype_policy(device)
    assert (policy.dtype, policy.fp16_guard, policy.supports_bf16, policy.supports_fp8) == (dtype, guard, bf16, fp8)
    assert policy.reason


def test_sm75_reason_names_the_failure_mode() -> None:
    assert "NaN" in dtype_policy(facts(DeviceKind.CUDA, (7, 5), 16)).reason


def test_facts_serialise_as_plain_data() -> None:
    data = facts(DeviceKind.JETSON, (8, 7), 8, unified=True).to_dict()
    assert data["kind"] == "jetson"
    assert data["compute_capability"] == [8, 7]
    assert data["unified_memory"] is True


MEMINFO = """MemTotal:        7999488 kB
MemFree:          123456 kB
MemAvailable:    5242880 kB
Buffers:           1000 kB
"""


def test_read_meminfo(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    info = read_meminfo(path)
    assert info.total == 7999488 * 1024
    assert info.available == 5 * GIB


def test_jetson_probe(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert SystemProbe(tegra_release=tmp_path / "none", device_tree_model=model).is_jetson()
    model.write_text("Raspberry Pi 5")
    assert not SystemProbe(tegra_release=tmp_path / "none", device_tree_model=model).is_jetson()
    (tmp_path / "tegra").write_text("# R36 (release), REVISION: 3.0")
    assert SystemProbe(tegra_release=tmp_path / "tegra", device_tree_model=model).is_jetson()


def test_detect_on_this_cpu_machine_reads_system_memory(tmp_path: Path) -> None:
    # This machine has no CUDA device (the CUDA branches are covered by the gpu-marked tests).
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    found = detect_device(SystemProbe(meminfo=meminfo))
    assert found.kind is DeviceKind.CPU
    assert found.total_memory == 7999488 * 1024
    assert found.free_memory == 5 * GIB
    assert dtype_policy(found).dtype == "float32"


@pytest.mark.gpu
def test_detect_cuda_device() -> None:
    found = detect_device()
    assert found.kind in {DeviceKind.CUDA, DeviceKind.JETSON}
    assert found.compute_capability is not None
    assert 0 < found.free_memory <= found.total_memory
