"""The fleet at scale: simulated nodes against one Mosquitto and one controller process, measured.

Parts, each a real process: Mosquitto (``fleet.broker``) as a site runs it (TLS, a password per node, the
fleet's ACLs: ``fleet.security``), ``zimage-edge fleet controller`` on a SQLite store or on PostgreSQL
(``fleet.postgres``, durable settings: fsync and synchronous commit on, as SQLite's FULL), one
controller or several replicas sharing the ingest (``replica_group``), and ``python -m fleet.simulate``
processes holding the simulated nodes (real MQTT connections, the fleet protocol). Phases:

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

``run_load_sweep`` runs phases 1, 2 and 4 at several offered loads (a fresh site each): ingest lag
against offered load, and the highest load sustained (``sustained``).

Torch-free: the release's artifacts are built beforehand (``zimage-edge quantize``) or given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from fleet.broker import MosquittoBroker, free_port
from fleet.postgres import PostgresServer
from fleet.security import BrokerLimits, Credentials, init_pki, provision_controller, provision_nodes
from fleet.simulate import node_ids

TOKEN = "bench-token"
# The controller answers /healthz ~1 s after start (imports); a loaded 2-core machine can take longer.
START_TIMEOUT_S = 60.0
POLL_S = 0.25  # between looks at the controller's API and store while waiting
DATABASES = ("sqlite", "postgresql")
# PostgreSQL as a site runs it: every commit durable, as SQLite's synchronous=FULL is for the controller's
# store (fleet.postgres turns these off for its throwaway test clusters).
DURABLE_POSTGRES = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
# A load is sustained when the controller stores what the nodes offer (within this share: the window's
# edges), loses nothing, and its lag stays bounded (p99 under this).
SUSTAINED_SHARE = 0.98
SUSTAINED_LAG_P99_MS = 2000.0


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
    database: str = "sqlite"  # or "postgresql": a cluster of its own for the run
    replicas: int = 1  # controller processes; more than one share the ingest and take turns leading
    rollout: bool = True  # phase 3 (a load sweep measures telemetry alone)

    def __post_init__(self) -> None:
        if self.database not in DATABASES:
            raise ValueError(f"database is one of {', '.join(DATABASES)}, not {self.database!r}")
        if self.replicas < 1 or self.nodes < 1 or self.processes < 1 or self.interval_s <= 0:
            raise ValueError("replicas, nodes and processes must be at least 1, the interval positive")

    @property
    def offered_per_s(self) -> float:
        return self.nodes / self.interval_s


@dataclass
class Sampler:
    """CPU seconds and peak RSS of a process (with ``tree``: and of its children, as PostgreSQL's
    backends), sampled while the benchmark runs."""

    pid: int
    tree: bool = False
    peak_rss: int = 0
    rss: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = psutil.Process(self.pid)

    def _processes(self) -> list[psutil.Process]:
        return [self.process, *self.process.children(recursive=True)] if self.tree else [self.process]

    def cpu_s(self) -> float:
        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def sample(self) -> None:
        rss = 0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += int(process.memory_info().rss)
        self.rss.append(rss)
        self.peak_rss = max(self.peak_rss, rss)


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class StoreReader:
    """Read-only look at the controller's store (SQLite in WAL mode, or PostgreSQL: never blocks the
    controller's writes)."""

    def __init__(self, database: str) -> None:
        url = f"sqlite:///file:{database}?mode=ro&uri=true" if "://" not in database else database
        self.engine = create_engine(url, poolclass=NullPool)

    def _query(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)).all())

    def telemetry_rows(self) -> int:
        return int(self._query("SELECT count(*) FROM telemetry WHERE kind = 'telemetry'")[0][0])

    def stored_per_node(self) -> dict[str, int]:
        rows = self._query("SELECT node, count(*) FROM telemetry WHERE kind = 'telemetry' GROUP BY node")
        return {node: int(count) for node, count in rows}

    def registered(self) -> int:
        return int(self._query("SELECT count(*) FROM nodes WHERE facts IS NOT NULL AND online")[0][0])

    def close(self) -> None:
        self.engine.dispose()


