"""The manifests against the code they run: the agent's port, probe paths and drain; the planner's variant
and memory for each class; the thread policy under each class's CPU limit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.k3s import refs
from tests.k3s.conftest import Render
from zimage_edge.device import GIB

MIB = 2**20
# What the agent process holds beside the model: Python, torch and the diffusers stack imported, the
# result cache and image store (64 MiB each by default), CUDA's host-side libraries. The manifests'
# sizing adds this to the planner's prediction (k3s/README.md).
AGENT_PROCESS_BYTES = 1 * GIB
# Memory is sized in steps of 256 MiB.
MEMORY_STEP = 256 * MIB
# A host with more cores than any class's limit: the cgroup quota, not the core count, must decide.
HOST_CORES = 64


def agent_workloads(renders: dict[str, Render]) -> list[tuple[Render, dict[str, Any]]]:
    found = [(r, w) for r in renders.values() for w in r.workloads()
             if any(c["name"] == "agent" for c in refs.pod_spec(w)["containers"])]  # fmt: skip
    assert len(found) >= 8
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def millicores(text: str) -> int:
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def settings_of(monkeypatch: pytest.MonkeyPatch, container: dict[str, Any]) -> Any:
    """The agent's settings as the pod's environment makes them (values from the downward API aside)."""
    from edge_agent.settings import load_settings

    for name, value in env_of(container).items():
        if name.startswith("ZIMAGE_"):
            monkeypatch.setenv(name, value)
    return load_settings(allow_unauthenticated=True)


def test_port_and_probes_are_what_the_agent_serves(renders: dict[str, Render], monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.app import create_app
    from edge_agent.middleware import PROBE_PATHS

    for render, workload in agent_workloads(renders):
        agent = refs.container(workload, "agent")
        with monkeypatch.context() as patch:
            settings = settings_of(patch, agent)
        assert settings.host == "0.0.0.0"
        port = {p["name"]: p["containerPort"] for p in agent["ports"]}["http"]
        assert settings.port == port
        app = create_app(settings)
        served = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}
        probes = {name: agent[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
        for name, probe in probes.items():
            assert probe["port"] in ("http", port), f"{render.name}: {name}"
            # Open without a key and to any Host header: kubelets probe with neither.
            assert probe["path"] in served, f"{render.name}: {name}"
            assert probe["path"] in PROBE_PATHS, f"{render.name}: {name}"
        # Readiness is not liveness: not ready while loading, swapping or draining, alive all the while.
        assert probes["readinessProbe"]["path"] == "/readyz"
        assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
        assert "/metrics" in served
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(port), "/metrics")


def test_grace_period_covers_the_drain(renders: dict[str, Render], monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.serve import SHUTDOWN_TIMEOUT_S

    for render, workload in agent_workloads(renders):
        agent = refs.container(workload, "agent")
        with monkeypatch.context() as patch:
            settings = settings_of(patch, agent)
        pre_stop = agent["lifecycle"]["preStop"]["sleep"]["seconds"]
        needed = pre_stop + settings.drain_grace_s + SHUTDOWN_TIMEOUT_S
        grace = refs.pod_spec(workload)["terminationGracePeriodSeconds"]
        # Enough for the drain to finish, and not so much that a stuck pod holds its GPU for long.
        assert needed < grace <= needed + 15, f"{render.name}: {grace} s for a {needed} s shutdown"


def test_each_class_runs_the_variant_the_planner_picks(renders: dict[str, Render]) -> None:
    from quantize.planner import plan
    from quantize.profiles import get_profile
    from zimage_edge.device import DeviceKind

    for render, workload in agent_workloads(renders):
        spec, labels = refs.pod_spec(workload), refs.pod_labels(workload)
        agent = refs.container(workload, "agent")
        env = env_of(agent)
        profile = get_profile(env["ZIMAGE_DEVICE_PROFILE"])
        choice = plan(profile).choice
        assert choice is not None
        where = f"{render.name}: {workload['metadata']['name']}"
        assert env["ZIMAGE_MODEL"] == f"/var/lib/zimage/seed/{choice.variant}", where
        assert labels["zimage.io/variant"] == choice.variant, where
        assert spec["nodeSelector"]["zimage.io/device-class"] == labels["zimage.io/device-class"]
        names = [c["name"] for c in spec["containers"]]
        if "node" in names:
            command = refs.container(workload, "node")["command"]
            assert command[command.index("--device-profile") + 1] == profile.name, where
        gpu = profile.kind is not DeviceKind.CPU
        limits = agent["resources"]["limits"]
        assert (limits.get("nvidia.com/gpu") == 1) is gpu, where
        assert (spec.get("runtimeClassName") == "nvidia") is gpu, where
        jetson_image = agent["image"].startswith("zimage-edge/agent-l4t")
        assert jetson_image is (profile.kind is DeviceKind.JETSON), where


def test_memory_is_sized_from_the_planner(renders: dict[str, Render]) -> None:
    from quantize.calibration import HEADROOM_FRACTION
    from quantize.planner import estimate, plan
    from quantize.profiles import get_profile
    from quantize.variants import VARIANTS

    for render, workload in agent_workloads(renders):
        agent = refs.container(workload, "agent")
        profile = get_profile(env_of(agent)["ZIMAGE_DEVICE_PROFILE"])
        result = plan(profile)
        assert result.choice is not None
        if profile.unified:
            # Jetson and CPU: the model shares the RAM the pod is charged for.
            need = result.choice.device_bytes + AGENT_PROCESS_BYTES
            available = (profile.memory_gib - profile.reserved_gib) * GIB
        else:
            # A dedicated GPU: the loader holds one component's weights in host RAM on its way to the GPU.
            weights = estimate(result.model, VARIANTS[result.choice.variant], result.dtype, result.workload).weights
            need = max(weights.values()) + AGENT_PROCESS_BYTES
            available = profile.host_ram_gib * GIB * (1 - HEADROOM_FRACTION)
        expected = math.ceil(need / MEMORY_STEP) * MEMORY_STEP
        resources = agent["resources"]
        where = f"{render.name}: {workload['metadata']['name']}"
        # Requests equal limits: the agent is the last thing the kubelet evicts for memory.
        assert resources["requests"] == resources["limits"], where
        assert quantity_bytes(resources["limits"]["memory"]) == expected, where
        assert expected <= available, f"{where}: {expected / GIB:.2f} GiB does not fit {profile.name}"


def test_every_container_has_requests_and_limits(renders: dict[str, Render]) -> None:
    for render in renders.values():
        for workload in render.workloads():
            for c in refs.all_containers(refs.pod_spec(workload)):
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][part]), f"{render.name}: {c['name']} {part}"


def write_cpu_max(root: Path, quota: int, period: int = 100_000) -> Path:
    """A cgroup v2 tree as the kubelet leaves it for a container with a CPU limit."""
    own = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(f"0::{own}\n")
    mount = root / "sys/fs/cgroup"
    (mount / own.strip("/")).mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (mount / own.strip("/") / "cpu.max").write_text(f"{quota} {period}\n")
    return root


def test_thread_policy_follows_each_class_cpu_limit(renders: dict[str, Render], tmp_path: Path) -> None:
    from zimage_edge.cpu import CpuPolicy, decide_threads, read_cpu

    checked = set()
    for render, workload in agent_workloads(renders):
        agent = refs.container(workload, "agent")
        env = env_of(agent)
        # The policy derives the threads from the quota: the manifests do not override it.
        assert "ZIMAGE_CPU__THREADS" not in env
        assert "ZIMAGE_CPU__SHARE" not in env
        limit = millicores(agent["resources"]["limits"]["cpu"])
        # The kubelet writes limits.cpu as a CFS quota of millicores * 100 per 100 ms period.
        root = write_cpu_max(tmp_path / workload["metadata"]["name"] / render.name, limit * 100)
        policy = CpuPolicy()
        decision = decide_threads(read_cpu(root, affinity=range(HOST_CORES), cpu_count=HOST_CORES),
                                  threads=policy.threads, share=policy.share)  # fmt: skip
        assert decision.quota == math.ceil(limit / 1000)
        assert decision.intra_op == math.ceil(limit / 1000) < HOST_CORES
        assert decision.source == "cgroup v2 cpu.max"
        checked.add(refs.pod_labels(workload)["zimage.io/device-class"])
    assert len(checked) == 7
