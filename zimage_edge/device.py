"""Device facts and the dtype policy, as plain data.

This module never imports torch at import time: the fleet controller and telemetry reuse
``DeviceFacts`` and ``DtypePolicy`` without the model stack. ``detect_device`` imports torch lazily.

Policy (one table, ``DTYPE_RULES``):
- CPU: float32. CPUs without AMX/AVX512-BF16 emulate bf16 matmuls, 5-10x slower than fp32.
- CUDA compute capability >= 8.0 (Ampere, Ada, Hopper, Jetson Orin sm_87): bfloat16, the dtype
  Z-Image-Turbo was trained in.
- CUDA compute capability < 8.0 (T4 and other sm_75 cards): no bf16 tensor cores, so float16 with the
  activation guard of ``zimage_edge.model.guard``: plain fp16 overflows in the transformer's residual
  stream and the text encoder, which shows up as NaN latents and black images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

GIB = 1024**3


class DeviceKind(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    JETSON = "jetson"


@dataclass(frozen=True)
class DeviceFacts:
    """What a node has, as measured (or injected by tests and the planner).

    ``unified_memory`` is true on Jetson: CPU and GPU share one pool, so ``total_memory`` and
    ``free_memory`` are the system's, read from /proc/meminfo, not CUDA's view of it.
    """

    kind: DeviceKind
    name: str
    total_memory: int
    free_memory: int
    compute_capability: tuple[int, int] | None = None
    unified_memory: bool = False
    system_memory: int = 0

    @property
    def sm(self) -> int | None:
        """Compute capability as one number, e.g. 75 for (7, 5)."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return major * 10 + minor

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceFacts:
        """The inverse of ``to_dict`` (what nodes report and the fleet stores)."""
        capability = data["compute_capability"]
        return cls(
            kind=DeviceKind(data["kind"]),
            name=data["name"],
            total_memory=int(data["total_memory"]),
            free_memory=int(data["free_memory"]),
            compute_capability=(int(capability[0]), int(capability[1])) if capability else None,
            unified_memory=bool(data["unified_memory"]),
            system_memory=int(data["system_memory"]),
        )


@dataclass(frozen=True)
class DtypePolicy:
    """The compute dtype chosen for a device and why."""

    dtype: str  # "float32" | "bfloat16" | "float16"
    fp16_guard: bool
    reason: str
    supports_bf16: bool
    supports_fp8: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DtypeRule:
    """One row of the policy: applies to a device kind and a compute-capability range."""

    kinds: frozenset[DeviceKind]
    min_sm: int
    max_sm: int
    dtype: str
    fp16_guard: bool
    reason: str


DTYPE_RULES: tuple[DtypeRule, ...] = (
    DtypeRule(
        kinds=frozenset({DeviceKind.CPU}),
        min_sm=0,
        max_sm=0,
        dtype="float32",
        fp16_guard=False,
        reason="CPU: bf16 is emulated on CPUs without AMX/AVX512-BF16 (5-10x slower), so compute in fp32",
    ),
    DtypeRule(
        kinds=frozenset({DeviceKind.CUDA, DeviceKind.JETSON}),
        min_sm=80,
        max_sm=999,
        dtype="bfloat16",
        fp16_guard=False,
        reason="sm>=80 has bf16 tensor cores; bf16 is the dtype the model was trained in",
    ),
    DtypeRule(
        kinds=frozenset({DeviceKind.CUDA, DeviceKind.JETSON}),
        min_sm=0,
        max_sm=79,
        dtype="float16",
        fp16_guard=True,
        reason="sm<80 has no bf16 tensor cores; fp16 needs the activation clamp guard "
        "(unguarded fp16 overflows to NaN and black images)",
    ),
)

# FP8 weight kernels (Marlin) need sm>=80 in optimum-quanto; native fp8 tensor cores need sm>=89.
FP8_MIN_SM = 80


def dtype_policy(facts: DeviceFacts) -> DtypePolicy:
    """Choose the compute dtype for ``facts`` from ``DTYPE_RULES``."""
    sm = facts.sm or 0
    for rule in DTYPE_RULES:
        if facts.kind in rule.kinds and rule.min_sm <= sm <= rule.max_sm:
            return DtypePolicy(
                dtype=rule.dtype,
                fp16_guard=rule.fp16_guard,
                reason=rule.reason,
                supports_bf16=facts.kind is not DeviceKind.CPU and sm >= 80,
                supports_fp8=facts.kind is not DeviceKind.CPU and sm >= FP8_MIN_SM,
            )
    raise ValueError(f"no dtype rule for {facts.kind} sm={sm}")


@dataclass(frozen=True)
class MemInfo:
    total: int
    available: int


def read_meminfo(path: Path = Path("/proc/meminfo")) -> MemInfo:
    """Total and available system memory in bytes, from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            # /proc/meminfo reports kB (KiB).
            values[key] = int(parts[0]) * 1024
    return MemInfo(total=values["MemTotal"], available=values.get("MemAvailable", values.get("MemFree", 0)))


@dataclass(frozen=True)
class SystemProbe:
    """Where detection looks; tests point these at fixture files."""

    meminfo: Path = Path("/proc/meminfo")
    tegra_release: Path = Path("/etc/nv_tegra_release")
    device_tree_model: Path = Path("/proc/device-tree/model")

    def is_jetson(self) -> bool:
        if self.tegra_release.exists():
            return True
        try:
            return "jetson" in self.device_tree_model.read_text(errors="replace").lower()
        except OSError:
            return False


def detect_device(probe: SystemProbe | None = None, device_index: int = 0) -> DeviceFacts:
    """Detect this node: Jetson (unified memory), a CUDA GPU, or the CPU."""
    probe = probe or SystemProbe()
    mem = read_meminfo(probe.meminfo)
    import torch  # lazy: keeps this module importable without torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        capability = (props.major, props.minor)
        if probe.is_jetson():
            # CUDA's mem_get_info on Jetson counts memory the OS could reclaim as used; the system's
            # MemAvailable is the number that decides whether a model fits.
            return DeviceFacts(
                kind=DeviceKind.JETSON,
                name=props.name,
                total_memory=mem.total,
                free_memory=mem.available,
                compute_capability=capability,
                unified_memory=True,
                system_memory=mem.total,
            )
        free, total = torch.cuda.mem_get_info(device_index)
        return DeviceFacts(
            kind=DeviceKind.CUDA,
            name=props.name,
            total_memory=total,
            free_memory=free,
            compute_capability=capability,
            unified_memory=False,
            system_memory=mem.total,
        )
    return DeviceFacts(
        kind=DeviceKind.CPU,
        name=_cpu_name(),
        total_memory=mem.total,
        free_memory=mem.available,
        compute_capability=None,
        unified_memory=True,
        system_memory=mem.total,
    )


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return os.uname().machine


def torch_device(facts: DeviceFacts) -> str:
    """The torch device string for ``facts``."""
    return "cpu" if facts.kind is DeviceKind.CPU else "cuda"
