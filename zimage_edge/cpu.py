"""CPU threads for torch: read the CPU this process really has, decide a thread count, apply it.

torch sizes its OpenMP pool from the machine's cores, not from a container's CPU quota, its affinity
mask or the other processes sharing the cores. Measured on a 2-core machine (shapes model, 8 steps
at 64x64): 0.07 s idle, ~6 s beside a second multi-threaded torch process, ~0.1 s with one thread
each. A pod with ``limits.cpu: 2`` on a 16-core node, or three agents on one machine, is that case.

- ``read_cpu`` reads cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (of the
  process's own cgroup and its ancestors, from ``/proc/self/cgroup``), the affinity mask and
  ``os.cpu_count()``; every location is injectable, so tests use fake trees.
- ``decide_threads`` is the pure rule: ``max(1, min(affinity, quota) // share)`` unless ``threads``
  is given.
- ``configure_threads`` applies it to torch. ``OMP_WAIT_POLICY`` is left alone (see ``WAIT_POLICY``).

Importing this module is torch-free; torch is imported only inside ``apply_threads``. The
environment (``ZIMAGE_CPU__THREADS``, ``ZIMAGE_CPU__SHARE``) is read only by ``CpuSettings`` for the
CLI, tests and benchmarks, and by the agent's settings (its ``cpu`` section), which use the same names.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

CGROUP_MOUNT = Path("sys/fs/cgroup")
PROC_SELF_CGROUP = Path("proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller: its own hierarchy, or joined with cpuacct (systemd,
# Docker and kubelet hosts use one of these names).
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
# A thread count beyond this is a typo, not a machine.
MAX_THREADS = 1024

# Inter-op threads: 1. torch's inter-op pool only runs ``torch.jit.fork`` tasks and TorchScript
# async ops; the eager diffusers pipeline never submits to it, and one worker thread drives the model
# (the agent's single model executor, the CLI's main thread). A larger pool would only add idle threads.
INTER_OP_THREADS = 1

# WAIT_POLICY: OMP_WAIT_POLICY is not set by the policy. libgomp (torch's OpenMP) reads it once, when
# ``import torch`` loads the library, and by default spins a while before a worker sleeps.
# ``benchmarks/cpu_threads.py`` (results/cpu-threads.md: 2 cores shared with other users' work, shapes
# model 64x64 8 steps, s/image p50, wait unset vs PASSIVE): alone with 2 threads 0.135 vs 0.157 (a
# quiet earlier run: 0.077 vs 0.127; PASSIVE wakes sleeping workers at every parallel region); beside
# a busy process 0.480 vs 0.147; two torch processes of 2 threads 0.570 vs 0.150; two processes of
# 1 thread (this policy, share 2) 0.128 vs 0.138 (no workers, nothing to spin). The thread policy
# alone removes the slowdown of sharing, without PASSIVE's cost when a process has its cores to
# itself. The agent spins little anyway: it starts OpenMP teams from its load and model threads, and
# libgomp shortens spinning when a process has more OpenMP threads than CPUs. Where a node shares
# cores with processes that ignore the policy, set OMP_WAIT_POLICY=PASSIVE in the environment of
# the process (pod spec, unit file): Python cannot change it once torch is imported.


class CpuPolicy(BaseModel):
    """How many threads torch may use: the agent's ``cpu`` section and the base of ``CpuSettings``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int | None = Field(
        default=None,
        ge=1,
        le=MAX_THREADS,
        description="torch intra-op threads, exactly (default: the CPUs this process may use, divided by share)",
    )
    share: int = Field(
        default=1,
        ge=1,
        le=MAX_THREADS,
        description="processes sharing these CPUs on purpose (e.g. 3 agents on one machine): each takes 1/share",
    )