async def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, DBAPIError, aiohttp.ClientError):
            if await predicate():
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class ControllerProcess:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def _controllers(options: ScaleOptions, parts: Parts) -> AsyncIterator[list[ControllerProcess]]:
    """``options.replicas`` controller processes on one database; replicas share one group."""
    procs: list[asyncio.subprocess.Process] = []
    started: list[ControllerProcess] = []
    env = {**os.environ, "ZIMAGE_LOG_LEVEL": "WARNING"}
    try:
        for index in range(options.replicas):
            port = free_port()
            config = parts.work / f"controller-{index}.toml"
            config.touch(mode=0o600)  # it holds the controller's password
            group = 'replica_group = "bench"\n' if options.replicas > 1 else ""
            config.write_text(
                f'controller_id = "bench-{index}"\ndatabase = "{parts.database}"\nport = {port}\n'
                f'api_token = "{TOKEN}"\n{group}'
                + parts.site.controllers[index].mqtt_settings(parts.broker.host, parts.broker.port).toml()
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "zimage_edge.cli", "fleet", "controller", "--config", str(config), env=env,
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(proc)
            started.append(ControllerProcess(f"http://127.0.0.1:{port}", proc.pid))
        yield started
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in procs))


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
            "--ca-file", str(site.controllers[0].ca_file), "--passwords", str(site.passwords), "--start-on-stdin",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        procs.append((proc, results))
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
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, contextlib.ExitStack() as stack:
        work = work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        site = _site(options, work)
        limits = BrokerLimits.for_fleet(
            options.nodes, controllers=max(2, options.replicas), telemetry_interval_s=options.interval_s
        )
        database, database_pid = str(work / "fleet.db"), None
        if options.database == "postgresql":
            server = stack.enter_context(PostgresServer(settings=DURABLE_POSTGRES))  # a directory of its own
            database, database_pid = server.create_database("fleet"), server.pid
        broker = stack.enter_context(MosquittoBroker(work / "broker", pki=site.pki, limits=limits))
        return await _run(options, release_artifacts, Parts(work, broker, site, database, database_pid))


async def run_load_sweep(
    points: Sequence[ScaleOptions], release_artifacts: Sequence[Path], on_point: Any = None
) -> list[dict[str, Any]]:
    """``run_scale`` at each of ``points`` in turn, each on a fresh site; ``on_point(results)`` after each
    (a long sweep keeps what it measured so far)."""
    runs = []
    for options in points:
        runs.append(await run_scale(options, release_artifacts))
        if on_point is not None:
            on_point(runs[-1])
    return runs


def sustained(run: dict[str, Any]) -> bool:
    """Did the controller keep up with this run's load: stored what was offered, lost nothing, lag bounded?"""
    telemetry, delivery = run["telemetry"], run["delivery"]
    lag = delivery["ack_latency_ms"]["steady"]["p99"]
    return (
        delivery["lost"] == 0
        and telemetry["stored_per_s"] >= SUSTAINED_SHARE * telemetry["achieved_offered_per_s"]
        and lag is not None
        and lag <= SUSTAINED_LAG_P99_MS
    )


@dataclass(frozen=True)
class Site:
    """The broker's PKI and the credentials of the controller and of every simulated node."""

    pki: Path
    controllers: list[Credentials]  # one identity per controller replica
    passwords: Path  # JSON: node id -> password, read by the simulators


def _site(options: ScaleOptions, work: Path) -> Site:
    """TLS and ACLs on, as a real site: a CA, each controller's identity, every node provisioned."""
    pki = init_pki(work / "pki").root
    controllers = [provision_controller(pki, f"bench-controller-{i}") for i in range(options.replicas)]
    nodes = provision_nodes(pki, node_ids(options.nodes))
    passwords = work / "passwords.json"
    passwords.write_text(json.dumps({c.identity: c.password.get_secret_value() for c in nodes if c.password}))
    passwords.chmod(0o600)
    return Site(pki, controllers, passwords)


@dataclass(frozen=True)
class Parts:
    """What a run's processes are started on."""

    work: Path
    broker: MosquittoBroker
    site: Site
    database: str  # a SQLite file path or a PostgreSQL URL
    database_pid: int | None  # PostgreSQL's postmaster


