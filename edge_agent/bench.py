"""Agent benchmarks: its own overhead on the no-op model, and its load curve on a real model.

The agent always runs as its own ``zimage-edge serve`` process, as it does on a node: torch's OpenMP
workers of one thread slow a second thread computing in the same process on small machines, which
would charge the agent for the benchmark's own work.

1. ``overhead_benchmark``: the agent serving the no-op model (``edge_agent.noop``), pinned to one
   core, the client pinned to another. Each request takes the whole HTTP path; only the model's work
   is gone, so the latency is the agent's own cost (plus the client's and the loopback's, which the
   "floor" measures: a bare aiohttp server answering a body of the same size from the same core).
   Sequential requests give p50/p99 and requests/s; then requests/s at each concurrency level.
   Target: p50 <= 1 ms.
2. ``load_benchmark``: a real model, called directly (in this process) and through the agent at each
   concurrency level: latency p50/p99 and images/s against concurrency (micro-batching), and the
   overhead at concurrency 1 against the direct call.

Each writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (latency and throughput against concurrency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

OVERHEAD_NAME = "agent-overhead"
LOAD_NAME = "agent-load"
TARGET_P50_MS = 1.0  # the compass target for the agent's own overhead
# Loading a model and warming it take seconds on CPU (the no-op model: well under one); this bounds a hang.
START_TIMEOUT_S = 120.0
# How often readiness is asked for while the agent loads: a few polls for the no-op model, cheap otherwise.
READY_POLL_S = 0.02
# After SIGTERM an idle agent exits at once; this bounds a drain that does not end.
STOP_TIMEOUT_S = 30.0
PROMPT = "a red circle on a blue background"
# The settings both benchmarks run the agent with: no result cache (every request reaches the model
# thread), warnings only (an access-log line per request would be measured too).
AGENT_ENV = {"ZIMAGE_CACHE__MAX_BYTES": "0", "ZIMAGE_LOG_LEVEL": "WARNING"}


# --- measuring ---------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_summary(seconds: Sequence[float], wall_s: float) -> dict[str, float]:
    """p50/p99/mean in milliseconds and requests per second over ``wall_s``."""
    ms = 1000.0
    return {
        "requests": len(seconds),
        "p50_ms": pct(seconds, 0.5) * ms,
        "p99_ms": pct(seconds, 0.99) * ms,
        "mean_ms": sum(seconds) / len(seconds) * ms,
        "requests_per_sec": len(seconds) / wall_s,
    }


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread ``pid`` has now (threads it starts later inherit from their parent thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), cpus)


@contextlib.asynccontextmanager
async def agent_process(
    model: str, env: Mapping[str, str], *, cpus: set[int] | None = None, start_timeout_s: float = START_TIMEOUT_S
) -> AsyncIterator[str]:
    """A ``zimage-edge serve`` process on a free loopback port with ``env`` (and pinned to ``cpus``);
    yields its base URL once ready (the model loads after the port opens), stops it with SIGTERM."""
    command = ["-m", "zimage_edge.cli", "serve", "--model", model, "--port", "0"]
    async with _process(command, env, cpus, start_timeout_s) as base:
        yield base


@contextlib.asynccontextmanager
async def _process(
    args: Sequence[str], env: Mapping[str, str], cpus: set[int] | None, start_timeout_s: float
) -> AsyncIterator[str]:
    """A Python process that prints ``listening on URL`` and then answers ``/readyz``; yields URL."""
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE, env=dict(env))
    try:
        if cpus is not None:
            pin_process(proc.pid, cpus)  # before the interpreter starts its threads
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), start_timeout_s)).decode().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the process did not start (exit {await proc.wait()}): {line!r}")
        base = line.rsplit(" ", 1)[1]
        await asyncio.wait_for(_until_ready(base), start_timeout_s)
        if cpus is not None:
            pin_process(proc.pid, cpus)  # and every thread it has started meanwhile
        yield base
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(READY_POLL_S)


async def drive(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[dict[str, Any]], concurrency: int
) -> tuple[list[float], float]:
    """Send ``bodies`` with ``concurrency`` clients, each taking the next body as it finishes one;
    returns each request's seconds (sending to the last byte read) and the wall time of them all."""
    latencies: list[float] = []
    queue = iter(bodies)

    async def client() -> None:
        for body in queue:
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {data[:300]!r}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


