"""Device profiles as data: the edge devices zimage-edge targets.

Torch-free. Memory figures are what the device exposes to applications (a "16 GB" T4 reports 15 GiB to
CUDA); ``reserved_gib`` is what the OS and runtime keep on unified-memory boards (Jetson's L4T,
headless, holds ~1.0 GiB plus ~0.5 GiB for the CUDA/cuDNN context).
"""

from __future__ import annotations

from dataclasses import dataclass

from zimage_edge.device import GIB, DeviceFacts, DeviceKind, DtypePolicy, dtype_policy


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: DeviceKind
    memory_gib: float  # dedicated GPU memory, or the shared pool on unified-memory devices
    compute_capability: tuple[int, int] | None
    host_ram_gib: float  # system RAM on dedicated-GPU hosts (the same pool on unified devices)
    reserved_gib: float = 0.0
    notes: str = ""

    @property
    def unified(self) -> bool:
        return self.kind is not DeviceKind.CUDA

    @property
    def int4_kernels(self) -> bool:
        """quanto's CUDA int4 (AWQ/Marlin-style) kernels need sm >= 80; elsewhere int4 dequantizes per use."""
        return self.compute_capability is not None and self.compute_capability >= (8, 0)

    def facts(self) -> DeviceFacts:
        total = int(self.memory_gib * GIB)
        return DeviceFacts(
            kind=self.kind,
            name=self.description,
            total_memory=total,
            free_memory=total,
            compute_capability=self.compute_capability,
            unified_memory=self.unified,
            system_memory=int(self.host_ram_gib * GIB),
        )

    def policy(self) -> DtypePolicy:
        return dtype_policy(self.facts())


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "jetson-orin-nano-8gb", "Jetson Orin Nano 8 GB", DeviceKind.JETSON, 7.4, (8, 7), 7.4, reserved_gib=1.5,
            notes="8 GB LPDDR5 shared by CPU and GPU; 7.4 GiB visible to Linux",
        ),
        DeviceProfile(
            "jetson-orin-nx-16gb", "Jetson Orin NX 16 GB", DeviceKind.JETSON, 15.3, (8, 7), 15.3, reserved_gib=1.5,
            notes="16 GB LPDDR5 shared",
        ),
        DeviceProfile(
            "jetson-agx-orin-32gb", "Jetson AGX Orin 32 GB", DeviceKind.JETSON, 30.6, (8, 7), 30.6, reserved_gib=1.5,
            notes="32 GB LPDDR5 shared",
        ),
        DeviceProfile(
            "jetson-agx-orin-64gb", "Jetson AGX Orin 64 GB", DeviceKind.JETSON, 61.4, (8, 7), 61.4, reserved_gib=1.5,
            notes="64 GB LPDDR5 shared",
        ),
        DeviceProfile(
            "t4-16gb", "NVIDIA T4 16 GB", DeviceKind.CUDA, 15.0, (7, 5), 32.0,
            notes="sm_75: no bf16, no fp8 kernels; fp16 needs the activation guard",
        ),
        DeviceProfile("rtx3060-12gb", "NVIDIA RTX 3060 12 GB", DeviceKind.CUDA, 11.7, (8, 6), 32.0),
        DeviceProfile("l4-24gb", "NVIDIA L4 24 GB", DeviceKind.CUDA, 22.5, (8, 9), 64.0, notes="sm_89: native fp8"),
        DeviceProfile("a10-24gb", "NVIDIA A10 24 GB", DeviceKind.CUDA, 22.5, (8, 6), 64.0),
        DeviceProfile(
            "cpu", "CPU only (32 GB RAM)", DeviceKind.CPU, 32.0, None, 32.0, reserved_gib=2.0,
            notes="fp32 compute; minutes per 1024x1024 image",
        ),
    )
}  # fmt: skip


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; choose one of: {', '.join(PROFILES)}") from None


def profile_from_facts(facts: DeviceFacts, reserved_gib: float | None = None) -> DeviceProfile:
    """A profile for a detected device, so the planner can run with ``--detect``."""
    unified = facts.kind is not DeviceKind.CUDA
    return DeviceProfile(
        name="detected",
        description=facts.name,
        kind=facts.kind,
        memory_gib=facts.free_memory / GIB,
        compute_capability=facts.compute_capability,
        host_ram_gib=(facts.system_memory or facts.total_memory) / GIB,
        # free_memory already excludes what the OS uses on unified devices (MemAvailable).
        reserved_gib=0.0 if reserved_gib is None else reserved_gib,
        notes="detected on this node" + (" (unified memory)" if unified else ""),
    )
