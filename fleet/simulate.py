"""Simulated nodes for scale benchmarks: many per process, each with its own real MQTT connection.

A simulated node speaks the fleet protocol as ``fleet.node.Node`` does on the wire: a birth message and
its will (``bd_seq``), a retained ``reported`` state with a device profile's facts and labels, telemetry
with a per-node ``seq`` at a fixed interval (QoS 1), kept until the controller's ack watermark covers it
and published again after a reconnect, and it follows ``desired``: a new generation is "installed" at
once (no download, no agent: the benchmark measures the controller and the broker, not the disk) and
reported ready on the desired artifact.

Lightweight on purpose: no thread per node. Every paho client of a process lives on one asyncio loop
through paho's socket callbacks (``on_socket_open`` / ``register_write``, the pattern of paho's
``loop_asyncio`` example), and one task drives ``loop_misc`` (keepalive, retries) for all of them.

Run as ``python -m fleet.simulate --nodes N ...``: it prints one JSON line when every node is connected
(``{"ready": ...}``), runs until SIGTERM/SIGINT, then stops producing, waits up to ``--drain-s`` for the
acks of what it produced, and writes its results as JSON (to ``--results FILE``, or one line on stdout).
Torch-free.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from fleet.mqtt import tls_context
from fleet.protocol import (
    DEFAULT_PREFIX,
    Ack,
    AgentHealth,
    AgentStats,
    DesiredState,
    DeviceFactsModel,
    NodeState,
    ReportedState,
    RunningModel,
    SystemStats,
    Telemetry,
    Topics,
    decode,
    encode,
)
from quantize.profiles import get_profile

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

# How often loop_misc runs for every client: paho's own loop calls it about once a second.
MISC_INTERVAL_S = 1.0
# How long a clean close waits for the broker to take every DISCONNECT (milliseconds on loopback).
CLOSE_TIMEOUT_S = 5.0
# A node that lost its connection tries again after this (jittered): the benchmark counts disconnects.
RECONNECT_S = 1.0
# Ack latency samples kept per process (reservoir): enough for a p99 of each phase of a benchmark.
LATENCY_SAMPLES = 50_000
# The artifact every simulated node runs before any rollout (an id no release has).
BASE_ARTIFACT = "0" * 64
GIB = 1 << 30


@dataclass
class NodeStats:
    produced: int = 0  # telemetry seqs made
    published_again: int = 0  # seqs sent again after a reconnect (not acked before it)
    acked: int = 0  # the controller's watermark as last heard
    disconnects: int = 0
    connects: int = 0
    desired: int = 0  # desired states received with a new generation
    reported_at: dict[int, float] = field(default_factory=dict)  # generation -> when it was reported applied


class SimNode:
    """One simulated node: a paho client on the shared loop, an in-memory outbox, a desired follower."""

    def __init__(self, fleet: SimFleet, node_id: str, profile: str, labels: dict[str, str]) -> None:
        self.fleet = fleet
        self.node_id = node_id
        self.facts = DeviceFactsModel.from_facts(get_profile(profile).facts())
        self.labels = labels
        self.stats = NodeStats()
        self.bd_seq = 0
        self.generation = 0
        self.running = RunningModel(artifact_id=BASE_ARTIFACT, variant="base", dtype="bfloat16", device="cuda")
        self.unacked: dict[int, tuple[bytes, float]] = {}  # seq -> (payload, when first published)
        self.waiting_since: float | None = None  # as fleet.node: sent, unacknowledged, no ack progress since
        self.connected = asyncio.Event()
        self.socket_closed = asyncio.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"node-{node_id}", protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(fleet.max_inflight)
        if fleet.tls is not None:
            self.client.tls_set_context(fleet.tls)
        if fleet.passwords is not None:  # a site's broker: the node id is the user name
            self.client.username_pw_set(node_id, fleet.passwords[node_id])
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write

    # -- paho on the asyncio loop ------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self.socket_closed.clear()
        self.fleet.loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self.fleet.loop.remove_reader(sock)
        self.socket_closed.set()

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self.fleet.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self.fleet.loop.remove_writer(sock)

    def connect(self) -> None:
        """Connect (blocking TCP connect on loopback: fast), with the death of this bd_seq as the will."""
        self.bd_seq += 1
        will = encode(NodeState(node=self.node_id, online=False, bd_seq=self.bd_seq, ts=time.time()))
        self.client.will_set(self.fleet.topics.state(self.node_id), will, qos=1, retain=True)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.fleet.session_expiry_s
        self.client.connect(
            self.fleet.host, self.fleet.port, keepalive=self.fleet.keepalive_s, clean_start=False,
            properties=properties,
        )  # fmt: skip

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self.fleet.errors.append(f"{self.node_id}: connect refused: {reason}")
            return
        self.stats.connects += 1
        topics = self.fleet.topics
        client.subscribe([(topics.desired(self.node_id), 1), (topics.ack(self.node_id), 1)])
        birth = NodeState(node=self.node_id, online=True, bd_seq=self.bd_seq, ts=time.time())
        client.publish(topics.state(self.node_id), encode(birth), qos=1, retain=True)
        self._report()
        # Whatever the controller has not acknowledged goes again (it stores each seq once).
        for seq in sorted(self.unacked):
            client.publish(topics.telemetry(self.node_id), self.unacked[seq][0], qos=1)
            self.stats.published_again += 1
        self.connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.connected.clear()
        if self.fleet.stopping:
            return
        self.stats.disconnects += 1
        self.fleet.loop.call_later(RECONNECT_S * (0.5 + random.random()), self._reconnect)

    def _reconnect(self) -> None:
        if self.fleet.stopping or self.connected.is_set():
            return
        try:
            self.connect()
        except OSError as exc:
            self.fleet.errors.append(f"{self.node_id}: reconnect failed: {exc}")
            self.fleet.loop.call_later(RECONNECT_S * (0.5 + random.random()), self._reconnect)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            model = decode(message.topic, bytes(message.payload), self.fleet.topics).model
        except (ValueError, ValidationError) as exc:
            self.fleet.errors.append(f"{self.node_id}: bad message on {message.topic}: {exc}")
            return
        if isinstance(model, Ack):
            self._acked(model.seq)
        elif isinstance(model, DesiredState) and model.generation > self.generation:
            self.stats.desired += 1
            self.generation = model.generation
            self.running = RunningModel(
                artifact_id=model.artifact_id, variant=model.variant, dtype="bfloat16", device="cuda"
            )
            self._report()
            self.stats.reported_at[model.generation] = time.monotonic()

    def _acked(self, seq: int) -> None:
        now = time.monotonic()
        self.stats.acked = max(self.stats.acked, seq)
        done = [s for s in self.unacked if s <= seq]
        for acked in done:
            self.fleet.sample_latency(now, now - self.unacked.pop(acked)[1])
        if done:
            self.waiting_since = now if self.unacked else None

    # -- what the node says ------------------------------------------------------------------------

    def _report(self) -> None:
        reported = ReportedState(
            node=self.node_id, generation=self.generation, running=self.running,
            health=AgentHealth(alive=True, ready=True), device=self.facts, labels=self.labels, ts=time.time(),
        )  # fmt: skip
        self.client.publish(self.fleet.topics.reported(self.node_id), encode(reported), qos=1, retain=True)

    def telemetry(self) -> None:
        self.stats.produced += 1
        seq = self.stats.produced
        payload = encode(
            Telemetry(
                node=self.node_id, seq=seq, ts=time.time(),
                system=SystemStats(cpu_percent=12.5, memory_used=3 * GIB, memory_total=16 * GIB,
                                   disk_free=100 * GIB, disk_total=200 * GIB),
                agent=AgentStats(queue_depth=0, latency_p50_ms=900.0, latency_p95_ms=1200.0, error_rate=0.0,
                                 images_generated=seq),
            )
        )  # fmt: skip
        now = time.monotonic()
        self.unacked[seq] = (payload, now)
        if self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since >= self.fleet.resend_after_s:
            # No ack progress for that long (a controller replica died holding them): send them again.
            self.waiting_since = now
            for old_seq in sorted(self.unacked):
                if old_seq != seq:
                    self.client.publish(self.fleet.topics.telemetry(self.node_id), self.unacked[old_seq][0], qos=1)
                    self.stats.published_again += 1
        # Disconnected: paho queues QoS 1 until the reconnect, and _on_connect sends unacked ones too;
        # the controller stores each seq once either way.
        self.client.publish(self.fleet.topics.telemetry(self.node_id), payload, qos=1)


class SimFleet:
    """``count`` simulated nodes on one event loop. See the module docstring."""

    def __init__(
        self,
        node_ids: Sequence[str],
        profiles: Sequence[str],
        *,
        host: str,
        port: int,
        prefix: str = DEFAULT_PREFIX,
        interval_s: float = 1.0,
        keepalive_s: int = 30,
        session_expiry_s: int = 3600,
        max_inflight: int = 20,
        ca_file: Path | None = None,
        passwords: Mapping[str, str] | None = None,
        site: str = "bench",
        first_index: int = 0,
        resend_after_s: float = 60.0,
    ) -> None:
        if not node_ids:
            raise ValueError("a simulated fleet needs at least one node")
        if not profiles:
            raise ValueError("give at least one device profile")
        self.loop = asyncio.get_running_loop()
        self.topics = Topics(prefix)
        self.host, self.port = host, port
        self.interval_s = interval_s
        self.keepalive_s, self.session_expiry_s, self.max_inflight = keepalive_s, session_expiry_s, max_inflight
        self.tls = tls_context(ca_file) if ca_file is not None else None  # one context for every node
        self.passwords = passwords
        self.resend_after_s = resend_after_s  # fleet.node.NodeConfig.resend_after_s
        self.stopping = False
        self.errors: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (when the ack came, time.monotonic; latency)
        self._latency_count = 0
        # When telemetry started and stopped (time.monotonic): produced / that span is the rate the nodes
        # really offered, which a process short of CPU keeps below the nominal nodes / interval.
        self.telemetry_span: list[float] = []
        self._rng = random.Random(0)
        # Profiles are dealt by the node's number in the whole simulated fleet, not in this process.
        kinds = [profiles[(first_index + i) % len(profiles)] for i in range(len(node_ids))]
        self.nodes = [
            SimNode(self, node_id, kind, {"site": site, "class": kind})
            for node_id, kind in zip(node_ids, kinds, strict=True)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def sample_latency(self, at: float, seconds: float) -> None:
        """Reservoir sampling: a uniform sample of every ack latency, bounded in memory. ``at`` is on
        ``time.monotonic``, one clock for every process of the machine: a benchmark splits by phase."""
        self._latency_count += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append((at, seconds))
        elif (slot := self._rng.randrange(self._latency_count)) < LATENCY_SAMPLES:
            self.latencies[slot] = (at, seconds)

    async def connect(self, timeout_s: float, per_second: float = 500.0) -> None:
        """Connect every node, at most ``per_second`` new connections a second; wait for all CONNACKs."""
        self._tasks.append(asyncio.create_task(self._misc(), name="sim-misc"))
        for index, node in enumerate(self.nodes):
            node.connect()
            if index % max(1, int(per_second / 10)) == 0:
                await asyncio.sleep(0.1)  # pacing, not waiting for anything
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(node.connected.wait() for node in self.nodes))

    def start_telemetry(self) -> None:
        """Each node publishes telemetry every interval, at its own phase so the load is even."""
        self.telemetry_span = [time.monotonic()]
        for index, node in enumerate(self.nodes):
            phase = self.interval_s * index / len(self.nodes)
            self._tasks.append(asyncio.create_task(self._telemetry(node, phase), name=f"sim-telemetry-{index}"))

    async def _telemetry(self, node: SimNode, phase: float) -> None:
        next_at = self.loop.time() + phase
        while True:
            await asyncio.sleep(max(0.0, next_at - self.loop.time()))
            node.telemetry()
            next_at += self.interval_s

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            for node in self.nodes:
                node.client.loop_misc()

    async def stop_telemetry(self) -> None:
        telemetry = [task for task in self._tasks if task.get_name().startswith("sim-telemetry-")]
        for task in telemetry:
            task.cancel()
        await asyncio.gather(*telemetry, return_exceptions=True)
        self._tasks = [task for task in self._tasks if task not in telemetry]
        if len(self.telemetry_span) == 1:
            self.telemetry_span.append(time.monotonic())

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every produced seq is acknowledged; False if some are not within the time."""
        deadline = self.loop.time() + timeout_s
        while any(node.unacked for node in self.nodes):
            if self.loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)  # polling the nodes' own counters, with a deadline
        return True

    async def close(self) -> None:
        """Disconnect cleanly: each node publishes its death first, as a clean stop does."""
        self.stopping = True
        for node in self.nodes:
            if node.connected.is_set():
                death = NodeState(node=node.node_id, online=False, bd_seq=node.bd_seq, ts=time.time())
                node.client.publish(self.topics.state(node.node_id), encode(death), qos=1, retain=True)
                node.client.disconnect()
        # paho closes each socket once the broker has seen the DISCONNECT (on this loop); a socket still
        # open after a while (a broker gone away) is closed here, so none is left to the garbage collector.
        open_ones = [node.socket_closed.wait() for node in self.nodes if node.client.socket() is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*open_ones), CLOSE_TIMEOUT_S)
        for node in self.nodes:
            sock = node.client.socket()
            if sock is not None:
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
                sock.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def results(self) -> dict[str, Any]:
        nodes = self.nodes
        return {
            "nodes": len(nodes),
            "produced": {node.node_id: node.stats.produced for node in nodes},
            "unacked": sum(len(node.unacked) for node in nodes),
            "published_again": sum(node.stats.published_again for node in nodes),
            "disconnects": sum(node.stats.disconnects for node in nodes),
            "desired": sum(node.stats.desired for node in nodes),
            "ack_latency_s": sorted(self.latencies),  # [when, seconds]
            "telemetry_span": self.telemetry_span,  # [started, stopped] on time.monotonic
            "errors": self.errors[:20],
            "error_count": len(self.errors),
        }


