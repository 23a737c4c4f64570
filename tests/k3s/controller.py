"""The fleet controller's configuration as each of its pods reads it.

One replica (k3s/base) reads its controller.toml straight from a Secret. Replicas
(k3s/components/controller-replicas) read what their init container writes: here that container's own
shell script runs, for each replica's pod name, over the rendered Secrets laid out where the pod mounts
them, so the checks see exactly the file the replica would read.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tests.k3s import refs
from tests.k3s.conftest import Render, run

CONTROLLER = "zimage-controller"


@dataclass(frozen=True)
class PodConfig:
    """One controller pod: its name, the workload that makes it, and the settings it starts with."""

    pod: str
    workload: dict[str, Any]
    text: str
    settings: Any  # fleet.cli.ControllerSettings


def controller_workload(render: Render) -> dict[str, Any]:
    found = [w for w in render.workloads() if w["metadata"]["name"] == CONTROLLER]
    assert len(found) == 1, f"{render.name}: {len(found)} controller workloads"
    return found[0]


def replicas(workload: dict[str, Any]) -> int:
    count: int = workload["spec"].get("replicas", 1)
    return count


def pod_names(workload: dict[str, Any]) -> list[str]:
    """The pods' names: a StatefulSet's are <name>-<ordinal>; a Deployment's are random (its name stands in)."""
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return [f"{name}-{i}" for i in range(replicas(workload))]
    return [name]


def config_path(workload: dict[str, Any]) -> str:
    command = refs.container(workload, "controller")["command"]
    path: str = command[command.index("--config") + 1]
    return path


def lay_out_mounts(render: Render, workload: dict[str, Any], container_name: str, root: Path) -> dict[str, str]:
    """The container's Secret and emptyDir volumes as directories under ``root``; mount path -> directory."""
    volumes = {v["name"]: v for v in refs.pod_spec(workload)["volumes"]}
    where: dict[str, str] = {}
    for mount in refs.container(workload, container_name).get("volumeMounts", []):
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            source = volume["secret"]
            data = render.data("Secret", source["secretName"])
            items = {i["key"]: i["path"] for i in source.get("items", [])} or {key: key for key in data}
            for key, path in items.items():
                (target / path).write_text(data[key])
        else:
            assert "emptyDir" in volume, f"{render.name}: no stand-in for volume {volume}"
        where[mount["mountPath"]] = str(target)
    return where


def run_init(
    render: Render,
    workload: dict[str, Any],
    container_name: str,
    pod: str,
    root: Path,
    *,
    replace: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run an init container's ``sh -c`` script as pod ``pod`` would, its mount paths moved under ``root``;
    ``replace`` gives other contents to files of the pod (by their path in the pod)."""
    init = refs.container(workload, container_name)
    assert init["command"][:2] == ["sh", "-c"], init["command"]
    where = lay_out_mounts(render, workload, container_name, root)
    for path, text in (replace or {}).items():
        assert moved(where, path).is_file(), path
        moved(where, path).write_text(text)
    mounts = re.compile("|".join(re.escape(p) for p in sorted(where, key=len, reverse=True)) + r"(?![\w.-])")
    script = mounts.sub(lambda m: where[m[0]], init["command"][2])
    env = {"PATH": os.environ["PATH"]}
    for var in init.get("env", []):
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field == "metadata.name", f"{render.name}: no stand-in for {var}"
        env[var["name"]] = pod
    return run(["sh", "-c", script], env=env), where


def moved(where: dict[str, str], path: str) -> Path:
    """Where ``path`` of the pod lies under the laid-out mounts."""
    target = PurePosixPath(path)
    mount = max((m for m in where if PurePosixPath(m) in target.parents), key=len)
    return Path(where[mount]) / target.relative_to(mount)


def controller_configs(render: Render, root: Path) -> list[PodConfig]:
    """Each controller pod's configuration, validated by the controller's own settings class."""
    from fleet.cli import ControllerSettings

    workload = controller_workload(render)
    path = config_path(workload)
    mount = refs.resolve_path(render, workload, "controller", path)
    volume = next(v for v in refs.pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    configs = []
    if "secret" in volume:
        text = render.data("Secret", volume["secret"]["secretName"])[PurePosixPath(path).name]
        configs.append(PodConfig(workload["metadata"]["name"], workload, text,
                                 ControllerSettings.model_validate(tomllib.loads(text))))  # fmt: skip
        return configs
    # Written at start by the init container that writes to that path.
    writers = [c["name"] for c in refs.pod_spec(workload).get("initContainers", []) if f"> {path}" in c["command"][-1]]
    assert len(writers) == 1, f"{render.name}: {path} is written by {writers}"
    for pod in pod_names(workload):
        proc, where = run_init(render, workload, writers[0], pod, root / pod)
        assert proc.returncode == 0, f"{render.name}: {pod}: {proc.stderr}"
        text = moved(where, path).read_text()
        configs.append(PodConfig(pod, workload, text, ControllerSettings.model_validate(tomllib.loads(text))))
    return configs
