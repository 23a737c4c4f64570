"""``zimage-edge demo``: a whole site on this machine, from checkpoint to image, the way a fleet runs.

1. The release (first run only; a second run reuses it): the model (the shapes model shipped in the
   package, or ``--source`` weights) quantized to ``RELEASE_VARIANTS`` by ``zimage-edge quantize``, each
   artifact signed with a demo release key made for the purpose.
2. The site: Mosquitto with TLS, a password per identity and the fleet's ACLs (``fleet.security``); the
   controller; and per ``DEMO_NODES`` entry an agent (``zimage-edge serve``) with its node sidecar
   (``zimage-edge node``) reporting a device profile of its own: each pair its own ports, each agent held
   to its share of this machine's CPUs by the thread policy.
3. The rollout: the release is published (its signatures checked against the demo key) and rolled out
   in waves, a canary first; every node gets the variant the planner picks for its device, downloads
   it, verifies it and swaps its agent over.
4. One generation per agent; the summary says who runs what, how long each image took, what each image
   shows (read from its pixels, for the shapes model) and where it was written, with the URLs of the
   agents' pages and the controller's status page. Then it serves until Ctrl-C (or exits, ``--once``)
   and stops every process it started, in order.

This process stays torch-free: the model work happens in the agents and in ``zimage-edge quantize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tomli_w
from PIL import Image
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from fleet.broker import MosquittoBroker, free_port
from fleet.cli import ControllerSettings
from fleet.node import NodeConfig
from fleet.postgres import die_with_parent
from fleet.release_build import SHAPES_MODEL, BuildError, quantize_artifact
from fleet.security import BrokerLimits, init_pki, provision_controller, provision_nodes
from quantize.signing import generate_keypair
from zimage_edge.shapes.data import parse_caption
from zimage_edge.shapes.metric import Reading, read_image

# The planner, over Z-Image-Turbo's real sizes, gives each demo device a different one of these:
# A10 24 GB int8, T4 16 GB int8-te8, Orin Nano 8 GB int4-te8 (the text encoder freed after encoding).
RELEASE_VARIANTS = ("int8", "int8-te8", "int4-te8")
RELEASE = "demo-1"
SITE = "demo-site"


@dataclass(frozen=True)
class DemoNode:
    name: str
    profile: str  # a quantize.profiles name: the device this node reports
    prompt: str  # what the demo asks its agent to draw


DEMO_NODES = (
    DemoNode("orin-nano-1", "jetson-orin-nano-8gb", "a red circle on a white background"),
    DemoNode("t4-1", "t4-16gb", "a yellow triangle on a blue background"),
    DemoNode("a10-1", "a10-24gb", "a blue square on a yellow background"),
)
START_TIMEOUT_S = 300.0  # agents load and warm up a model: seconds here, minutes for real weights on CPU
ROLLOUT_TIMEOUT_S = 600.0
GENERATE_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0  # an agent drains its queue (empty by then) before it exits
POLL_S = 0.25
TELEMETRY_INTERVAL_S = 2.0


def make_console() -> Console:
    """The terminal's width on a terminal; wide enough for the summary table in a log or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=240)


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its logs are."""


@dataclass(frozen=True)
class DemoOptions:
    work: Path  # kept between runs: the signing key and the built release
    out: Path  # the images
    source: str | None = None  # None: the shapes model shipped in the package
    once: bool = False
    console: Console = field(default_factory=make_console)


@dataclass
class Release:
    artifacts: dict[str, Path]
    public_key: Path


@dataclass
class Site:
    """What the demo started; ``stop`` ends it in order (nodes, agents, controller, broker)."""

    run: Path
    console: Console
    procs: list[tuple[str, asyncio.subprocess.Process]] = field(default_factory=list)
    broker: MosquittoBroker | None = None

    async def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        logs = self.run / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *die_with_parent("TERM"), sys.executable, "-m", "zimage_edge.cli", *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches the demo, which stops everything in order
            )  # fmt: skip
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.returncode is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}; see {self.run / 'logs' / name}.log")

    async def stop(self) -> None:
        order = ("node-", "agent-", "controller")
        for prefix in order:
            group = [(name, proc) for name, proc in self.procs if name.startswith(prefix)]
            for _, proc in group:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            for name, proc in group:
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    self.console.print(f"[yellow]{name} did not stop within {STOP_TIMEOUT_S:g} s: killed[/]")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)


# -- the release ------------------------------------------------------------------------------------


def demo_key(work: Path) -> tuple[Path, Path]:
    """The demo's release signing key pair (private, public), made once."""
    keys = work / "keys"
    private, public = keys / "release.key", keys / "release.pub"
    if not (private.exists() and public.exists()):
        staging = work / "keys.partial"
        shutil.rmtree(staging, ignore_errors=True)
        made_private, made_public = generate_keypair(staging)
        made_private.rename(staging / private.name)
        made_public.rename(staging / public.name)
        shutil.rmtree(keys, ignore_errors=True)  # half a pair from an interrupted run
        staging.rename(keys)
    return private, public