@contextlib.contextmanager
def pinned_here(cpus: set[int] | None) -> Any:
    """Pin this thread (the client's event loop) to ``cpus`` for the block."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cpus(agent_cpu: int | None, client_cpu: int | None) -> tuple[set[int], set[int]]:
    """One core for the agent, another for the client (the same one when this process has only one)."""
    allowed = sorted(os.sched_getaffinity(0))
    agent = agent_cpu if agent_cpu is not None else allowed[0]
    client = client_cpu if client_cpu is not None else next((c for c in allowed if c != agent), agent)
    return {agent}, {client}


def _machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


# --- 1. overhead on the no-op model ------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadConfig:
    model: str = "noop:64"
    requests: int = 2000  # sequential, after the warm-up; also per concurrency level
    warmup: int = 200
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    size: int = 64
    agent_cpu: int | None = None  # default: the first CPU this process may use
    client_cpu: int | None = None  # default: another one
    floor: bool = True  # also measure a bare aiohttp server (the HTTP floor)
    # Requests carry this API key (the agent is told its hash): auth is on, as on any site. None: off.
    api_key: str | None = "benchmark-key"
    # Micro-batching stays on (max_batch 4) with no window: a lone request leaves at once.
    agent_env: Mapping[str, str] = field(
        default_factory=lambda: {**AGENT_ENV, "ZIMAGE_QUEUE__BATCH_WINDOW_MS": "0", "ZIMAGE_CPU__THREADS": "1"}
    )


def overhead_body(size: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "width": size, "height": size, "steps": 1, "seed": 1}


def _headers(config: OverheadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _measure_server(
    base: str, path: str, config: OverheadConfig, client_cpus: set[int]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sequential then concurrent requests against one server: the summary and one row per level."""
    url = f"{base}{path}"
    body = overhead_body(config.size)
    with pinned_here(client_cpus):
        # One connection per client, kept alive, as a load balancer or SDK holds them.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=_headers(config)) as session:
            await drive(session, url, [body] * config.warmup, 1)
            sequential = latency_summary(*await drive(session, url, [body] * config.requests, 1))
            levels = []
            for level in config.concurrency:
                await drive(session, url, [body] * max(config.warmup, level), level)
                row = latency_summary(*await drive(session, url, [body] * config.requests, level))
                levels.append({"concurrency": level, **row})
    return sequential, levels


