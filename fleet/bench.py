"""The fleet at scale: simulated nodes against one Mosquitto and one controller process, measured.

Parts, each a real process: Mosquitto (``fleet.broker``) as a site runs it (TLS, a password per node, the
fleet's ACLs: ``fleet.security``), ``zimage-edge fleet controller`` on a SQLite
store, and ``python -m fleet.simulate`` processes holding the simulated nodes (real MQTT connections,
the fleet protocol). Phases:

1. connect every node; wait until the controller has registered each one with its device;
2. steady telemetry (one message per node per interval) for ``duration_s``, after a warm-up: the
   controller's ingest rate from its store, its CPU (cores used) and RSS, the broker's too, and the
   ack latency the nodes see (publish -> the controller's ack watermark covers it: broker both ways,
   decode, SQL commit);
3. a rollout of a release to every node in waves, telemetry still flowing (the gates read it):
   the time from ``rollout create`` to ``succeeded``, each wave's end (the nodes "install" at once:
   downloads excluded);
4. stop the nodes; each waits for the acks of what it produced; then every seq produced must be in
   the store: loss (must be 0) and duplicates received (redeliveries, stored once).

Torch-free: the release's artifacts are built beforehand (``zimage-edge quantize``) or given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from fleet.broker import MosquittoBroker, free_port
from fleet.security import BrokerLimits, Credentials, init_pki, provision_controller, provision_nodes
from fleet.simulate import node_ids

TOKEN = "bench-token"
# The controller answers /healthz ~1 s after start (imports); a loaded 2-core machine can take longer.
START_TIMEOUT_S = 60.0
POLL_S = 0.25  # between looks at the controller's API and store while waiting


@dataclass(frozen=True)
class ScaleOptions:
    nodes: int = 1000
    processes: int = 4  # simulator processes; the nodes are split between them
    interval_s: float = 1.0  # telemetry per node
    warmup_s: float = 10.0
    duration_s: float = 180.0  # the measured window of steady telemetry
    waves: tuple[int | str, ...] = (1, "10%", "50%", "100%")
    bake_s: float = 5.0
    max_unavailable: int = 100
    rollout_timeout_s: float = 600.0
    connect_timeout_s: float = 120.0
    drain_s: float = 120.0
    profiles: tuple[str, ...] = ("jetson-orin-nano-8gb", "t4-16gb", "a10-24gb")


@dataclass
class Sampler:
    """CPU seconds and peak RSS of a process, sampled while the benchmark runs."""

    pid: int
    peak_rss: int = 0
    rss: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = psutil.Process(self.pid)

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> None:
        rss = int(self.process.memory_info().rss)
        self.rss.append(rss)
        self.peak_rss = max(self.peak_rss, rss)


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class StoreReader:
    """Read-only look at the controller's SQLite store (WAL: never blocks the controller's writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def telemetry_rows(self) -> int:
        return int(self._query("SELECT count(*) FROM telemetry WHERE kind = 'telemetry'")[0][0])

    def stored_per_node(self) -> dict[str, int]:
        rows = self._query("SELECT node, count(*) FROM telemetry WHERE kind = 'telemetry' GROUP BY node")
        return {node: int(count) for node, count in rows}

    def registered(self) -> int:
        return int(self._query("SELECT count(*) FROM nodes WHERE facts IS NOT NULL AND online")[0][0])