async def build_release(options: DemoOptions) -> Release:
    """The signed artifacts of ``RELEASE_VARIANTS``, built by ``zimage-edge quantize`` unless already there.

    A built artifact is complete or absent: quantize writes it to a temporary path and renames it when it
    is verified. One made with another key (the key was removed) is built again."""
    private, public = demo_key(options.work)
    source = options.source or SHAPES_MODEL
    # Each model its own directory: a release built from other weights is never taken for this one.
    slug = "shapes" if options.source is None else hashlib.sha256(str(source).encode()).hexdigest()[:12]
    artifacts = {}
    for variant in RELEASE_VARIANTS:
        target = options.work / "artifacts" / slug / variant
        signer = target.with_name(f"{variant}.key")  # the public key that signed it, written last
        if (target / "manifest.sig").exists() and signer.exists() and signer.read_bytes() == public.read_bytes():
            options.console.print(f"release: {variant} already built ({target})")
        else:
            options.console.print(f"release: building {variant} from {source} (first run only)")
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                await quantize_artifact(source, variant, target, sign_key=private)
            except BuildError as exc:
                raise DemoError(str(exc)) from exc
            shutil.copyfile(public, signer)
        artifacts[variant] = target
    return Release(artifacts, public)


# -- the site -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    controller: str
    token: str
    agents: dict[str, str]  # node name -> agent URL
    client_key: str  # what an on-site app sends to the agents


async def start_site(site: Site, release: Release, console: Console) -> Endpoints:
    run = site.run
    pki = init_pki(run / "pki").root
    controller_creds = provision_controller(pki, "demo-controller")
    node_creds = {c.identity: c for c in provision_nodes(pki, [node.name for node in DEMO_NODES])}
    limits = BrokerLimits.for_fleet(len(DEMO_NODES), telemetry_interval_s=TELEMETRY_INTERVAL_S)
    site.broker = MosquittoBroker(run / "broker", pki=pki, limits=limits)
    await asyncio.to_thread(site.broker.start)
    broker = site.broker
    console.print(f"broker: Mosquitto on {broker.host}:{broker.port} (TLS, a password per identity, ACLs)")

    token, client_key, node_key = (secrets.token_urlsafe(18) for _ in range(3))
    controller_port = free_port()
    controller_cfg = _write_config(run / "controller.toml", ControllerSettings, {
        "controller_id": "demo-controller",
        "database": str(run / "fleet.db"),
        "port": controller_port,
        "api_token": token,
        "signing_public_keys": [str(release.public_key)],
        "mqtt": controller_creds.mqtt_settings(broker.host, broker.port).toml_values(),
    })  # fmt: skip
    await site.start("controller", "fleet", "controller", "--config", str(controller_cfg))
    controller = f"http://127.0.0.1:{controller_port}"

    # The agents start on the smallest artifact of the release; the rollout gives each its own.
    first = release.artifacts[RELEASE_VARIANTS[-1]]
    agents = {}
    for node in DEMO_NODES:
        port = free_port()
        agents[node.name] = f"http://127.0.0.1:{port}"
        agent_cfg = _write_config(run / f"agent-{node.name}.toml", None, {
            "model": str(first),
            "port": port,
            "node_name": node.name,
            "device_profile": node.profile,
            "trusted_keys": [str(release.public_key)],
            "cpu": {"share": len(DEMO_NODES)},  # the agents share this machine: each a part of its CPUs
            "api_keys": [
                {"name": "node", "sha256": hashlib.sha256(node_key.encode()).hexdigest(), "admin": True},
                {"name": "on-site-app", "sha256": hashlib.sha256(client_key.encode()).hexdigest()},
            ],
        })  # fmt: skip
        await site.start(f"agent-{node.name}", "serve", "--config", str(agent_cfg))
        node_cfg = _write_config(run / f"node-{node.name}.toml", NodeConfig, {
            "node_id": node.name,
            "agent_url": agents[node.name],
            "agent_key": node_key,
            "store_dir": str(run / "stores" / node.name),
            "telemetry_interval_s": TELEMETRY_INTERVAL_S,
            "trusted_keys": [str(release.public_key)],
            "labels": {"site": SITE, "class": node.profile},
            "mqtt": node_creds[node.name].mqtt_settings(broker.host, broker.port).toml_values(),
        })  # fmt: skip
        await site.start(f"node-{node.name}", "node", "--config", str(node_cfg), "--device-profile", node.profile)
    return Endpoints(controller, token, agents, client_key)


