"""The AUTOMATIC1111-compatible API: txt2img and what A1111 clients call around it.

Each caller sees and stops only its own work: ``progress``, ``interrupt`` and ``skip`` act on the
jobs of the API key that calls them (one anonymous caller when the node runs without keys).
Setting ``sd_model_checkpoint`` is a model swap, so it needs an admin key, like ``/admin/model``.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

from aiohttp import web

from edge_agent import service
from edge_agent.a1111 import (
    OPTION_DEFAULTS,
    SAMPLERS,
    SCHEDULERS,
    OptionsResult,
    OptionsUpdate,
    ProgressResponse,
    ProgressState,
    find_model,
    model_item,
    title,
)
from edge_agent.api_models import A1111Response, A1111Txt2Img, parse, to_generation
from edge_agent.errors import ApiError
from edge_agent.jobs import Interrupted
from edge_agent.keys import ADMIN, CLOCK, MODELS, RUNNER, SCHEDULER, STATE
from edge_agent.routes_generate import b64, json_answer, read_json
from edge_agent.swap import ModelLost, start_swap
from zimage_edge.errors import ZimageEdgeError

routes = web.RouteTableDef()


@routes.post("/sdapi/v1/txt2img")
async def txt2img(request: web.Request) -> web.Response:
    body: A1111Txt2Img = parse(A1111Txt2Img, await read_json(request))
    gen = to_generation(body, service.default_size(request.app))
    served = await service.generate(request, gen)
    out = served.output
    info = {
        "prompt": gen.prompt,
        "negative_prompt": gen.negative_prompt,
        "seed": out.seeds[0],
        "all_seeds": out.seeds,
        "steps": gen.steps,
        "cfg_scale": gen.guidance,
        "width": gen.width,
        "height": gen.height,
        "sampler_name": SAMPLERS[0].name,
        "scheduler": SCHEDULERS[0].name,
        "sd_model_name": service.model_name(request.app),
        "sd_model_hash": _current_hash(request.app),
        "ignored_fields": body.ignored_fields(),
        "job_id": served.job_id,
    }
    return await json_answer(
        lambda: A1111Response(
            images=[b64(image) for image in out.images], parameters=body.known_fields(), info=json.dumps(info)
        ).model_dump(),
        out.images,
    )


def _current_hash(app: web.Application) -> str | None:
    identity = app[RUNNER].identity
    return identity.short_hash if identity is not None else None


@routes.get("/sdapi/v1/sd-models")
async def sd_models(request: web.Request) -> web.Response:
    """The models this node has served (the loaded one first), as A1111 lists checkpoints."""
    known = request.app[MODELS]
    current = request.app[RUNNER].identity
    ordered = sorted(known.values(), key=lambda i: (current is None or i.id != current.id, i.loaded_at))
    return web.json_response([model_item(identity).model_dump() for identity in ordered])


@routes.get("/sdapi/v1/options")
async def get_options(request: web.Request) -> web.Response:
    identity = request.app[RUNNER].identity
    current = {
        "sd_model_checkpoint": title(identity) if identity else None,
        "sd_checkpoint_hash": identity.id if identity else None,
    }
    return web.json_response({**OPTION_DEFAULTS, **current})


@routes.post("/sdapi/v1/options")
async def set_options(request: web.Request) -> web.Response:
    body: OptionsUpdate = parse(OptionsUpdate, await read_json(request))
    applied = []
    if body.sd_model_checkpoint is not None:
        if not request.get(ADMIN, False):
            raise ApiError(403, "forbidden", "setting sd_model_checkpoint swaps the model: it needs an admin key")
        if request.app[STATE].draining:
            raise ApiError(503, "draining", "the node is draining; no swaps")
        known = find_model(request.app[MODELS], body.sd_model_checkpoint)
        source = known.source if known is not None else body.sd_model_checkpoint
        # The swap belongs to the app, as with /admin/model: a client that leaves does not stop it.
        try:
            await asyncio.shield(start_swap(request.app, source))
        except ModelLost as exc:
            raise ApiError(503, "model_lost", f"{exc}; the node has no model until a swap succeeds") from exc
        except ZimageEdgeError as exc:
            message = f"{exc}; the previous model keeps serving"
            raise ApiError(422, "model_load_failed", message, field="sd_model_checkpoint") from exc
        applied.append("sd_model_checkpoint")
    return web.json_response(OptionsResult(applied=applied, ignored=body.ignored()).model_dump())


@routes.get("/sdapi/v1/progress")
async def progress(request: web.Request) -> web.Response:
    """The caller's jobs in flight: the running one's step of N, and how many more wait."""
    now = request.app[CLOCK]()
    jobs = request.app[SCHEDULER].jobs_of(service.caller(request))
    running = next((job for job in jobs if job.started_at is not None), None)
    step, steps, fraction, eta = 0, 0, 0.0, 0.0
    if running is not None:
        step, steps = running.work.step, running.request.steps
        fraction = step / steps
        elapsed = now - (running.started_at or now)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    if jobs:  # A1111 counts finished jobs of a batch of jobs; here each queued job is one more
        fraction = fraction / len(jobs)
    state = ProgressState(
        skipped=False,
        interrupted=False,
        job=running.id if running else "",
        job_count=len(jobs),
        job_timestamp=datetime.fromtimestamp(time.time(), UTC).strftime("%Y%m%d%H%M%S"),
        job_no=0,
        sampling_step=step,
        sampling_steps=steps,
    )
    answer = ProgressResponse(progress=round(fraction, 6), eta_relative=round(eta, 3), state=state)
    return web.json_response(answer.model_dump())


@routes.post("/sdapi/v1/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Stop the caller's running and queued jobs (theirs only); their requests end with a 409."""
    stopped = _stop(request, running_only=False)
    return web.json_response({"interrupted": stopped})


@routes.post("/sdapi/v1/skip")
async def skip(request: web.Request) -> web.Response:
    """Stop the caller's running job; its queued ones go on."""
    stopped = _stop(request, running_only=True)
    return web.json_response({"skipped": stopped})


def _stop(request: web.Request, *, running_only: bool) -> int:
    jobs = request.app[SCHEDULER].jobs_of(service.caller(request))
    chosen = [job for job in jobs if job.started_at is not None or not running_only]
    for job in chosen:
        request.app[SCHEDULER].stop(job, Interrupted(job.work.step, job.request.steps, "interrupted by its caller"))
    return len(chosen)


@routes.get("/sdapi/v1/samplers")
async def samplers(request: web.Request) -> web.Response:
    return web.json_response([s.model_dump() for s in SAMPLERS])


@routes.get("/sdapi/v1/schedulers")
async def schedulers(request: web.Request) -> web.Response:
    return web.json_response([s.model_dump() for s in SCHEDULERS])


@routes.get("/sdapi/v1/scripts")
async def scripts(request: web.Request) -> web.Response:
    """No A1111 scripts run here; clients ask at start-up (``webuiapi`` does) to find extensions."""
    return web.json_response({"txt2img": [], "img2img": []})
