"""The generation APIs: native (JSON, image bytes, SSE), OpenAI Images, AUTOMATIC1111 txt2img."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from edge_agent import service
from edge_agent.api_models import (
    NativeGenerate,
    NativeImage,
    NativeResult,
    OpenAIImage,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    parse,
    to_generation,
)
from edge_agent.errors import INTERNAL_MESSAGE, ApiError, error_body
from edge_agent.images import public_base_url
from edge_agent.keys import ADMIN, IMAGES, SETTINGS
from edge_agent.logs import request_id
from edge_agent.middleware import client_left

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Server-Sent Events go out in slices this big, each within settings.http.sse_write_timeout_s. 64 KiB
# is the write buffer's high-water mark (asyncio's and aiohttp's), so a slice waits only for the
# client to take about one slice: a slow reader goes on, one that takes nothing is dropped.
SSE_SLICE = 64 * 1024


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); Python's parser takes them, and echoed back they
    # would make our answers invalid JSON.
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: web.Request) -> Any:
    """The JSON body, or a JSON error: 400 (unreadable, not JSON), 408 (too slow), 413 (too large)."""
    timeout_s = request.app[SETTINGS].http.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # too large: the errors middleware answers 413
    except TimeoutError as exc:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s") from exc
    except web.RequestPayloadError as exc:  # a corrupt compressed body, broken chunked framing
        reason = getattr(exc.__cause__, "message", None) or "malformed payload"
        raise ApiError(400, "invalid_body", f"the body cannot be read: {reason}") from exc
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # bad syntax, bad UTF-8, NaN, integers past Python's digit limit
        reason = str(exc).split(";", 1)[0]  # the digit limit's advice on raising it is not for clients
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {reason}") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Base64 of the images and the JSON around them cost ~65 us per 8 KiB here, about what the hop to a
# worker thread and back costs on one core (~50 us idle, more under load): smaller answers are built
# on the loop, larger ones (milliseconds per MB) off it. benchmarks/results/agent-overhead.md
INLINE_ANSWER_BYTES = 8 * 1024


async def json_answer(build: Callable[[], Any], images: Sequence[bytes]) -> web.Response:
    """The JSON answer that ``build`` makes around ``images``: off the loop unless they are small."""
    if sum(len(image) for image in images) <= INLINE_ANSWER_BYTES:
        text = json.dumps(build(), allow_nan=False)
    else:
        text = await asyncio.to_thread(lambda: json.dumps(build(), allow_nan=False))
    return web.Response(text=text, content_type="application/json")


def _native_result(model: str, served: service.Served) -> dict[str, Any]:
    out = served.output
    result = NativeResult(
        id=served.job_id,
        model=model,
        images=[NativeImage(b64=b64(data), seed=seed) for data, seed in zip(out.images, out.seeds, strict=False)],
        mime=out.mime,
        timings=out.timings,
        queue_wait_sec=round(served.queue_wait, 6),
        cached=served.cached,
    )
    return result.model_dump()


def _wants_sse(request: web.Request, body: NativeGenerate) -> bool:
    return body.stream or "text/event-stream" in request.headers.get("Accept", "")


@routes.post("/v1/generate")
async def native_generate(request: web.Request) -> web.StreamResponse:
    body: NativeGenerate = parse(NativeGenerate, await read_json(request))
    gen = to_generation(body, service.default_size(request.app))
    if _wants_sse(request, body):
        return await _stream(request, body)
    served = await service.generate(request, gen, output_format=body.output_format)
    accept = request.headers.get("Accept", "")
    if accept.startswith("image/"):
        if len(served.output.images) != 1:
            raise ApiError(406, "not_acceptable", "an image/* answer holds exactly one image; ask for n=1", field="n")
        return web.Response(
            body=served.output.images[0],
            content_type=served.output.mime,
            headers={"X-Seed": str(served.output.seeds[0]), "X-Job-ID": served.job_id},
        )
    model = service.model_name(request.app)
    return await json_answer(lambda: _native_result(model, served), served.output.images)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode()


class _ClientStalled(Exception):
    """The client took nothing of the stream within the write timeout."""


async def _within(timeout_s: float, step: Awaitable[object]) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError as exc:
        raise _ClientStalled from exc


async def _send(response: web.StreamResponse, data: bytes, timeout_s: float) -> None:
    view = memoryview(data)
    for start in range(0, len(view), SSE_SLICE):
        await _within(timeout_s, response.write(view[start : start + SSE_SLICE]))


async def _outcome(request: web.Request, waiter: asyncio.Task[service.Served]) -> bytes:
    """The stream's last event: the result, or an ``error`` event, whatever went wrong."""
    try:
        served = waiter.result()
    except ApiError as exc:
        return _sse("error", error_body(exc.code, exc.message, field=exc.field))
    except Exception:
        log.exception("stream_failed", extra={"event": "stream_failed", "path": request.path})
        return _sse("error", error_body("internal_error", INTERNAL_MESSAGE))
    model = service.model_name(request.app)
    return await asyncio.to_thread(lambda: _sse("result", _native_result(model, served)))


