"""Health, readiness, metrics, models, usage, the admin model swap, the OpenAPI document, the web page."""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent import service
from edge_agent.api_models import SwapRequest, parse
from edge_agent.errors import ApiError
from edge_agent.keys import ADMIN, AUTH, CPU_THREADS, METRICS, PAGE, RUNNER, SETTINGS, STATE
from edge_agent.noop import NOOP_VARIANT
from edge_agent.noop import NOTE as NOOP_NOTE
from edge_agent.openapi import openapi_document
from edge_agent.routes_generate import read_json
from edge_agent.swap import ModelLost, start_swap
from zimage_edge.errors import ZimageEdgeError
from zimage_edge.request import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.failed is not None:
        return web.json_response({"status": "failed", "reason": state.reason()}, status=503)
    return web.json_response({"status": "alive"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    status = 200 if state.ready else 503
    return web.json_response({"status": state.reason()}, status=status)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    app_metrics = request.app[METRICS]
    identity = request.app[RUNNER].identity
    if identity is not None and identity.device == "cuda":
        import torch

        app_metrics.gpu_memory.set(torch.cuda.memory_allocated())
    return web.Response(body=generate_latest(app_metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The loaded model in the OpenAI list format, with its identity, sizes and manifest summary."""
    identity = request.app[RUNNER].identity
    if identity is None:
        return web.json_response({"object": "list", "data": []})
    guard = request.app[SETTINGS].guard
    entry = {
        "id": identity.variant,
        "object": "model",
        "created": int(identity.loaded_at),
        "owned_by": "zimage-edge",
        "node": request.app[SETTINGS].node_name,
        **identity.summary(),
        # What a client may ask for: the model's own size by default, any multiple within the limits.
        "sizes": {
            "default": {"width": identity.default_size, "height": identity.default_size},
            "min": MIN_SIDE,
            "max": min(MAX_SIDE, guard.max_side),
            "multiple": SIZE_MULTIPLE,
            "max_images": guard.max_images,
        },
        "cpu_threads": request.app[CPU_THREADS].to_dict(),
        # True only for the no-op model (edge_agent.noop), which draws nothing: never a real model.
        "benchmark_only": identity.variant == NOOP_VARIANT,
    }
    if identity.variant == NOOP_VARIANT:
        entry["note"] = NOOP_NOTE
    return web.json_response({"object": "list", "data": [entry]})


@routes.get("/v1/usage")
async def usage(request: web.Request) -> web.Response:
    """Usage per key: an admin (or everyone, when auth is off) sees all keys, others their own."""
    auth = request.app[AUTH]
    name = service.caller(request)
    everything = request.get(ADMIN, False)  # every caller is admin when auth is off
    data = {k: v.to_dict() for k, v in auth.usage.items() if everything or k == name}
    return web.json_response({"usage": data})


@routes.post("/admin/model")
async def admin_model(request: web.Request) -> web.Response:
    body: SwapRequest = parse(SwapRequest, await read_json(request))
    if request.app[STATE].draining:
        raise ApiError(503, "draining", "the node is draining; no swaps")
    # The swap belongs to the app: if this client leaves, only its wait is cancelled.
    swap = start_swap(request.app, body.model)
    try:
        result = await asyncio.shield(swap)
    except ModelLost as exc:
        raise ApiError(503, "model_lost", f"{exc}; the node has no model until a swap succeeds") from exc
    except ZimageEdgeError as exc:
        raise ApiError(422, "model_load_failed", f"{exc}; the previous model keeps serving", field="model") from exc
    return web.json_response(result)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[PAGE], content_type="text/html")


def load_page() -> str:
    return resources.files("edge_agent").joinpath("static/index.html").read_text(encoding="utf-8")