async def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, sqlite3.OperationalError, aiohttp.ClientError):
            if await predicate():
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def _controller(work: Path, broker: MosquittoBroker, site: Site) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    config = work / "controller.toml"
    config.touch(mode=0o600)  # it holds the controller's password
    config.write_text(
        f'controller_id = "bench"\ndatabase = "{work / "fleet.db"}"\nport = {port}\napi_token = "{TOKEN}"\n'
        + site.controller.mqtt_settings(broker.host, broker.port).toml()
    )
    env = {**os.environ, "ZIMAGE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zimage_edge.cli", "fleet", "controller", "--config", str(config), env=env,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def _simulators(
    options: ScaleOptions, broker: MosquittoBroker, work: Path, site: Site
) -> list[tuple[asyncio.subprocess.Process, Path]]:
    per = [options.nodes // options.processes + (i < options.nodes % options.processes)
           for i in range(options.processes)]  # fmt: skip
    procs, offset = [], 0
    for index, count in enumerate(c for c in per if c):
        results = work / f"simulator-{index}.json"
        command = [
            sys.executable, "-m", "fleet.simulate", "--nodes", str(count), "--offset", str(offset),
            "--port", str(broker.port), "--host", broker.host, "--interval-s", str(options.interval_s),
            "--profiles", ",".join(options.profiles), "--drain-s", str(options.drain_s), "--results", str(results),
            "--ca-file", str(site.controller.ca_file), "--passwords", str(site.passwords),
        ]  # fmt: skip
        procs.append((await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE), results))
        offset += count
    return procs


async def _json_line(proc: asyncio.subprocess.Process, key: str, timeout_s: float) -> Any:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout_s):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"simulator {proc.pid} exited (code {await proc.wait()}) before {key!r}")
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(line)
                if key in data:
                    return data[key]


async def run_scale(options: ScaleOptions, release_artifacts: Sequence[Path], work: Path | None = None) -> dict:
    """Run the phases of the module docstring; returns the results (JSON-ready)."""
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        site = _site(options, work)
        limits = BrokerLimits.for_fleet(options.nodes, telemetry_interval_s=options.interval_s)
        with MosquittoBroker(work / "broker", pki=site.pki, limits=limits) as broker:
            return await _run(options, release_artifacts, work, broker, site)


@dataclass(frozen=True)
class Site:
    """The broker's PKI and the credentials of the controller and of every simulated node."""

    pki: Path
    controller: Credentials
    passwords: Path  # JSON: node id -> password, read by the simulators


def _site(options: ScaleOptions, work: Path) -> Site:
    """TLS and ACLs on, as a real site: a CA, the controller's identity, every node provisioned."""
    pki = init_pki(work / "pki").root
    controller = provision_controller(pki, "bench-controller")
    nodes = provision_nodes(pki, node_ids(options.nodes))
    passwords = work / "passwords.json"
    passwords.write_text(json.dumps({c.identity: c.password.get_secret_value() for c in nodes if c.password}))
    passwords.chmod(0o600)
    return Site(pki, controller, passwords)