async def overhead_benchmark(config: OverheadConfig) -> dict[str, Any]:
    """The agent on the no-op model, one core for it and another for the client."""
    from edge_agent.settings import ApiKey

    agent_cpus, client_cpus = split_cpus(config.agent_cpu, config.client_cpu)
    env = {**os.environ, **config.agent_env}
    if config.api_key:
        env["ZIMAGE_API_KEYS"] = json.dumps([{"name": "benchmark", "sha256": ApiKey.hash(config.api_key)}])
    async with agent_process(config.model, env, cpus=agent_cpus) as base:
        async with aiohttp.ClientSession(headers=_headers(config)) as session:
            async with session.get(f"{base}/v1/models") as response:
                entry = (await response.json())["data"][0]
            if not entry.get("benchmark_only"):
                raise RuntimeError(f"{config.model} is not the no-op model: the overhead would include model work")
            async with session.post(f"{base}/v1/generate", json=overhead_body(config.size)) as response:
                answer_bytes = len(await response.read())
        sequential, levels = await _measure_server(base, "/v1/generate", config, client_cpus)
    report: dict[str, Any] = {
        "benchmark": OVERHEAD_NAME,
        "model": config.model,
        "api": "POST /v1/generate, native JSON answer (PNG as base64)",
        "request": overhead_body(config.size),
        "agent_cpus": sorted(agent_cpus),
        "client_cpus": sorted(client_cpus),
        "pinned_apart": agent_cpus != client_cpus,
        "agent_env": dict(config.agent_env),
        "api_key": bool(config.api_key),
        "warmup": config.warmup,
        "answer_bytes": answer_bytes,
        "sequential": sequential,
        "concurrency": levels,
        "target_p50_ms": TARGET_P50_MS,
        "target_met": sequential["p50_ms"] <= TARGET_P50_MS,
        "machine": _machine(),
    }
    if config.floor:
        async with _floor_process(env, agent_cpus, answer_bytes) as floor_base:
            floor, floor_levels = await _measure_server(floor_base, "/echo", config, client_cpus)
        report["floor"] = {"sequential": floor, "concurrency": floor_levels}
        report["agent_minus_floor_p50_ms"] = sequential["p50_ms"] - floor["p50_ms"]
    return report


def _floor_process(
    env: Mapping[str, str], cpus: set[int], answer_bytes: int
) -> contextlib.AbstractAsyncContextManager[str]:
    return _process(["-m", "edge_agent.bench", "floor-server", str(answer_bytes)], env, cpus, START_TIMEOUT_S)


