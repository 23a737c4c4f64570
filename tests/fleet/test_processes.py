"""The fleet as an operator runs it: ``zimage-edge serve``, ``zimage-edge node`` and ``zimage-edge fleet
controller`` as processes on a real broker, steered with the ``fleet`` commands."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.settings import ApiKey
from fleet.broker import free_port
from tests.fleet.conftest import unique_id
from zimage_edge import cli

WAIT_S = 120
TOKEN = "operator-token"
POLL_S = 0.1  # between looks at the processes' state: a rollout here takes seconds


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _get(url: str, token: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(predicate, what: str) -> None:
    """Poll ``predicate`` (HTTP to the processes) with a deadline; a refused connection is "not yet"."""
    deadline = time.monotonic() + WAIT_S
    interval = threading.Event()  # never set: its wait is the poll interval
    while True:
        with contextlib.suppress(OSError):  # not listening yet: the next look decides
            if predicate():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        interval.wait(POLL_S)


@pytest.fixture
def processes(secure_broker, tiny_model_dir: Path, signing_keys, tmp_path: Path) -> Iterator[dict]:
    agent_port, controller_port = free_port(), free_port()
    node_id, controller_id = unique_id("site1"), unique_id("ctl")
    # Each process gets its own credentials for the site's TLS broker, written into its config file.
    mqtt = {name: secure_broker.settings(name, controller=name == controller_id).toml()
            for name in (node_id, controller_id)}  # fmt: skip
    env = {**os.environ, "ZIMAGE_LOG_LEVEL": "WARNING"}
    agent_cfg = _toml(
        tmp_path / "agent.toml",
        f"""
model = "{tiny_model_dir}"
port = {agent_port}
[[api_keys]]
name = "node"
sha256 = "{ApiKey.hash("node-secret")}"
admin = true
""",
    )
    controller_cfg = _toml(
        tmp_path / "controller.toml",
        f"""
controller_id = "{controller_id}"
database = "{tmp_path / "fleet.db"}"
port = {controller_port}
api_token = "{TOKEN}"
signing_public_keys = ["{signing_keys[2]}"]
{mqtt[controller_id]}
""",
    )
    node_cfg = _toml(
        tmp_path / "node.toml",
        f"""
node_id = "{node_id}"
agent_url = "http://127.0.0.1:{agent_port}"
agent_key = "node-secret"
store_dir = "{tmp_path / "store"}"
telemetry_interval_s = 0.2
labels = {{ site = "site1" }}
{mqtt[node_id]}
""",
    )
    command = [sys.executable, "-m", "zimage_edge.cli"]
    procs = [
        subprocess.Popen([*command, "serve", "--config", str(agent_cfg)], env=env, stdout=subprocess.DEVNULL),
        subprocess.Popen([*command, "fleet", "controller", "--config", str(controller_cfg)], env=env,
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([*command, "node", "--config", str(node_cfg), "--device-profile", "t4-16gb"], env=env,
                         stdout=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        yield {"agent": f"http://127.0.0.1:{agent_port}", "controller": f"http://127.0.0.1:{controller_port}",
               "node": node_id}  # fmt: skip
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(timeout=WAIT_S) == 0, proc.args


def test_a_real_agent_is_swapped_by_its_node(processes, tiny_model_dir, artifacts, signing_keys, capsys) -> None:
    controller, agent = processes["controller"], processes["agent"]
    headers = ["--url", controller, "--token", TOKEN]
    _wait(lambda: any(n["online"] and n["device"] for n in _get(f"{controller}/api/v1/nodes", TOKEN)["nodes"]),
          "the node to report to the controller")  # fmt: skip
    _wait(lambda: _get(f"{agent}/readyz")["status"] == "ready", "the agent to be ready")
    # Signed with the release key the controller trusts (publish refuses an unsigned artifact).
    artifact = artifacts.get(tiny_model_dir, "int8-te8", sign_key=signing_keys[0])
    assert cli.main(["fleet", "publish", str(artifact), "--release", "r1", *headers]) == 0
    assert "int8-te8" in capsys.readouterr().out
    assert cli.main(["fleet", "nodes", "--explain", "r1", *headers]) == 0
    explained = capsys.readouterr().out
    assert processes["node"] in explained
    assert "NVIDIA T4 16 GB" in explained
    args = ["fleet", "rollout", "create", "r1", "--waves", "100%", "--bake", "0.3s", "--node-timeout", "2m"]
    assert cli.main([*args, *headers]) == 0
    rollout_id = capsys.readouterr().out.split("rollout ", 1)[1].split(" ", 1)[0]
    _wait(lambda: _get(f"{controller}/api/v1/rollouts/{rollout_id}", TOKEN)["status"] != "running",
          "the rollout to finish")  # fmt: skip
    assert _get(f"{controller}/api/v1/rollouts/{rollout_id}", TOKEN)["status"] == "succeeded"
    served = _get(f"{agent}/v1/models", "node-secret")["data"][0]
    release = _get(f"{controller}/api/v1/releases", TOKEN)["releases"][0]
    assert served["artifact_id"] == release["variants"][0]["artifact_id"]
    assert served["variant"] == "int8-te8"
    assert cli.main(["fleet", "rollout", "status", rollout_id, *headers]) == 0
    assert "succeeded" in capsys.readouterr().out
    assert cli.main(["fleet", "rollout", "status", "ro-nothing", *headers]) == 1
    assert "404" in capsys.readouterr().err
