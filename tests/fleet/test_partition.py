"""A node cut off by the network, in a network namespace of its own: its will marks it offline, a rollout
does not wait for it longer than its node timeout, and when the link comes back the telemetry it made
meanwhile arrives in full.

The broker is the site's (TLS, credentials, ACLs: ``fleet.security``). The node is a real
``zimage-edge node`` process inside the namespace (no agent beside it: it reports the
agent unreachable, which is all this test needs); the broker and the controller live outside, reached
over a veth pair whose outer end is switched off and on. Needs root and iproute2 (``ip``), as the
fleet's other system tests need Mosquitto: a missing one fails with the command that installs it."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.artifact_server import ArtifactCatalog
from fleet.controller import Controller, ControllerConfig
from fleet.rollout import NodePhase, OnTimeout, RolloutSpec, RolloutStatus
from fleet.security import init_pki, provision_controller, provision_node
from fleet.store import Store
from tests.fleet.conftest import TEST_RECONNECT_MAX_S, TEST_RECONNECT_MIN_S, unique_id

WAIT_S = 60.0
POLL_S = 0.05  # between looks at the store and the node's outbox: short next to a keepalive
KEEPALIVE_S = 1  # the broker declares the node gone after 1.5 x this without a packet


@dataclass(frozen=True)
class Link:
    namespace: str
    outer: str  # the veth end outside, in the host's namespace
    host_ip: str  # outside: where the broker listens
    node_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def link() -> Iterator[Link]:
    if shutil.which("ip") is None:
        pytest.fail("the partition test needs iproute2: apt-get install iproute2 (scripts/bootstrap.sh test)",
                    pytrace=False)  # fmt: skip
    if os.geteuid() != 0:
        pytest.fail("the partition test makes a network namespace: run the suite as root", pytrace=False)
    tag = uuid.uuid4().hex[:8]
    subnet = random.randrange(256)  # a /30 of 10.213.0.0/16 of its own, beside other runs
    link = Link(f"zt-{tag}", f"zo{tag}", f"10.213.{subnet}.1", f"10.213.{subnet}.2")
    inner = f"zi{tag}"
    _ip("netns", "add", link.namespace)
    try:
        _ip("link", "add", link.outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", link.namespace)
        _ip("addr", "add", f"{link.host_ip}/30", "dev", link.outer)
        _ip("link", "set", link.outer, "up")
        _ip("-n", link.namespace, "addr", "add", f"{link.node_ip}/30", "dev", inner)
        _ip("-n", link.namespace, "link", "set", inner, "up")
        _ip("-n", link.namespace, "link", "set", "lo", "up")
        yield link
    finally:
        # Deleting the namespace deletes its veth end and with it the pair; the outer one is removed in
        # case the namespace went first. Either may already be gone.
        subprocess.run(["ip", "link", "del", link.outer], check=False, capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", link.namespace], check=False, capture_output=True, timeout=30)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)  # polling the store and the outbox file with a deadline


def _produced(outbox: Path) -> int:
    """The node's highest seq so far (its outbox keeps every unacknowledged row; acked ones leave it)."""
    if not outbox.exists():
        return 0
    connection = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        return int(connection.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:  # the node has not made its table yet
        return 0
    finally:
        connection.close()


async def test_a_partitioned_node_goes_offline_times_out_and_its_telemetry_arrives_after(
    link: Link, make_broker, tiny_model_dir, artifacts, tmp_path: Path
) -> None:
    # The site's broker: TLS for the address the node reaches it at; the node and the controller provisioned.
    pki = init_pki(tmp_path / "pki", hosts=(link.host_ip,))
    node_id, controller_id = unique_id("cut"), unique_id("ctl")
    node_credentials = provision_node(pki.root, node_id)
    controller_credentials = provision_controller(pki.root, controller_id)
    broker = make_broker(pki=pki.root, host=link.host_ip)
    timing = {"keepalive_s": KEEPALIVE_S, "reconnect_min_s": TEST_RECONNECT_MIN_S,
              "reconnect_max_s": TEST_RECONNECT_MAX_S}  # fmt: skip
    mqtt = controller_credentials.mqtt_settings(link.host_ip, broker.port, **timing)
    store_dir = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_id = "{node_id}"\nagent_url = "http://127.0.0.1:9"\nstore_dir = "{store_dir}"\n'
        "telemetry_interval_s = 0.1\n" + node_credentials.mqtt_settings(link.host_ip, broker.port, **timing).toml()
    )
    node = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", link.namespace, sys.executable, "-m", "zimage_edge.cli", "node", "--config",
        str(config), "--device-profile", "t4-16gb",
        env={**os.environ, "ZIMAGE_LOG_LEVEL": "WARNING"}, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    store = Store.open(tmp_path / "fleet.db")
    controller = Controller(
        ControllerConfig(controller_id=controller_id, mqtt=mqtt, artifact_base_url="http://127.0.0.1:1",
                         tick_s=0.1, min_step_interval_s=0.05),
        store, ArtifactCatalog(),
    )  # fmt: skip
    stop = asyncio.Event()
    run = asyncio.create_task(controller.run(stop), name="test-controller")
    outbox = store_dir / "outbox.db"
    try:
        await _until(lambda: (n := store.get_node(node_id)) is not None and n.online and n.facts is not None,
                     "the node to report from inside its namespace")  # fmt: skip
        await _until(lambda: store.ack_watermark(node_id) >= 5, "telemetry to flow")

        _ip("link", "set", link.outer, "down")  # the partition
        cut_at = _produced(outbox)
        await _until(lambda: not store.get_node(node_id).online, "its will to mark it offline")  # type: ignore[union-attr]
        # A rollout does not wait for it longer than its node timeout.
        await asyncio.to_thread(controller.publish_release, "r1", [artifacts.get(tiny_model_dir, "int8")],
                                allow_unsigned=True)  # fmt: skip
        spec = RolloutSpec(release="r1", waves=("100%",), bake_s=0.1, node_timeout_s=1.0,
                           on_timeout=OnTimeout.SKIP)  # fmt: skip
        state = await controller.create_rollout(spec)

        def finished() -> bool:
            current = store.load_rollout(state.id)
            return current is not None and current.status is not RolloutStatus.RUNNING

        await _until(finished, "the rollout to give up on the node")
        final = store.load_rollout(state.id)
        assert final is not None
        assert final.status is RolloutStatus.SUCCEEDED  # nothing else to roll out to: the node was skipped
        assert final.node(node_id).phase in (NodePhase.SKIPPED, NodePhase.ROLLED_BACK)
        assert "within 1 s" in final.node(node_id).reason, final.node(node_id)
        # Meanwhile the node goes on measuring, into its outbox.
        await _until(lambda: _produced(outbox) >= cut_at + 10, "telemetry made while cut off")
        assert store.ack_watermark(node_id) < _produced(outbox)

        _ip("link", "set", link.outer, "up")  # the link comes back
        made = _produced(outbox)
        await _until(lambda: store.ack_watermark(node_id) >= made, "everything made while cut off to be stored")
        await _until(lambda: store.get_node(node_id).online, "the node to be online again")  # type: ignore[union-attr]
        assert store.telemetry_count(node_id) >= made  # every seq up to it, once (the watermark is contiguous)
    finally:
        node.terminate()
        await asyncio.wait_for(node.wait(), WAIT_S)
        stop.set()
        await asyncio.wait_for(run, WAIT_S)
        store.close()