async def _run(options: ScaleOptions, artifacts: Sequence[Path], parts: Parts) -> dict:
    results: dict[str, Any] = {"options": {**asdict(options), "waves": list(options.waves)}}
    store = StoreReader(parts.database)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        _controllers(options, parts) as controllers,
        aiohttp.ClientSession(headers=headers) as http,
    ):
        url = controllers[0].url

        async def healthy() -> bool:
            for controller in controllers:
                async with http.get(f"{controller.url}/healthz") as response:
                    if response.status != 200 or not (await response.json())["mqtt_connected"]:
                        return False
            return True

        await _wait(healthy, START_TIMEOUT_S, "the controllers")
        # Unsigned is fine here: this measures the fleet; signatures are the distribution tests' subject.
        release = {"name": "bench", "artifacts": [str(a) for a in artifacts], "allow_unsigned": True}
        async with http.post(f"{url}/api/v1/releases", json=release) as response:
            response.raise_for_status()
        samplers = {f"controller-{i}": Sampler(c.pid) for i, c in enumerate(controllers)}
        samplers["broker"] = Sampler(parts.broker.pid or 0)
        if parts.database_pid is not None:
            samplers["postgresql"] = Sampler(parts.database_pid, tree=True)
        started = time.monotonic()
        launched = await _simulators(options, parts.broker, parts.work, parts.site)
        sims = [proc for proc, _ in launched]
        try:
            await asyncio.gather(*(_json_line(p, "ready", options.connect_timeout_s) for p in sims))

            async def registered() -> bool:
                return store.registered() >= options.nodes

            await _wait(registered, options.connect_timeout_s, f"{options.nodes} nodes registered")
            results["connect_s"] = time.monotonic() - started
            for proc in sims:  # telemetry starts everywhere at once, on a registered fleet
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            await asyncio.sleep(options.warmup_s)  # the measured window starts in steady state

            # Phase 2: steady telemetry.
            steady_from = time.monotonic()
            results["telemetry"] = await _steady(options, store, samplers, sims)
            phases = {"steady": (steady_from, time.monotonic())}

            # Phase 3: a rollout to every node.
            if options.rollout:
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
        results["delivery"] = await _delivery(
            options, store, http=http, controllers=controllers, sims_out=sims_out, phases=phases
        )
        produced = results["delivery"]["produced"]
        spans = [part["telemetry_span"][1] - part["telemetry_span"][0] for part in sims_out]
        results["telemetry"]["achieved_offered_per_s"] = produced / statistics.mean(spans)
    store.close()
    results["machine"] = {"cpus": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30}
    return results


