"""The controller's HTTP side: the operators' REST API (bearer token), the artifacts nodes download,
Prometheus metrics, and probes. Errors are JSON ``{"error": {"code", "message"}}`` like the agent's.
Torch-free.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet import rollout as ro
from fleet.artifact_server import add_artifact_routes
from fleet.auth import ApiToken, Role, TokenBook
from fleet.controller import Controller
from fleet.mqtt import COUNTER_REASONS
from fleet.schema import NAME_LENGTH, StoreError
from fleet.store import NodeRecord
from quantize.manifest import ArtifactError

# One node first, then a tenth, half, all: a bad variant shows on one site before it reaches many.
DEFAULT_WAVES: tuple[int | str, ...] = (1, "10%", "50%", "100%")
CONTROLLER = web.AppKey("controller", Controller)
TOKENS = web.AppKey("tokens", TokenBook)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# The page is a static shell: the data comes from the API, with the token the operator types into it.
OPEN_PATHS = frozenset({"/healthz", "/"})
OPEN_PREFIXES = ("/artifacts/",)  # nodes fetch artifacts without the operators' token; they verify them


class ReleaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=NAME_LENGTH)
    artifacts: list[str] = Field(min_length=1, description="artifact directories on the controller")
    allow_unsigned: bool = Field(default=False, description="publish artifacts that carry no manifest.sig")


class RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: str
    selector: dict[str, str] = Field(default_factory=dict)
    waves: list[int | str] = Field(default_factory=lambda: list(DEFAULT_WAVES))
    bake_s: float = Field(default=120.0, ge=0)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_unavailable: int = Field(default=1, ge=1)
    node_timeout_s: float = Field(default=600.0, gt=0)
    on_timeout: ro.OnTimeout = ro.OnTimeout.FAIL
    pinned: dict[str, str] = Field(default_factory=dict, description="node -> variant, overriding the planner")

    def spec(self) -> ro.RolloutSpec:
        return ro.RolloutSpec(
            release=self.release, selector=self.selector, waves=tuple(self.waves), bake_s=self.bake_s,
            gates=ro.Gates(max_error_rate=self.max_error_rate, max_p95_ms=self.max_p95_ms),
            max_unavailable=self.max_unavailable, node_timeout_s=self.node_timeout_s, on_timeout=self.on_timeout,
        )  # fmt: skip


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    if request.path not in OPEN_PATHS and not request.path.startswith(OPEN_PREFIXES):
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        holder = request.app[TOKENS].holder(presented) if presented else None
        if holder is None:
            return _error(401, "unauthorized", "a bearer token is required (one of the controller's api_tokens)")
        if request.method not in READ_METHODS and holder.role is not Role.OPERATOR:
            return _error(403, "forbidden", f"token {holder.name!r} is read-only; this needs an operator token")
    try:
        return await handler(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, "invalid_request", f"{where}: {first['msg']}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, "invalid_json", f"the body is not valid JSON: {exc}")
    except (StoreError, ArtifactError, ValueError) as exc:
        return _error(422, "refused", str(exc))
    except KeyError as exc:
        return _error(404, "not_found", f"no such rollout {exc}")


def _node_json(node: NodeRecord) -> dict[str, Any]:
    return {
        "id": node.id, "online": node.online, "labels": node.labels, "ready": node.ready, "health": node.health,
        "artifact": node.artifact, "generation": node.reported_generation,
        "desired_generation": node.desired_generation, "error": node.error,
        "device": node.facts.name if node.facts else None, "last_seen": node.last_seen,
    }  # fmt: skip


class _IngestCounters(Collector):
    """The controller's own counters since it started (it counts; Prometheus sees ``_total`` counters)."""

    controller: Controller | None = None

    def collect(self) -> Iterator[Metric]:
        if self.controller is None:
            return
        ingested = CounterMetricFamily("zimage_fleet_ingested", "messages ingested, by topic kind", labels=["kind"])
        for kind, n in sorted(self.controller.ingested.items()):
            ingested.add_metric([kind], n)
        yield ingested
        yield GaugeMetricFamily(
            "zimage_fleet_leader", "1 while this controller holds the rollout lease (drives rollouts)",
            value=int(self.controller.leader),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "zimage_fleet_ingest_backlog", "messages received from the broker and not stored yet",
            value=self.controller.mqtt.backlog,
        )  # fmt: skip
        yield CounterMetricFamily(
            "zimage_fleet_duplicates", "telemetry and events received again (stored once)",
            value=self.controller.duplicates,
        )  # fmt: skip
        yield CounterMetricFamily(
            "zimage_fleet_ingest_failures", "batches the database refused (their nodes send them again)",
            value=self.controller.ingest_failures,
        )  # fmt: skip
        mqtt = CounterMetricFamily(
            "zimage_fleet_mqtt_dropped", "messages the controller's MQTT client dropped or failed to send, by "
            "reason (queue_full: received while the ingest was that far behind; the nodes send them again)",
            labels=["reason"],
        )  # fmt: skip
        counted = self.controller.mqtt.counters
        for reason in COUNTER_REASONS:
            mqtt.add_metric([reason], counted.get(reason, 0))
        yield mqtt
        yield CounterMetricFamily(
            "zimage_fleet_tick_failures", "rollout ticks the database refused (the next tick asks again)",
            value=self.controller.tick_failures,
        )  # fmt: skip