async def _stream(request: web.Request, body: NativeGenerate) -> web.StreamResponse:
    """Server-Sent Events: ``queued``, one ``progress`` per step, then ``result`` (or ``error``).

    A client that stops reading is dropped after ``settings.http.sse_write_timeout_s`` and its job
    withdrawn, so a stalled socket holds neither a handler nor a result.
    """
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_step(done: int, total: int) -> None:
        events.put_nowait(("progress", {"step": done, "total": total}))

    # Everything that can be refused is refused before the stream starts, as an ordinary JSON error.
    admitted = service.admit(
        request,
        to_generation(body, service.default_size(request.app)),
        output_format=body.output_format,
        on_step=on_step,
    )
    job_id = admitted.job.id if admitted.job else "cache"
    waiter = asyncio.create_task(service.wait(request, admitted), name=f"zimage-sse-{job_id}")
    # Progress reaches the queue through the loop before the job's answer does, so "done" comes last.
    waiter.add_done_callback(lambda _: events.put_nowait(("done", None)))
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    rid = request_id.get()
    if rid is not None:  # the observe middleware cannot add it once the stream has started
        headers["X-Request-ID"] = rid
    response = web.StreamResponse(headers=headers)
    timeout_s = request.app[SETTINGS].http.sse_write_timeout_s
    try:
        await _within(timeout_s, response.prepare(request))
        await _send(response, _sse("queued", {"id": job_id}), timeout_s)
        while (item := await events.get())[0] != "done":
            await _send(response, _sse(*item), timeout_s)
        await _send(response, await _outcome(request, waiter), timeout_s)
        await _within(timeout_s, response.write_eof())
    except _ClientStalled:
        waiter.cancel()  # service.wait withdraws the job if it is still queued or running
        log.warning("sse_client_stalled", extra={"event": "sse_client_stalled", "job_id": job_id,
                                                  "timeout_s": timeout_s})  # fmt: skip
        client_left(request)
        transport = request.transport
        if transport is not None:
            transport.abort()  # frees what was buffered for the client
    except ConnectionResetError:
        waiter.cancel()  # the client left: service.wait withdraws the job
        client_left(request)
    except asyncio.CancelledError:
        waiter.cancel()
        raise
    finally:
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # retrieved: a failure nobody was left to hear of is not logged as lost
    return response


@routes.post("/v1/images/generations")
async def openai_images(request: web.Request) -> web.Response:
    body: OpenAIImagesRequest = parse(OpenAIImagesRequest, await read_json(request))
    served = await service.generate(
        request, to_generation(body, service.default_size(request.app)), output_format=body.output_format
    )
    images, created = served.output.images, int(time.time())
    if body.response_format == "b64_json":
        return await json_answer(
            lambda: OpenAIImagesResponse(
                created=created, data=[OpenAIImage(b64_json=b64(image)) for image in images]
            ).model_dump(exclude_none=True),
            images,
        )
    # Links name the agent as configured, never as the client's Host header claims it.
    transport = request.transport
    base = public_base_url(request.app[SETTINGS], transport.get_extra_info("sockname") if transport else None)
    owner = service.caller(request)
    data = []
    for image in images:
        image_id = request.app[IMAGES].put(image, served.output.mime, owner)
        data.append(OpenAIImage(url=f"{base}/v1/images/{image_id}"))
    return web.json_response(OpenAIImagesResponse(created=created, data=data).model_dump(exclude_none=True))


@routes.get("/v1/images/{image_id}")
async def stored_image(request: web.Request) -> web.Response:
    found = request.app[IMAGES].get(
        request.match_info["image_id"], reader=service.caller(request), admin=request.get(ADMIN, False)
    )
    if found is None:  # someone else's image too: 404, so that ids cannot be probed
        raise ApiError(404, "not_found", "no such image (images answered by URL expire)")
    return web.Response(body=found.data, content_type=found.mime)