async def _delivery(
    options: ScaleOptions,
    store: StoreReader,
    *,
    http: aiohttp.ClientSession,
    controllers: Sequence[ControllerProcess],
    sims_out: Sequence[dict[str, Any]],
    phases: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    """Every seq the nodes produced against the store (after the drain), and what the controllers counted."""
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
    per_replica = []
    for controller in controllers:
        async with http.get(f"{controller.url}/metrics") as response:
            per_replica.append(_metric_values(await response.text()))
    ingested = 'zimage_fleet_ingested_total{kind="telemetry"}'
    samples = [(at, seconds) for part in sims_out for at, seconds in part["ack_latency_s"]]
    return {
        "produced": total,
        "stored": sum(stored.values()),
        "lost": sum(missing.values()),
        "nodes_missing_seqs": len(missing),
        "received_by_controller": sum(m.get(ingested, 0.0) for m in per_replica),
        "received_per_replica": [m.get(ingested) for m in per_replica],
        "duplicates_received": sum(m.get("zimage_fleet_duplicates_total", 0.0) for m in per_replica),
        "published_again_by_nodes": sum(p["published_again"] for p in sims_out),
        "disconnects": sum(p["disconnects"] for p in sims_out),
        "unacked_at_stop": sum(p["unacked"] for p in sims_out),
        "ack_latency_ms": {
            name: _latency([seconds for at, seconds in samples if start <= at <= end])
            for name, (start, end) in phases.items()
        },
        "simulator_errors": sum(p["error_count"] for p in sims_out),
        "first_errors": [e for p in sims_out for e in p["errors"]][:5],
    }


async def _steady(
    options: ScaleOptions,
    store: StoreReader,
    samplers: dict[str, Sampler],
    sims: Sequence[asyncio.subprocess.Process],
) -> dict[str, Any]:
    """Steady telemetry for ``duration_s``: what was stored, and what each process used meanwhile."""
    everything = {**samplers, **{f"simulator-{i}": Sampler(p.pid) for i, p in enumerate(sims)}}
    rows0, cpu0 = store.telemetry_rows(), {name: s.cpu_s() for name, s in everything.items()}
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < options.duration_s:
        for sampler in everything.values():
            sampler.sample()
        await asyncio.sleep(min(1.0, options.duration_s - elapsed))
    window = time.monotonic() - t0
    rows1 = store.telemetry_rows()
    cores = {name: (s.cpu_s() - cpu0[name]) / window for name, s in everything.items()}
    controllers = [name for name in samplers if name.startswith("controller-")]
    return {
        "window_s": window,
        "offered_per_s": options.offered_per_s,
        "stored_per_s": (rows1 - rows0) / window,
        "cores": cores,  # per process (PostgreSQL: the server and its backends)
        "rss_mib": {
            name: {"peak": s.peak_rss / 2**20, "median": statistics.median(s.rss) / 2**20}
            for name, s in everything.items()
        },
        "controller_cores": sum(cores[name] for name in controllers),
        "controller_rss_mib": {
            "peak": max(everything[name].peak_rss for name in controllers) / 2**20,
            "median": max(statistics.median(everything[name].rss) for name in controllers) / 2**20,
        },
        "broker_cores": cores["broker"],
        "broker_rss_mib": samplers["broker"].peak_rss / 2**20,
        "database_cores": cores.get("postgresql"),
        "simulators_cores": sum(v for name, v in cores.items() if name.startswith("simulator-")),
    }


def _latency(seconds: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"samples": len(seconds), "p50": _ms(percentile(ordered, 0.5)), "p99": _ms(percentile(ordered, 0.99)),
            "max": _ms(max(ordered, default=None)),
            # Every percentile, 0..100: the distribution, for a plot.
            "percentiles_ms": [_ms(percentile(ordered, q / 100)) for q in range(101)] if ordered else []}  # fmt: skip


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


def configuration(run: dict[str, Any]) -> str:
    """A run's setup in words: the database and how many controllers."""
    o = run["options"]
    controllers = "1 controller" if o["replicas"] == 1 else f"{o['replicas']} controller replicas"
    return f"{'SQLite' if o['database'] == 'sqlite' else 'PostgreSQL'}, {controllers}"


def load_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """The sweep as a table, one row per run, and the highest sustained load of each configuration."""
    lines = [
        "# Fleet ingest under load: TLS, a password per node, the fleet's ACLs",
        "",
        f"{runs[0]['machine']['cpus']} CPUs shared by everything below: the broker, the controller(s), the "
        "database and the simulator processes compete for the same cores, so each one's CPU is given (cores "
        "used over the measured window). *Offered* is what the nodes really published (a simulator short of "
        "CPU publishes less than nodes / interval); *lag* is publish -> stored and acknowledged, as the "
        f"nodes see it. *Missing*: produced but not stored when the drain after the run ended "
        f"({runs[0]['options']['drain_s']:g} s); "
        "past the controller's capacity that is the backlog still queued at the broker, not necessarily "
        f"dropped. Sustained: stored >= {SUSTAINED_SHARE:.0%} of offered, nothing missing, lag p99 <= "
        f"{SUSTAINED_LAG_P99_MS:.0f} ms.",
        "",
        "| setup | nodes | offered (nominal) msg/s | stored msg/s | missing | dup. | lag p50 / p99 ms "
        "| controller cores | controller RSS MiB | broker cores | database cores | simulators cores | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        o, t, d = run["options"], run["telemetry"], run["delivery"]
        lag = d["ack_latency_ms"]["steady"]
        per_replica = [t["cores"][name] for name in sorted(t["cores"]) if name.startswith("controller-")]
        cores = " + ".join(f"{c:.2f}" for c in per_replica)
        lines.append(
            f"| {configuration(run)} | {o['nodes']} | {t['achieved_offered_per_s']:.0f} ({t['offered_per_s']:.0f}) "
            f"| {t['stored_per_s']:.0f} | {d['lost']} | {_fmt(d['duplicates_received'], 0)} "
            f"| {_fmt(lag['p50'], 0)} / {_fmt(lag['p99'], 0)} | {cores} | {t['controller_rss_mib']['peak']:.0f} "
            f"| {t['broker_cores']:.2f} | {_fmt(t['database_cores'], 2)} | {t['simulators_cores']:.2f} "
            f"| {'yes' if sustained(run) else '**no**'} |"
        )
    lines += ["", "Highest load sustained, by setup:", ""]
    for setup, best in max_sustained(runs).items():
        lines.append(f"- {setup}: " + (f"{best:.0f} msg/s" if best is not None else "none of the loads tried"))
    return "\n".join(lines) + "\n"


def max_sustained(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Per setup, the highest offered load (as published) that was sustained; None if none was."""
    best: dict[str, float | None] = {}
    for run in runs:
        setup = configuration(run)
        best.setdefault(setup, None)
        if sustained(run):
            rate = run["telemetry"]["achieved_offered_per_s"]
            best[setup] = max(rate, best[setup] or 0.0)
    return best


def plot_load(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ingest lag (p50 and p99) and stored rate against offered load, a line per setup: ``path`` (PNG)."""
    import matplotlib  # plotting only, imported here: the controller and the node never load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        setups.setdefault(configuration(run), []).append(run)
    figure, (lag_axis, rate_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setup, unordered in setups.items():
        group = sorted(unordered, key=lambda r: r["telemetry"]["achieved_offered_per_s"])
        offered = [r["telemetry"]["achieved_offered_per_s"] for r in group]
        p99 = [r["delivery"]["ack_latency_ms"]["steady"]["p99"] for r in group]
        p50 = [r["delivery"]["ack_latency_ms"]["steady"]["p50"] for r in group]
        (line,) = lag_axis.plot(offered, p99, marker="o", label=f"{setup}: p99")
        lag_axis.plot(offered, p50, marker=".", linestyle="--", color=line.get_color(), label=f"{setup}: p50")
        rate_axis.plot(offered, [r["telemetry"]["stored_per_s"] for r in group], marker="o", label=setup)
        for run, x, y in zip(group, offered, p99, strict=True):
            if y is not None:
                lag_axis.annotate(f"{run['options']['nodes']}", (x, y), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7)  # fmt: skip
    lag_axis.axhline(SUSTAINED_LAG_P99_MS, color="grey", linewidth=0.8, linestyle=":")
    lag_axis.set(xlabel="offered telemetry (msg/s, as published)", ylabel="ingest lag (ms)", yscale="log",
                 title="Lag, publish -> stored and acked (labels: nodes)")  # fmt: skip
    top = max(r["telemetry"]["achieved_offered_per_s"] for r in runs)
    rate_axis.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle=":", label="stored = offered")
    rate_axis.set(xlabel="offered telemetry (msg/s, as published)", ylabel="stored (msg/s)",
                  title="Ingest rate")  # fmt: skip
    for axis in (lag_axis, rate_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_scale(results: dict[str, Any], path: Path) -> Path:
    """A scale run: the distribution of the ack latency (steady, during the rollout), and the rollout's
    progress (nodes through their wave against time): ``path`` (PNG)."""
    import matplotlib  # plotting only, imported here: the controller and the node never load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lag_axis, wave_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for phase, latency in results["delivery"]["ack_latency_ms"].items():
        values = latency.get("percentiles_ms") or []
        if values:
            lag_axis.plot(
                values, [q / 100 for q in range(len(values))], label=f"{phase} ({latency['samples']} samples)"
            )
    lag_axis.set(xscale="log", xlabel="ack latency (ms): publish -> stored and acknowledged", ylabel="fraction",
                 title=f"{results['options']['nodes']} nodes")  # fmt: skip
    lag_axis.grid(alpha=0.3)
    lag_axis.legend(fontsize=8)
    rollout = results.get("rollout")
    if rollout:
        ends, bounds = rollout["wave_ends_s"], rollout["wave_bounds"]
        wave_axis.step([0.0, *ends], [0, *bounds[: len(ends)]], where="post", marker="o")
        wave_axis.set(xlabel="seconds since the rollout was created", ylabel="nodes through their wave",
                      title=f"rollout: {rollout['status']} in {rollout['converge_s']:.1f} s "
                      f"(bake floor {rollout['bake_floor_s']:g} s)")  # fmt: skip
        wave_axis.grid(alpha=0.3)
    else:
        wave_axis.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