def node_ids(count: int, offset: int = 0, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{offset + i:05d}" for i in range(count)]


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    fleet = SimFleet(
        node_ids(args.nodes, args.offset, args.id_prefix), args.profiles.split(","), host=args.host,
        port=args.port, prefix=args.prefix, interval_s=args.interval_s, first_index=args.offset,
        ca_file=args.ca_file, passwords=json.loads(args.passwords.read_text()) if args.passwords else None,
    )  # fmt: skip
    started = time.monotonic()
    await fleet.connect(args.connect_timeout_s)
    print(json.dumps({"ready": len(fleet.nodes), "connect_s": time.monotonic() - started}), flush=True)
    if args.start_on_stdin:  # a benchmark starts every process's telemetry at once, after the fleet registered
        await asyncio.to_thread(sys.stdin.readline)
    fleet.start_telemetry()
    await stop.wait()
    await fleet.stop_telemetry()
    drained = await fleet.drain(args.drain_s)
    results = {**fleet.results(), "drained": drained}
    await fleet.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True, help="simulated nodes in this process")
    parser.add_argument("--offset", type=int, default=0, help="number of the first node (ids are unique per run)")
    parser.add_argument("--id-prefix", default="sim", help="node ids are PREFIX-NNNNN")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="MQTT topic prefix")
    parser.add_argument("--interval-s", type=float, default=1.0, help="telemetry interval per node")
    parser.add_argument("--profiles", default="jetson-orin-nano-8gb,t4-16gb,a10-24gb",
                        help="device profiles, assigned round robin")  # fmt: skip
    parser.add_argument("--connect-timeout-s", type=float, default=120.0)
    parser.add_argument("--drain-s", type=float, default=60.0, help="how long to wait for the last acks")
    parser.add_argument(
        "--start-on-stdin",
        action="store_true",
        help="after connecting, wait for a line on standard input before telemetry starts",
    )
    parser.add_argument("--results", type=Path, help="write the results here (JSON) instead of to stdout")
    parser.add_argument("--ca-file", type=Path, help="the broker's CA: connect over TLS")
    parser.add_argument("--passwords", type=Path, help="JSON file: node id -> password (user name = node id)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    results = asyncio.run(_main(args))
    if args.results is None:
        print(json.dumps({"results": results}), flush=True)
    else:
        partial = args.results.with_name(args.results.name + ".partial")
        partial.write_text(json.dumps(results))
        partial.replace(args.results)  # the reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
