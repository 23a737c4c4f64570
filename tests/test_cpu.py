"""The CPU thread policy: cgroup readings from fake trees, the pure decision, and applying it to torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from zimage_edge.cpu import (
    INTER_OP_THREADS,
    CpuPolicy,
    CpuReadings,
    CpuSettings,
    decide_threads,
    read_cgroup_quota,
    read_cpu,
)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(root: Path, own: str = "/", files: dict[str, str] | None = None) -> Path:
    """A cgroup v2 mount with the process in ``own``; ``files`` maps cgroup paths to ``cpu.max``."""
    write(root, "proc/self/cgroup", f"0::{own}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    for cgroup, text in (files or {}).items():
        write(root, f"sys/fs/cgroup/{cgroup.strip('/')}/cpu.max".replace("//", "/"), text)
    return root


def v1_tree(root: Path, own: str, quota: str, period: str = "100000", mount: str = "cpu,cpuacct") -> Path:
    write(root, "proc/self/cgroup", f"12:memory:{own}\n4:cpu,cpuacct:{own}\n0::/\n")
    write(root, f"sys/fs/cgroup/{mount}{own}/cpu.cfs_quota_us", quota + "\n")
    write(root, f"sys/fs/cgroup/{mount}{own}/cpu.cfs_period_us", period + "\n")
    write(root, f"sys/fs/cgroup/{mount}/cpu.cfs_quota_us", "-1\n")
    write(root, f"sys/fs/cgroup/{mount}/cpu.cfs_period_us", "100000\n")
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("max", None)],
)
def test_v2_cpu_max(tmp_path: Path, text: str, cpus: int | None) -> None:
    quota = read_cgroup_quota(v2_tree(tmp_path, "/pod/ctr", {"/pod/ctr": text}))
    assert (quota.cpus, quota.source, quota.note) == (cpus, "cgroup v2 cpu.max", "")


def test_v2_nested_path_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    files = {"/kubepods.slice": "max 100000", "/kubepods.slice/pod": "300000 100000", "/kubepods.slice/pod/c": "max"}
    assert read_cgroup_quota(v2_tree(tmp_path, "/kubepods.slice/pod/c", files)).cpus == 3
    files["/kubepods.slice/pod/c"] = "100000 100000"
    assert read_cgroup_quota(v2_tree(tmp_path, "/kubepods.slice/pod/c", files)).cpus == 1


def test_v2_host_path_not_under_the_mount_reads_the_mount_root(tmp_path: Path) -> None:
    # No cgroup namespace: /proc/self/cgroup names the host's path, the mount root is our cgroup.
    assert read_cgroup_quota(v2_tree(tmp_path, "/system.slice/docker-1.scope", {"/": "400000 100000"})).cpus == 4


def test_v2_without_cpu_max_files_is_unlimited(tmp_path: Path) -> None:
    quota = read_cgroup_quota(v2_tree(tmp_path, "/user.slice"))
    assert (quota.cpus, quota.note) == (None, "")


@pytest.mark.parametrize("text", ["abc", "", "100000 0", "-5 100000", "1 2 3"])
def test_v2_malformed_cpu_max_falls_back_to_no_quota_and_says_so(tmp_path: Path, text: str) -> None:
    root = v2_tree(tmp_path, "/a", {"/a": text})
    quota = read_cgroup_quota(root)
    assert quota.cpus is None
    assert "cgroup v2 cpu.max unreadable in /sys/fs/cgroup/a" in quota.note
    decision = decide_threads(read_cpu(root, affinity=range(4), cpu_count=4))
    assert decision.intra_op == 4
    assert quota.note in decision.reason


def test_malformed_ancestor_does_not_hide_a_readable_limit(tmp_path: Path) -> None:
    quota = read_cgroup_quota(v2_tree(tmp_path, "/a/b", {"/a": "junk", "/a/b": "200000 100000"}))
    assert quota.cpus == 2
    assert "/sys/fs/cgroup/a " in quota.note


def test_v1_quota_from_own_cgroup(tmp_path: Path) -> None:
    quota = read_cgroup_quota(v1_tree(tmp_path, "/docker/abc", "150000"))
    assert (quota.cpus, quota.source, quota.note) == (2, "cgroup v1 cpu.cfs_quota_us", "")


def test_v1_unlimited_and_separate_cpu_mount(tmp_path: Path) -> None:
    assert read_cgroup_quota(v1_tree(tmp_path, "/docker/abc", "-1", mount="cpu")).cpus is None


@pytest.mark.parametrize(("quota", "period"), [("x", "100000"), ("100000", "0"), ("0", "100000")])
def test_v1_malformed_falls_back(tmp_path: Path, quota: str, period: str) -> None:
    result = read_cgroup_quota(v1_tree(tmp_path, "/docker/abc", quota, period))
    assert result.cpus is None
    assert "cgroup v1 cpu.cfs_quota_us unreadable in /sys/fs/cgroup/cpu,cpuacct/docker/abc" in result.note


def test_v1_missing_period_file_falls_back(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, "/docker/abc", "200000")
    (root / "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us").unlink()
    assert read_cgroup_quota(root).cpus is None


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    readings = read_cpu(tmp_path, affinity={0, 1, 2}, cpu_count=8)
    assert readings == CpuReadings(cpu_count=8, affinity=3, quota=None, source="no cgroup")
    assert decide_threads(readings).reason == "no cgroup: no CPU quota, 8 CPUs, affinity 3, share 1/1 -> 3 threads"


def test_affinity_smaller_than_quota(tmp_path: Path) -> None:
    readings = read_cpu(v2_tree(tmp_path, "/", {"/": "400000 100000"}), affinity={5}, cpu_count=16)
    assert (readings.quota, readings.affinity, readings.effective) == (4, 1, 1)
    assert decide_threads(readings).intra_op == 1


def test_quota_smaller_than_affinity_with_share() -> None:
    readings = CpuReadings(cpu_count=16, affinity=16, quota=2, source="cgroup v2 cpu.max")
    decision = decide_threads(readings, share=3)
    assert (decision.intra_op, decision.inter_op, decision.effective) == (1, INTER_OP_THREADS, 2)
    assert decision.reason == "cgroup v2 cpu.max 2 CPUs of 16, affinity 16, share 1/3 -> 1 thread"
    assert decide_threads(readings, share=1).intra_op == 2
    assert decide_threads(CpuReadings(16, 12, None, "no cgroup"), share=3).intra_op == 4


def test_override_wins_over_readings_and_share() -> None:
    decision = decide_threads(CpuReadings(16, 16, 2, "cgroup v2 cpu.max"), threads=6, share=3)
    assert (decision.intra_op, decision.override, decision.share) == (6, 6, 3)
    assert decision.reason.startswith("threads=6 set explicitly (cgroup v2 cpu.max 2 CPUs of 16, affinity 16)")
    assert decision.to_dict()["intra_op"] == 6


@pytest.mark.parametrize("kwargs", [{"share": 0}, {"threads": 0}])
def test_decide_rejects_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        decide_threads(CpuReadings(2, 2, None, "no cgroup"), **kwargs)


def test_settings_read_the_names_the_agent_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.settings import load_settings

    monkeypatch.setenv("ZIMAGE_CPU__THREADS", "3")
    monkeypatch.setenv("ZIMAGE_CPU__SHARE", "2")
    assert CpuSettings() == CpuSettings(threads=3, share=2)
    assert load_settings(model="m").cpu == CpuPolicy(threads=3, share=2)
    monkeypatch.setenv("ZIMAGE_CPU__SHARE", "0")
    with pytest.raises(ValidationError):
        CpuSettings()
    with pytest.raises(ValidationError):
        CpuPolicy(threads=1, bogus=2)  # type: ignore[call-arg]


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_importing_the_policy_and_the_agent_runner_does_not_load_torch() -> None:
    code = "import sys, zimage_edge.cpu, edge_agent.serve; print('torch' in sys.modules)"
    assert run_python(code) == "False"


def test_applied_threads_equal_the_decision() -> None:
    code = (
        "import json, os, torch\n"
        "from zimage_edge.cpu import CpuPolicy, configure_threads\n"
        "d = configure_threads(CpuPolicy(share=2), affinity={0, 1, 2, 3, 4, 5}, cpu_count=8)\n"
        "print(json.dumps({'decision': d.to_dict(), 'intra': torch.get_num_threads(),"
        " 'inter': torch.get_num_interop_threads()}))"
    )
    out = json.loads(run_python(code))
    assert out["decision"]["intra_op"] == out["intra"] == 3
    assert out["decision"]["inter_op"] == out["inter"] == INTER_OP_THREADS


def test_interop_already_started_is_reported_not_hidden() -> None:
    code = (
        "import json, torch\n"
        "torch.set_num_interop_threads(2)\n"
        "from zimage_edge.cpu import CpuPolicy, configure_threads\n"
        "d = configure_threads(CpuPolicy(threads=1))\n"
        "print(json.dumps({'decision': d.to_dict(), 'inter': torch.get_num_interop_threads()}))"
    )
    out = json.loads(run_python(code))
    assert out["decision"]["inter_op"] == out["inter"] == 2
    assert "inter-op stays 2" in out["decision"]["reason"]


def test_the_suite_itself_runs_under_the_policy() -> None:
    import torch

    from tests.conftest import TEST_THREADS

    policy = CpuSettings()
    expected = (
        decide_threads(read_cpu(), threads=policy.threads, share=policy.share).intra_op
        if policy.model_fields_set
        else TEST_THREADS
    )
    assert torch.get_num_threads() == expected


def test_the_agent_logs_its_decision(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from edge_agent.serve import apply_cpu_policy
    from edge_agent.settings import AgentSettings

    # The count this process already has, so that the suite's own policy stays as it is.
    settings = AgentSettings(model="m", cpu=CpuPolicy(threads=torch.get_num_threads()))
    with caplog.at_level(logging.INFO, logger="edge_agent.serve"):
        decision = apply_cpu_policy(settings)
    record = next(r for r in caplog.records if r.getMessage() == "cpu_threads")
    assert record.__dict__["event"] == "cpu_threads"
    assert {k: record.__dict__[k] for k in decision.to_dict()} == decision.to_dict()
    assert decision.intra_op == torch.get_num_threads()