class CpuSettings(BaseSettings, CpuPolicy):
    """``CpuPolicy`` from ``ZIMAGE_CPU__THREADS`` / ``ZIMAGE_CPU__SHARE``, the names the agent reads too."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_CPU__", extra="forbid", frozen=True)


@dataclass(frozen=True)
class CpuQuota:
    """The cgroup CPU limit: ``cpus`` is ceil(quota / period), None when unlimited or unknown."""

    cpus: int | None
    source: str  # e.g. "cgroup v2 cpu.max"; "no cgroup" when none was found
    note: str = ""  # why a file that exists was not used


@dataclass(frozen=True)
class CpuReadings:
    """What this process may use, as read (or injected)."""

    cpu_count: int
    affinity: int
    quota: int | None
    source: str
    note: str = ""

    @property
    def effective(self) -> int:
        return self.affinity if self.quota is None else max(1, min(self.affinity, self.quota))


@dataclass(frozen=True)
class ThreadDecision:
    """The threads torch gets, the readings they came from and why, in one line."""

    intra_op: int
    inter_op: int
    cpu_count: int
    affinity: int
    quota: int | None
    effective: int
    share: int
    override: int | None
    source: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quota_cpus(quota: int, period: int) -> int:
    return max(1, math.ceil(quota / period))


def _parse_cpu_max(text: str) -> int | None:
    """``"max 100000"`` -> None, ``"200000 100000"`` -> 2; ValueError on anything else."""
    fields = text.split()
    if len(fields) not in (1, 2):
        raise ValueError(text)
    quota = fields[0]
    # A lone quota means the kernel's default period.
    period = int(fields[1]) if len(fields) == 2 else 100_000
    if period <= 0:
        raise ValueError(text)
    if quota == "max":
        return None
    value = int(quota)
    if value <= 0:
        raise ValueError(text)
    return _quota_cpus(value, period)


def _parse_cfs(quota_text: str, period_text: str) -> int | None:
    """v1 ``cpu.cfs_quota_us`` (-1: unlimited) over ``cpu.cfs_period_us``; ValueError when malformed."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if period <= 0 or quota == 0 or quota < -1:
        raise ValueError(f"{quota_text.strip()} / {period_text.strip()}")
    return None if quota == -1 else _quota_cpus(quota, period)


