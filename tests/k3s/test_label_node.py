"""k3s/label-node.py and the device-class table it reads (quantize/device_classes.py).

The device facts here are injected, as ``zimage-edge device`` prints them: these tests run without a
GPU, and detection itself is zimage_edge.device's (tests/test_device.py). The script runs with torch
blocked from import, as on a node's host without it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from quantize.device_classes import DEVICE_CLASSES, LABEL, NoDeviceClass, class_profile, match_class
from quantize.profiles import PROFILES
from tests.k3s import refs
from tests.k3s.conftest import K3S, Render, run
from zimage_edge.device import GIB, DeviceFacts, DeviceKind, dtype_policy

SCRIPT = K3S / "label-node.py"
MIB = 2**20


def facts(kind: DeviceKind, name: str, memory_gib: float, capability: tuple[int, int] | None) -> DeviceFacts:
    memory = int(memory_gib * GIB)
    return DeviceFacts(kind=kind, name=name, total_memory=memory, free_memory=memory, compute_capability=capability,
                       unified_memory=kind is not DeviceKind.CUDA, system_memory=memory)  # fmt: skip


# What devices report (CUDA's total for dedicated GPUs, MemTotal on Jetsons and CPU hosts).
T4 = facts(DeviceKind.CUDA, "Tesla T4", 15_095 * MIB / GIB, (7, 5))
L4 = facts(DeviceKind.CUDA, "NVIDIA L4", 22_491 * MIB / GIB, (8, 9))
A10 = facts(DeviceKind.CUDA, "NVIDIA A10", 22_516 * MIB / GIB, (8, 6))
ORIN_NANO = facts(DeviceKind.JETSON, "Orin", 7.3, (8, 7))
ORIN_NX = facts(DeviceKind.JETSON, "Orin", 15.3, (8, 7))
AGX_ORIN_32 = facts(DeviceKind.JETSON, "Orin", 29.9, (8, 7))
AGX_ORIN_64 = facts(DeviceKind.JETSON, "Orin", 61.3, (8, 7))
H100 = facts(DeviceKind.CUDA, "NVIDIA H100 80GB HBM3", 79.1, (9, 0))
CPU_HOST = facts(DeviceKind.CPU, "AMD EPYC 7543", 31.3, None)


def test_the_table_is_the_bundle_s_device_classes(renders: dict[str, Render]) -> None:
    components = {p.name for p in (K3S / "components").iterdir() if (p / "agent" / "kustomization.yaml").is_file()}
    assert components == set(DEVICE_CLASSES)
    seen: dict[str, set[str]] = {}
    for render in renders.values():
        for ds in render.of_kind("DaemonSet"):
            cls = refs.pod_labels(ds)[LABEL]
            assert refs.pod_spec(ds)["nodeSelector"] == {LABEL: cls}
            agent = refs.container(ds, "agent")
            profile = next(e["value"] for e in agent["env"] if e["name"] == "ZIMAGE_DEVICE_PROFILE")
            node = refs.container(ds, "node")["command"]
            seen.setdefault(cls, set()).update({profile, node[node.index("--device-profile") + 1]})
    assert seen == {cls: {profile} for cls, profile in DEVICE_CLASSES.items()}


@pytest.mark.parametrize("device_class", list(DEVICE_CLASSES))
def test_each_class_profile_s_own_device_is_that_class(device_class: str) -> None:
    profile = class_profile(device_class)
    match = match_class(profile.facts())
    assert (match.device_class, match.profile, match.exact) == (device_class, profile, True)


@pytest.mark.parametrize(
    ("device", "device_class", "exact"),
    [
        (T4, "t4", True),
        (L4, "l4", True),
        (A10, "a10", True),
        (ORIN_NANO, "jetson-orin-nano", True),
        (ORIN_NX, "jetson-orin-nx", True),
        (AGX_ORIN_32, "jetson-agx-orin", True),
        (CPU_HOST, "cpu", True),
        # Larger than any class of its kind: the largest class it covers, said to be not its own.
        (AGX_ORIN_64, "jetson-agx-orin", False),
        (H100, "l4", False),
        (facts(DeviceKind.CPU, "a bigger host", 250.0, None), "cpu", False),
    ],
)
def test_measured_devices_get_the_class_they_cover(device: DeviceFacts, device_class: str, exact: bool) -> None:
    match = match_class(device)
    assert (match.device_class, match.exact) == (device_class, exact)
    assert match.profile.kind is device.kind


@pytest.mark.parametrize(
    ("device", "why"),
    [
        # A planner profile the bundle has no class (no pod sizes) for.
        (facts(DeviceKind.CUDA, "NVIDIA GeForce RTX 3060", 11.7, (8, 6)), "rtx3060-12gb"),
        (facts(DeviceKind.CPU, "a small host", 15.5, None), "no class's profile fits"),
        (facts(DeviceKind.JETSON, "Orin Nano 4GB", 3.4, (8, 7)), "no class's profile fits"),
        # Older than every CUDA class's compute capability.
        (facts(DeviceKind.CUDA, "Tesla P4", 7.4, (6, 1)), "no class's profile fits"),
    ],
)
def test_a_device_no_class_is_sized_for_is_refused(device: DeviceFacts, why: str) -> None:
    with pytest.raises(NoDeviceClass, match=why):
        match_class(device)


def test_a_jetson_never_gets_a_class_of_another_kind() -> None:
    # The Jetson classes use the L4T image, the others the x86-64 one: kind decides before memory does.
    huge = {kind: facts(kind, "huge", 1000.0, (9, 0) if kind is not DeviceKind.CPU else None) for kind in DeviceKind}
    for kind, device in huge.items():
        assert class_profile(match_class(device).device_class).kind is kind
    assert all(name in PROFILES for name in DEVICE_CLASSES.values())


def zimage_edge_device(device: DeviceFacts) -> str:
    """What `zimage-edge device` prints (zimage_edge/cli.py)."""
    return json.dumps({"device": device.to_dict(), "policy": dtype_policy(device).to_dict()}, indent=2)


def label_node(args: list[str], tmp_path: Path, path: list[Path], stdin: str | None = None) -> tuple[int, str, str]:
    """The script as a process whose torch import fails, with only ``path`` on PATH."""
    runner = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    env = {**os.environ, "PATH": os.pathsep.join(map(str, path))}
    proc = subprocess.run([sys.executable, "-c", runner, str(SCRIPT), *args], input=stdin, capture_output=True,
                          text=True, check=False, env=env, cwd=tmp_path)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def fake_kubectl(directory: Path, status: int) -> Path:
    """A kubectl that records its arguments and exits with ``status``."""
    directory.mkdir()
    kubectl = directory / "kubectl"
    kubectl.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{directory}/args"\nexit {status}\n')
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    return directory


def test_the_script_prints_the_label_and_the_registration_flag(tmp_path: Path) -> None:
    (tmp_path / "facts.json").write_text(zimage_edge_device(T4))
    code, out, err = label_node(["--facts", "facts.json", "--node", "t4-01"], tmp_path, [])
    assert code == 0, err
    assert out.splitlines() == [
        "kubectl label node t4-01 zimage.io/device-class=t4 --overwrite",
        "--node-label zimage.io/device-class=t4",
    ]
    assert "planner profile t4-16gb" in err
    # From a pipe, and a device that is not its class's own is said to be so.
    code, out, err = label_node(["--facts", "-", "--node", "gpu-07"], tmp_path, [], stdin=zimage_edge_device(H100))
    assert code == 0, err
    assert out.splitlines()[0] == "kubectl label node gpu-07 zimage.io/device-class=l4 --overwrite"
    assert "not the profile's own device" in err


def test_apply_runs_kubectl_from_path(tmp_path: Path) -> None:
    (tmp_path / "facts.json").write_text(zimage_edge_device(ORIN_NANO))
    good = fake_kubectl(tmp_path / "good", 0)
    code, _out, err = label_node(["--facts", "facts.json", "--node", "nano-01", "--apply"], tmp_path, [good])
    assert code == 0, err
    wanted = ["label", "node", "nano-01", "zimage.io/device-class=jetson-orin-nano", "--overwrite"]
    assert (good / "args").read_text().splitlines() == wanted
    bad = fake_kubectl(tmp_path / "bad", 1)
    code, _out, err = label_node(["--facts", "facts.json", "--node", "nano-01", "--apply"], tmp_path, [bad])
    assert code == 1
    assert "kubectl label failed" in err
    code, _out, err = label_node(["--facts", "facts.json", "--node", "nano-01", "--apply"], tmp_path, [tmp_path])
    assert code == 2
    assert "needs kubectl" in err


def test_without_torch_or_facts_it_says_how_to_get_them(tmp_path: Path) -> None:
    code, out, err = label_node([], tmp_path, [])
    assert code == 2
    assert out == ""
    assert "zimage-edge device" in err
    assert "--facts" in err


def test_a_device_without_a_class_or_bad_facts_fail_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "small.json").write_text(zimage_edge_device(facts(DeviceKind.CPU, "a small host", 15.5, None)))
    code, out, err = label_node(["--facts", "small.json"], tmp_path, [])
    assert (code, out) == (1, "")
    assert "no device class" in err
    (tmp_path / "bad.json").write_text("{}")
    code, out, err = label_node(["--facts", "bad.json"], tmp_path, [])
    assert (code, out) == (2, "")
    assert "cannot read device facts" in err


def test_the_default_node_name_is_the_host_name_as_the_kubelet_writes_it(tmp_path: Path) -> None:
    (tmp_path / "facts.json").write_text(zimage_edge_device(CPU_HOST))
    proc = run([sys.executable, SCRIPT, "--facts", "facts.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    host = socket.gethostname().strip().lower()
    assert proc.stdout.splitlines()[0] == f"kubectl label node {host} zimage.io/device-class=cpu --overwrite"