class FleetMetrics:
    """Prometheus gauges read from the store at scrape time (a registry per app)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.nodes = Gauge("zimage_fleet_nodes", "nodes by device and online", ["device", "online"], registry=r)
        self.rollouts = Gauge("zimage_fleet_rollouts", "rollouts by status", ["status"], registry=r)
        self.counters = _IngestCounters()
        r.register(self.counters)
        self.drops = Gauge("zimage_fleet_dropped", "messages dropped, by reason", ["source", "reason"], registry=r)

    def collect(self, controller: Controller) -> bytes:
        store = controller.store
        self.nodes.clear()
        counts: dict[tuple[str, str], int] = {}
        for node in store.list_nodes():
            key = (node.facts.name if node.facts else "unknown", str(node.online).lower())
            counts[key] = counts.get(key, 0) + 1
        for (device, online), n in counts.items():
            self.nodes.labels(device, online).set(n)
        self.rollouts.clear()
        for state in store.list_rollouts():
            self.rollouts.labels(str(state.status)).inc()
        self.counters.controller = controller
        for (source, reason), n in store.drop_counts().items():
            self.drops.labels(source, reason).set(n)
        return generate_latest(self.registry)


async def status_page(request: web.Request) -> web.Response:
    """A read-only status page: nodes, what they run, and the rollouts' waves, refreshed live."""
    page = resources.files("fleet").joinpath("static/status.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    return web.json_response({"status": "alive", "mqtt_connected": controller.mqtt.connected,
                              "leader": controller.leader})  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].collect, request.app[CONTROLLER])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_nodes(request: web.Request) -> web.Response:
    """Every node; with ``?explain=RELEASE`` the variant the planner picks for each, and why."""
    store = request.app[CONTROLLER].store
    records = await asyncio.to_thread(store.list_nodes)
    nodes = [_node_json(n) for n in records]
    release_name = request.query.get("explain")
    if release_name:
        release = await asyncio.to_thread(store.get_release, release_name)
        if release is None:
            raise ValueError(f"no release {release_name!r}")
        choices = await asyncio.to_thread(request.app[CONTROLLER].choices, release)
        for entry in nodes:
            choice = choices.get(entry["id"])
            entry["variant"] = choice.variant if choice else None
            entry["explanation"] = choice.explanation if choice else "the node has not reported its device"
    return web.json_response({"nodes": nodes})


async def list_releases(request: web.Request) -> web.Response:
    releases = await asyncio.to_thread(request.app[CONTROLLER].store.list_releases)
    return web.json_response({"releases": [
        {"name": r.name, "created": r.created,
         "variants": [{"variant": v.variant, "artifact_id": v.artifact_id, "bytes": v.bytes} for v in r.variants]}
        for r in releases
    ]})  # fmt: skip


async def publish(request: web.Request) -> web.Response:
    body = ReleaseBody.model_validate(await request.json())
    controller = request.app[CONTROLLER]
    release = await asyncio.to_thread(
        controller.publish_release, body.name, [Path(p) for p in body.artifacts], allow_unsigned=body.allow_unsigned
    )
    return web.json_response({"name": release.name, "variants": {v.variant: v.artifact_id for v in release.variants}},
                             status=201)  # fmt: skip


async def list_rollouts(request: web.Request) -> web.Response:
    states = await asyncio.to_thread(request.app[CONTROLLER].store.list_rollouts)
    return web.json_response({"rollouts": [s.to_dict() for s in states]})


async def create_rollout(request: web.Request) -> web.Response:
    body = RolloutBody.model_validate(await request.json())
    state = await request.app[CONTROLLER].create_rollout(body.spec(), body.pinned)
    return web.json_response(state.to_dict(), status=201)


async def get_rollout(request: web.Request) -> web.Response:
    state = await asyncio.to_thread(request.app[CONTROLLER].store.load_rollout, request.match_info["rollout_id"])
    if state is None:
        raise KeyError(request.match_info["rollout_id"])
    return web.json_response(state.to_dict())


async def control(request: web.Request) -> web.Response:
    state = await request.app[CONTROLLER].control(request.match_info["rollout_id"], request.match_info["verb"])
    return web.json_response(state.to_dict())


METRICS = web.AppKey("metrics", FleetMetrics)


def create_controller_app(controller: Controller, tokens: Sequence[ApiToken]) -> web.Application:
    """The controller's HTTP server: ``tokens`` guard everything but probes and artifacts; a read token
    may GET, an operator token may also change things."""
    app = web.Application(middlewares=[_guard])
    app[CONTROLLER] = controller
    app[TOKENS] = TokenBook(tokens)
    app[METRICS] = FleetMetrics()
    add_artifact_routes(app, controller.catalog)
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/nodes", list_nodes)
    app.router.add_get("/api/v1/releases", list_releases)
    app.router.add_post("/api/v1/releases", publish)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_post("/api/v1/rollouts", create_rollout)
    app.router.add_get("/api/v1/rollouts/{rollout_id}", get_rollout)
    app.router.add_post("/api/v1/rollouts/{rollout_id}/{verb:pause|resume|abort}", control)
    return app