def _write_config(path: Path, schema: type[BaseModel] | None, values: dict[str, Any]) -> Path:
    """A process's TOML config, checked against its settings class first (the agent checks its own)."""
    if schema is not None:
        schema.model_validate(values)
    path.touch(mode=0o600)  # secrets inside: the tokens, the broker passwords
    path.write_text(tomli_w.dumps(values))
    return path


async def _wait(site: Site, predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` with a deadline; a process of the site exiting meanwhile is an error at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        site.check_alive()
        with contextlib.suppress(OSError, aiohttp.ClientError):
            if await predicate():
                return
        if time.monotonic() >= deadline:
            raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}; logs in {site.run / 'logs'}")
        await asyncio.sleep(POLL_S)


async def _json(http: aiohttp.ClientSession, url: str, token: str) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        response.raise_for_status()
        return await response.json()


async def wait_ready(site: Site, http: aiohttp.ClientSession, ends: Endpoints) -> None:
    async def registered() -> bool:
        nodes = (await _json(http, f"{ends.controller}/api/v1/nodes", ends.token))["nodes"]
        return sum(1 for n in nodes if n["online"] and n["device"]) == len(DEMO_NODES)

    async def agents_ready() -> bool:
        for url in ends.agents.values():
            async with http.get(f"{url}/readyz") as response:
                if response.status != 200:
                    return False
        return True

    await _wait(site, agents_ready, START_TIMEOUT_S, "the agents to load their first model")
    await _wait(site, registered, START_TIMEOUT_S, "every node to report to the controller")


# -- the rollout and the images ----------------------------------------------------------------------


async def roll_out(site: Site, http: aiohttp.ClientSession, ends: Endpoints, release: Release) -> dict[str, Any]:
    console = site.console
    auth = {"Authorization": f"Bearer {ends.token}"}
    body = {"name": RELEASE, "artifacts": [str(path) for path in release.artifacts.values()]}
    async with http.post(f"{ends.controller}/api/v1/releases", json=body, headers=auth) as response:
        if response.status >= 400:
            raise DemoError(f"publishing the release failed: {response.status} {await response.text()}")
    console.print(f"release {RELEASE} published: {', '.join(release.artifacts)} (signatures checked)")
    rollout = {"release": RELEASE, "waves": [1, "100%"], "bake_s": 3.0, "max_error_rate": 0.05,
               "max_unavailable": 1, "node_timeout_s": ROLLOUT_TIMEOUT_S}  # fmt: skip
    async with http.post(f"{ends.controller}/api/v1/rollouts", json=rollout, headers=auth) as response:
        if response.status >= 400:
            raise DemoError(f"creating the rollout failed: {response.status} {await response.text()}")
        state = await response.json()
    console.print(f"rollout {state['id']}: waves {state['bounds']} (a canary first), bake {rollout['bake_s']:g} s")
    shown: dict[str, str] = {}
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while True:
        for node in state["nodes"]:
            phase = node["phase"]
            if shown.get(node["node"]) != phase:
                shown[node["node"]] = phase
                variant = (node.get("target") or {}).get("variant", "?")
                wave = min(state["wave"] + 1, len(state["bounds"]))
                console.print(f"  wave {wave}/{len(state['bounds'])}: {node['node']} -> {variant}: {phase}")
        if state["status"] not in ("running", "paused"):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"the rollout did not finish within {ROLLOUT_TIMEOUT_S:g} s (logs in {site.run / 'logs'})")
        site.check_alive()
        await asyncio.sleep(POLL_S)
        state = await _json(http, f"{ends.controller}/api/v1/rollouts/{state['id']}", ends.token)
    if state["status"] != "succeeded":
        raise DemoError(f"the rollout ended {state['status']}: {state.get('reason', '')}")
    console.print(f"rollout {state['id']} succeeded")
    return state


@dataclass(frozen=True)
class Drawn:
    node: DemoNode
    variant: str
    latency_s: float
    path: Path
    reading: str
    matches: bool | None  # None: not the shapes model, nothing to compare with


async def draw(http: aiohttp.ClientSession, ends: Endpoints, out: Path, shapes: bool) -> list[Drawn]:
    """One generation per agent, as an on-site app asks for it (its own key, the native API)."""
    drawn = []
    for node in DEMO_NODES:
        agent = ends.agents[node.name]
        headers = {"Authorization": f"Bearer {ends.client_key}", "Accept": "image/png"}
        started = time.perf_counter()
        async with http.post(f"{agent}/v1/generate", json={"prompt": node.prompt, "seed": 0}, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=GENERATE_TIMEOUT_S)) as response:  # fmt: skip
            if response.status != 200:
                raise DemoError(f"{node.name}: generation failed: {response.status} {await response.text()}")
            png = await response.read()
        latency = time.perf_counter() - started
        path = await asyncio.to_thread(_save, out / f"{node.name}.png", png)
        models = await _json(http, f"{agent}/v1/models", ends.client_key)
        variant = models["data"][0].get("variant") or "?"
        reading, matches = "n/a", None
        asked = parse_caption(node.prompt)
        if shapes and asked is not None:
            seen = await asyncio.to_thread(_read, png)
            reading = f"a {seen.color or '?'} {seen.shape or '?'} on a {seen.background} background"
            matches = (seen.color, seen.shape, seen.background) == (asked.color, asked.shape, asked.background)
        drawn.append(Drawn(node, variant, latency, path, reading, matches))
    return drawn


def _save(path: Path, png: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".png.partial")
    partial.write_bytes(png)
    partial.replace(path)  # never half an image under the final name
    return path


def _read(png: bytes) -> Reading:
    return read_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def summary(console: Console, drawn: Sequence[Drawn], ends: Endpoints, rollout: dict[str, Any]) -> None:
    targets = {n["node"]: (n.get("target") or {}).get("variant") for n in rollout["nodes"]}
    table = Table(title="zimage-edge demo: one site, three devices, one release")
    for column in ("node", "device", "variant (planner)", "serving", "latency", "asked", "the image shows",
                   "as asked", "image"):  # fmt: skip
        table.add_column(column, no_wrap=True)
    for d in drawn:
        mark = {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"}[d.matches]
        table.add_row(d.node.name, d.node.profile, targets.get(d.node.name) or "?", d.variant,
                      f"{d.latency_s * 1000:.0f} ms", d.node.prompt, d.reading, mark, d.path.name)  # fmt: skip
    console.print(table)
    if drawn:
        console.print(f"images in {drawn[0].path.parent.resolve()}")
    console.print(f"controller status page: {ends.controller}/  (token: {ends.token})")
    for name, url in ends.agents.items():
        console.print(f"agent {name}: {url}/  (key: {ends.client_key})")


# -- the whole run ------------------------------------------------------------------------------------


async def run_demo(options: DemoOptions) -> int:
    console = options.console
    release = await build_release(options)
    run = options.work / "run"
    shutil.rmtree(run, ignore_errors=True)  # the last run's broker, store and logs
    run.mkdir(parents=True)
    site = Site(run, console)
    try:
        async with _session() as http:
            ends = await start_site(site, release, console)
            await wait_ready(site, http, ends)
            console.print(f"site up: controller, {len(DEMO_NODES)} agents and their nodes (logs in {run / 'logs'})")
            rollout = await roll_out(site, http, ends, release)
            drawn = await draw(http, ends, options.out, shapes=options.source is None)
            summary(console, drawn, ends, rollout)
            if not options.once:
                console.print("serving; Ctrl-C stops everything")
                while True:
                    site.check_alive()
                    await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(Exception):
            console.print("stopping: nodes, agents, controller, broker")
        await asyncio.shield(site.stop())
    return 0


@contextlib.asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        yield http


def main(options: DemoOptions) -> int:
    """Run the demo; Ctrl-C (or SIGTERM) at any point stops what was started and exits 130."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupt)
        try:
            return await run_demo(options)
        except asyncio.CancelledError:
            if not interrupted:
                raise
            options.console.print("stopped")
            return 130

    try:
        return asyncio.run(guarded())
    except DemoError as exc:
        options.console.print(f"[red]demo failed:[/] {exc}")
        return 1


def default_work() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "zimage-edge" / "demo"