def serve_floor(answer_bytes: int) -> None:
    """The HTTP floor: a bare aiohttp server on a free loopback port that parses a JSON body and answers
    a JSON body of ``answer_bytes`` (the size of the agent's answer). Stops on SIGTERM."""
    from aiohttp import web

    filler = max(0, answer_bytes - len(json.dumps({"pad": ""})))
    answer = json.dumps({"pad": "x" * filler})

    async def echo(request: web.Request) -> web.Response:
        await request.json()
        return web.Response(text=answer, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/echo", echo)
        app.router.add_get("/readyz", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def overhead_markdown(report: dict[str, Any]) -> str:
    s = report["sequential"]
    met = "met" if report["target_met"] else "**not met**"
    lines = [
        "# Edge agent: its own overhead (no-op model, full HTTP path)\n",
        f"Agent on CPU {report['agent_cpus']}, client on CPU {report['client_cpus']}"
        + ("" if report["pinned_apart"] else " (the same core: this process may use only one)")
        + f"; {s['requests']} sequential requests after {report['warmup']} warm-up ones; "
        f"`{report['api']}`, {report['request']['width']}x{report['request']['height']}, "
        + ("with an API key" if report["api_key"] else "without API keys")
        + ", result cache off.\n",
        "| measure | value |",
        "|---|---|",
        f"| p50 / p99 | **{s['p50_ms']:.3f}** / {s['p99_ms']:.3f} ms (target p50 <= "
        f"{report['target_p50_ms']:g} ms: {met}) |",
        f"| mean | {s['mean_ms']:.3f} ms |",
        f"| requests/s, one at a time | {s['requests_per_sec']:.0f} |",
    ]
    if "floor" in report:
        f = report["floor"]["sequential"]
        lines += [
            f"| HTTP floor p50 / p99 (bare aiohttp, same core, same answer size) | {f['p50_ms']:.3f} / "
            f"{f['p99_ms']:.3f} ms |",
            f"| agent above the floor, p50 | {report['agent_minus_floor_p50_ms']:.3f} ms |",
        ]
    floors = {row["concurrency"]: row for row in report.get("floor", {}).get("concurrency", [])}
    header = "| concurrency | requests/s | p50 ms | p99 ms |" + (" floor requests/s |" if floors else "")
    lines += ["", header, "|---|---|---|---|" + ("---|" if floors else "")]
    for row in report["concurrency"]:
        line = f"| {row['concurrency']} | {row['requests_per_sec']:.0f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} |"
        if floors:
            line += f" {floors[row['concurrency']]['requests_per_sec']:.0f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# --- 2. load on a real model -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    model: str | None = None  # default: the shipped shapes model
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 48  # per concurrency level, after a warm-up round
    direct_requests: int = 48
    size: int = 64
    steps: int = 8
    max_batch: int | None = None  # default: the highest concurrency level
    # The oldest request waits this long for companions; a full batch goes at once.
    batch_window_ms: float = 5.0

    def source(self) -> str:
        from zimage_edge.shapes import PRETRAINED

        return self.model or str(PRETRAINED)


def load_body(config: LoadConfig, seed: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "width": config.size, "height": config.size, "steps": config.steps, "seed": seed}


def direct_latencies(config: LoadConfig) -> list[float]:
    """The generation function called directly in this process, one request at a time (blocking)."""
    from zimage_edge.model.generate import generate
    from zimage_edge.model.loading import load_pipeline
    from zimage_edge.request import GenerationRequest

    pipe = load_pipeline(config.source()).pipe
    requests = [GenerationRequest(**load_body(config, seed)) for seed in range(config.direct_requests)]
    for request in requests[:3]:
        generate(pipe, request)  # warm-up
    seconds = []
    for request in requests:
        started = time.perf_counter()
        generate(pipe, request)
        seconds.append(time.perf_counter() - started)
    return seconds


def load_benchmark(config: LoadConfig) -> dict[str, Any]:
    """Direct calls, then the agent at each concurrency level (one agent process for the sweep).

    The direct calls run on this thread, before any event loop: torch computing in a second thread
    of a process starts another OpenMP team, which would charge the direct call for it."""
    direct_wall = time.perf_counter()
    direct_s = direct_latencies(config)
    direct = latency_summary(direct_s, time.perf_counter() - direct_wall)
    return asyncio.run(_agent_sweep(config, direct))


async def _agent_sweep(config: LoadConfig, direct: dict[str, float]) -> dict[str, Any]:
    max_batch = config.max_batch or max(config.concurrency)
    agent_env = {**AGENT_ENV, "ZIMAGE_QUEUE__MAX_BATCH": str(max_batch),
                 "ZIMAGE_QUEUE__BATCH_WINDOW_MS": str(config.batch_window_ms),
                 "ZIMAGE_QUEUE__MAX_PENDING": str(max(64, 2 * max(config.concurrency)))}  # fmt: skip
    levels = []
    async with agent_process(config.source(), {**os.environ, **agent_env}) as base:
        url = f"{base}/v1/generate"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for level in config.concurrency:
                await drive(session, url, [load_body(config, s) for s in range(level)], level)  # warm-up
                bodies = [load_body(config, 1000 + s) for s in range(config.requests)]
                row = latency_summary(*await drive(session, url, bodies, level))
                levels.append({"concurrency": level, **row, "images_per_sec": row["requests_per_sec"]})
    first = levels[0]
    report: dict[str, Any] = {
        "benchmark": LOAD_NAME,
        "model": config.source(),
        "request": load_body(config, 0) | {"seed": "varies"},
        "agent_env": agent_env,
        "direct": direct,
        "concurrency": levels,
        "machine": _machine(),
    }
    if first["concurrency"] == 1:
        report["overhead_vs_direct"] = {
            "p50_ms": first["p50_ms"] - direct["p50_ms"],
            "p99_ms": first["p99_ms"] - direct["p99_ms"],
            "mean_ms": first["mean_ms"] - direct["mean_ms"],
        }
    for row in levels:
        row["gain_vs_first"] = row["images_per_sec"] / first["images_per_sec"]
    return report


def load_markdown(report: dict[str, Any]) -> str:
    d = report["direct"]
    r = report["request"]
    lines = [
        "# Edge agent under load (real model)\n",
        f"Model `{Path(report['model']).name}`, {r['width']}x{r['height']}, {r['steps']} steps; agent with "
        f"max_batch {report['agent_env']['ZIMAGE_QUEUE__MAX_BATCH']}, batch window "
        f"{report['agent_env']['ZIMAGE_QUEUE__BATCH_WINDOW_MS']} ms.\n",
        f"Direct call (no agent), one at a time: p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, "
        f"{d['requests_per_sec']:.2f} images/s.",
    ]
    if "overhead_vs_direct" in report:
        o = report["overhead_vs_direct"]
        lines.append(
            f"Through the agent at concurrency 1, minus the direct call: p50 {o['p50_ms']:+.2f} ms, "
            f"p99 {o['p99_ms']:+.2f} ms, mean {o['mean_ms']:+.2f} ms (the difference of two distributions "
            "of model time; the agent's own cost is measured on the no-op model)."
        )
    lines += ["", "| concurrency | images/s | gain | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for row in report["concurrency"]:
        lines.append(
            f"| {row['concurrency']} | {row['images_per_sec']:.2f} | {row['gain_vs_first']:.2f}x | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --- outputs -----------------------------------------------------------------------------------------


def plot_curve(report: dict[str, Any], path: Path, *, title: str, rate_label: str, rate_key: str) -> None:
    """Latency (p50, p99) and throughput against concurrency, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["concurrency"]
    levels = [row["concurrency"] for row in rows]
    fig, (lat, rate) = plt.subplots(1, 2, figsize=(10, 4))
    lat.plot(levels, [row["p50_ms"] for row in rows], "o-", label="agent p50")
    lat.plot(levels, [row["p99_ms"] for row in rows], "s--", label="agent p99")
    rate.plot(levels, [row[rate_key] for row in rows], "o-", label="agent")
    floor = report.get("floor")
    if floor is not None:
        lat.plot(levels, [row["p50_ms"] for row in floor["concurrency"]], "^:", label="HTTP floor p50")
        rate.plot(levels, [row[rate_key] for row in floor["concurrency"]], "^:", label="HTTP floor")
    if "direct" in report:
        lat.axhline(report["direct"]["p50_ms"], color="gray", linestyle=":", label="direct call p50")
    if "target_p50_ms" in report:
        lat.axhline(report["target_p50_ms"], color="red", linestyle=":", label="target p50")
    for axis, label in ((lat, "latency (ms)"), (rate, rate_label)):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out: Path, name: str, report: dict[str, Any], markdown: str, plot: Callable[[dict[str, Any], Path], None]
) -> list[Path]:
    """``out/NAME.json``, ``.md`` and ``.png``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown)
    plot(report, paths[2])
    return paths


def write_overhead(out: Path, report: dict[str, Any]) -> list[Path]:
    def plot(data: dict[str, Any], path: Path) -> None:
        plot_curve(data, path, title="Agent overhead on the no-op model (one core)",
                   rate_label="requests/s", rate_key="requests_per_sec")  # fmt: skip

    return write_outputs(out, OVERHEAD_NAME, report, overhead_markdown(report), plot)


def write_load(out: Path, report: dict[str, Any]) -> list[Path]:
    def plot(data: dict[str, Any], path: Path) -> None:
        plot_curve(data, path, title=f"Agent under load ({Path(data['model']).name})",
                   rate_label="images/s", rate_key="images_per_sec")  # fmt: skip

    return write_outputs(out, LOAD_NAME, report, load_markdown(report), plot)


if __name__ == "__main__":
    # ``python -m edge_agent.bench floor-server BYTES``: the bare server the overhead benchmark compares with.
    if len(sys.argv) != 3 or sys.argv[1] != "floor-server" or not sys.argv[2].isdigit():
        sys.exit("usage: python -m edge_agent.bench floor-server ANSWER_BYTES")
    serve_floor(int(sys.argv[2]))