async def _run(
    options: ScaleOptions, artifacts: Sequence[Path], work: Path, broker: MosquittoBroker, site: Site
) -> dict:
    results: dict[str, Any] = {"options": {**asdict(options), "waves": list(options.waves)}}
    store = StoreReader(work / "fleet.db")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with _controller(work, broker, site) as (url, pid), aiohttp.ClientSession(headers=headers) as http:

        async def healthy() -> bool:
            async with http.get(f"{url}/healthz") as response:
                return response.status == 200 and (await response.json())["mqtt_connected"]

        await _wait(healthy, START_TIMEOUT_S, "the controller")
        # Unsigned is fine here: this measures the fleet; signatures are the distribution tests' subject.
        release = {"name": "bench", "artifacts": [str(a) for a in artifacts], "allow_unsigned": True}
        async with http.post(f"{url}/api/v1/releases", json=release) as response:
            response.raise_for_status()
        controller, mosquitto = Sampler(pid), Sampler(broker.pid or 0)
        started = time.monotonic()
        launched = await _simulators(options, broker, work, site)
        sims = [proc for proc, _ in launched]
        try:
            await asyncio.gather(*(_json_line(p, "ready", options.connect_timeout_s) for p in sims))

            async def registered() -> bool:
                return store.registered() >= options.nodes

            await _wait(registered, options.connect_timeout_s, f"{options.nodes} nodes registered")
            results["connect_s"] = time.monotonic() - started
            await asyncio.sleep(options.warmup_s)  # the measured window starts in steady state

            # Phase 2: steady telemetry.
            steady_from = time.monotonic()
            results["telemetry"] = await _steady(options, store, controller, mosquitto, sims)
            phases = {"steady": (steady_from, time.monotonic())}

            # Phase 3: a rollout to every node.
            rollout_from = time.monotonic()
            results["rollout"] = await _rollout(http, url, options)
            phases["rollout"] = (rollout_from, time.monotonic())
        finally:
            for proc in sims:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            codes = await asyncio.gather(*(asyncio.wait_for(p.wait(), options.drain_s + 60) for p in sims))
        if any(codes):
            raise RuntimeError(f"a simulator failed (exit codes {codes})")
        sims_out: list[dict[str, Any]] = [json.loads(path.read_text()) for _, path in launched]

        # Phase 4: every seq produced is stored once.
        produced: dict[str, int] = {}
        for part in sims_out:
            produced.update(part["produced"])
        total = sum(produced.values())

        async def all_stored() -> bool:
            return store.telemetry_rows() >= total

        with contextlib.suppress(TimeoutError):
            await _wait(all_stored, options.drain_s, "every produced seq stored")
        stored = store.stored_per_node()
        missing = {node: n - stored.get(node, 0) for node, n in produced.items() if stored.get(node, 0) < n}
        async with http.get(f"{url}/metrics") as response:
            metrics = _metric_values(await response.text())
        samples = [(at, seconds) for part in sims_out for at, seconds in part["ack_latency_s"]]
        results["delivery"] = {
            "produced": total,
            "stored": sum(stored.values()),
            "lost": sum(missing.values()),
            "nodes_missing_seqs": len(missing),
            "received_by_controller": metrics.get("zimage_fleet_ingested_total{kind=\"telemetry\"}"),
            "duplicates_received": metrics.get("zimage_fleet_duplicates_total"),
            "published_again_by_nodes": sum(p["published_again"] for p in sims_out),
            "disconnects": sum(p["disconnects"] for p in sims_out),
            "unacked_at_stop": sum(p["unacked"] for p in sims_out),
            "ack_latency_ms": {
                name: _latency([seconds for at, seconds in samples if start <= at <= end])
                for name, (start, end) in phases.items()
            },
            "simulator_errors": sum(p["error_count"] for p in sims_out),
            "first_errors": [e for p in sims_out for e in p["errors"]][:5],
        }  # fmt: skip
    results["machine"] = {"cpus": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30}
    return results


async def _steady(
    options: ScaleOptions,
    store: StoreReader,
    controller: Sampler,
    mosquitto: Sampler,
    sims: Sequence[asyncio.subprocess.Process],
) -> dict[str, Any]:
    """Steady telemetry for ``duration_s``: what was stored, and what each process used meanwhile."""
    samplers = [controller, mosquitto, *(Sampler(p.pid) for p in sims)]
    rows0, cpu0 = store.telemetry_rows(), [s.cpu_s() for s in samplers]
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < options.duration_s:
        for sampler in samplers:
            sampler.sample()
        await asyncio.sleep(min(1.0, options.duration_s - elapsed))
    window = time.monotonic() - t0
    rows1, cpu1 = store.telemetry_rows(), [s.cpu_s() for s in samplers]
    cores = [(b - a) / window for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "window_s": window,
        "offered_per_s": options.nodes / options.interval_s,
        "stored_per_s": (rows1 - rows0) / window,
        "controller_cores": cores[0],
        "controller_rss_mib": {
            "peak": controller.peak_rss / 2**20,
            "median": statistics.median(controller.rss) / 2**20,
        },
        "broker_cores": cores[1],
        "broker_rss_mib": mosquitto.peak_rss / 2**20,
        "simulators_cores": sum(cores[2:]),
    }


def _latency(seconds: Sequence[float]) -> dict[str, float | None]:
    return {"samples": len(seconds), "p50": _ms(percentile(seconds, 0.5)), "p99": _ms(percentile(seconds, 0.99)),
            "max": _ms(max(seconds, default=None))}  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