def _own_cgroups(root: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup v2 path and its v1 paths by controller, from /proc/self/cgroup."""
    try:
        lines = (root / PROC_SELF_CGROUP).read_text().splitlines()
    except OSError:
        return None, {}
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return unified, v1


def _chain(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory and its ancestors up to the mount, innermost first.

    Without a cgroup namespace, /proc/self/cgroup shows the host's path while the container sees its
    own cgroup at the mount root: when the path does not exist under the mount, the mount root is ours.
    """
    start = mount / path.strip("/") if path.strip("/") else mount
    if not start.is_dir():
        return [mount]
    chain = [start]
    while chain[-1] != mount:
        chain.append(chain[-1].parent)
    return chain


def read_cgroup_quota(root: Path = Path("/")) -> CpuQuota:
    """The tightest CPU quota on this process's cgroup and its ancestors (v2, else v1)."""
    mount = root / CGROUP_MOUNT
    unified, v1 = _own_cgroups(root)
    if (mount / "cgroup.controllers").is_file():
        return _tightest(
            "cgroup v2 cpu.max",
            root,
            _chain(mount, unified or "/"),
            lambda d: _parse_cpu_max((d / "cpu.max").read_text()) if (d / "cpu.max").is_file() else None,
        )
    for name in V1_CPU_MOUNTS:
        if (mount / name).is_dir():
            return _tightest(
                "cgroup v1 cpu.cfs_quota_us",
                root,
                _chain(mount / name, v1.get("cpu", "/")),
                lambda d: (
                    _parse_cfs((d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text())
                    if (d / "cpu.cfs_quota_us").is_file()
                    else None
                ),
            )
    return CpuQuota(None, "no cgroup")


def _tightest(source: str, root: Path, chain: list[Path], read: Callable[[Path], int | None]) -> CpuQuota:
    cpus: int | None = None
    notes = []
    for directory in chain:
        try:
            found = read(directory)
        except (OSError, ValueError) as exc:
            # A limit we cannot read is not a limit we can honour: say so and go on without it.
            shown = "/" + str(directory.relative_to(root))
            notes.append(f"{source} unreadable in {shown} ({exc}): ignored")
            continue
        if found is not None:
            cpus = found if cpus is None else min(cpus, found)
    return CpuQuota(cpus, source, "; ".join(notes))


def _affinity_count(cpu_count: int) -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:  # macOS, Windows: no affinity mask to read
        return cpu_count
    return len(getaffinity(0))


def read_cpu(
    root: Path = Path("/"), *, affinity: Collection[int] | None = None, cpu_count: int | None = None
) -> CpuReadings:
    """What this process may use: cgroup quota under ``root``, affinity mask, core count."""
    cores = cpu_count if cpu_count is not None else os.cpu_count() or 1
    allowed = len(affinity) if affinity is not None else _affinity_count(cores)
    quota = read_cgroup_quota(root)
    if quota.note:
        log.warning("cpu_quota_unreadable", extra={"event": "cpu_quota_unreadable", "note": quota.note})
    return CpuReadings(cpu_count=cores, affinity=max(1, allowed), quota=quota.cpus, source=quota.source,
                       note=quota.note)  # fmt: skip


def _plural(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def decide_threads(readings: CpuReadings, *, threads: int | None = None, share: int = 1) -> ThreadDecision:
    """Intra-op threads: ``threads`` when given, else ``max(1, effective // share)``; inter-op 1."""
    if share < 1:
        raise ValueError(f"share must be >= 1, not {share}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    r = readings
    if r.quota is None:
        limit = f"{r.source}: no CPU quota, {r.cpu_count} CPUs"
    else:
        limit = f"{r.source} {r.quota} CPUs of {r.cpu_count}"
    if threads is not None:
        intra = threads
        reason = f"threads={threads} set explicitly ({limit}, affinity {r.affinity}) -> {_plural(intra)}"
    else:
        intra = max(1, r.effective // share)
        reason = f"{limit}, affinity {r.affinity}, share 1/{share} -> {_plural(intra)}"
    if r.note:
        reason += f"; {r.note}"
    return ThreadDecision(
        intra_op=intra,
        inter_op=INTER_OP_THREADS,
        cpu_count=r.cpu_count,
        affinity=r.affinity,
        quota=r.quota,
        effective=r.effective,
        share=share,
        override=threads,
        source=r.source,
        reason=reason,
    )


def apply_threads(decision: ThreadDecision) -> ThreadDecision:
    """Set torch's thread pools to ``decision``; returns what torch now uses.

    ``torch.set_num_interop_threads`` works once, before any parallel work: when that moment has
    passed, the inter-op count stays what it is, which is logged and reflected in the result.
    """
    import torch

    torch.set_num_threads(decision.intra_op)
    inter = torch.get_num_interop_threads()
    if inter != decision.inter_op:
        try:
            torch.set_num_interop_threads(decision.inter_op)
            inter = decision.inter_op
        except RuntimeError as exc:
            log.warning(
                "cpu_interop_threads_kept",
                extra={"event": "cpu_interop_threads_kept", "wanted": decision.inter_op, "kept": inter,
                       "error": str(exc)},
            )  # fmt: skip
            decision = replace(
                decision, inter_op=inter, reason=f"{decision.reason}; inter-op stays {inter} (pool already started)"
            )
    return decision


def configure_threads(
    policy: CpuPolicy,
    *,
    root: Path = Path("/"),
    affinity: Collection[int] | None = None,
    cpu_count: int | None = None,
) -> ThreadDecision:
    """Read the CPU, decide with ``policy`` and apply to torch; call before any model work."""
    decision = decide_threads(
        read_cpu(root, affinity=affinity, cpu_count=cpu_count), threads=policy.threads, share=policy.share
    )
    return apply_threads(decision)