async def _rollout(http: aiohttp.ClientSession, url: str, options: ScaleOptions) -> dict[str, Any]:
    body = {"release": "bench", "waves": list(options.waves), "bake_s": options.bake_s, "max_error_rate": 0.05,
            "max_unavailable": options.max_unavailable, "node_timeout_s": options.rollout_timeout_s}  # fmt: skip
    started = time.monotonic()
    async with http.post(f"{url}/api/v1/rollouts", json=body) as response:
        response.raise_for_status()
        state = await response.json()
    created_s = time.monotonic() - started
    waves: list[float] = []
    deadline = started + options.rollout_timeout_s
    while state["status"] in ("running", "paused"):
        if time.monotonic() > deadline:
            phases: dict[str, int] = {}
            for node in state["nodes"]:
                phases[node["phase"]] = phases.get(node["phase"], 0) + 1
            raise TimeoutError(
                f"the rollout did not converge within {options.rollout_timeout_s:g} s: wave {state['wave']}, "
                f"nodes by phase {phases}"
            )
        await asyncio.sleep(POLL_S)
        async with http.get(f"{url}/api/v1/rollouts/{state['id']}") as response:
            state = await response.json()
        while len(waves) < min(state["wave"], len(state["bounds"])):
            waves.append(time.monotonic() - started)
    converged = time.monotonic() - started
    variants: dict[str, int] = {}
    for node in state["nodes"]:
        name = (node.get("target") or {}).get("variant", "none")
        variants[name] = variants.get(name, 0) + 1
    return {
        "status": state["status"], "converge_s": converged, "create_s": created_s, "wave_ends_s": waves,
        "wave_bounds": state["bounds"],
        "nodes": len(state["nodes"]), "variants": variants, "bake_s": options.bake_s,
        "bake_floor_s": options.bake_s * len(state["bounds"]),
    }  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    o, t, r, d = results["options"], results["telemetry"], results["rollout"], results["delivery"]
    steady, during = d["ack_latency_ms"]["steady"], d["ack_latency_ms"]["rollout"]
    lines = [
        f"# Fleet at scale: {o['nodes']} simulated nodes, one Mosquitto (TLS, ACLs), one controller (SQLite)",
        "",
        f"{results['machine']['cpus']} CPUs shared by the broker, the controller and {o['processes']} simulator "
        f"processes. Telemetry every {o['interval_s']:g} s per node; measured over {t['window_s']:.0f} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| nodes connected and registered | {o['nodes']} in {results['connect_s']:.1f} s |",
        f"| telemetry offered / stored | {t['offered_per_s']:.0f} / {t['stored_per_s']:.0f} msg/s |",
        f"| controller CPU | {t['controller_cores']:.2f} cores |",
        f"| controller RSS (median / peak) | {t['controller_rss_mib']['median']:.0f} / "
        f"{t['controller_rss_mib']['peak']:.0f} MiB |",
        f"| broker CPU, RSS | {t['broker_cores']:.2f} cores, {t['broker_rss_mib']:.0f} MiB |",
        f"| simulators CPU | {t['simulators_cores']:.2f} cores |",
        f"| ack latency p50 / p99 / max, steady | {_fmt(steady['p50'])} / {_fmt(steady['p99'])} / "
        f"{_fmt(steady['max'])} ms |",
        f"| ack latency p50 / p99 / max, during the rollout | {_fmt(during['p50'])} / {_fmt(during['p99'])} / "
        f"{_fmt(during['max'])} ms |",
        f"| produced / stored / lost | {d['produced']} / {d['stored']} / **{d['lost']}** |",
        f"| duplicates received (stored once) | {_fmt(d['duplicates_received'], 0)} |",
        f"| node disconnects | {d['disconnects']} |",
        f"| rollout to {r['nodes']} nodes ({', '.join(map(str, o['waves']))}; bake {r['bake_s']:g} s; "
        f"max unavailable {o['max_unavailable']}) | {r['status']} in **{r['converge_s']:.1f} s** "
        f"(bake floor {r['bake_floor_s']:g} s) |",
        f"| wave ends | {', '.join(f'{w:.1f}' for w in r['wave_ends_s'])} s |",
        f"| variants chosen | {', '.join(f'{k}: {v}' for k, v in sorted(r['variants'].items()))} |",
    ]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
