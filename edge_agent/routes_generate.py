"""The generation APIs: native (JSON, image bytes, SSE), OpenAI Images, AUTOMATIC1111 txt2img."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from edge_agent import service
from edge_agent.api_models import (
    A1111Response,
    A1111Txt2Img,
    NativeGenerate,
    NativeImage,
    NativeResult,
    OpenAIImage,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    parse,
    to_generation,
)
from edge_agent.errors import ApiError
from edge_agent.keys import IMAGES, RUNNER

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> Any:
    """The JSON body, or a 400 (malformed) / 413 (too large) as JSON errors."""
    raw = await request.read()  # too large: the errors middleware answers 413
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _json_answer(build: Callable[[], Any]) -> web.Response:
    """Base64 of several images and the JSON around them take milliseconds per MB: built off the loop."""
    text = await asyncio.to_thread(lambda: json.dumps(build()))
    return web.Response(text=text, content_type="application/json")


def _native_result(model: str, served: service.Served) -> dict[str, Any]:
    out = served.output
    result = NativeResult(
        id=served.job_id,
        model=model,
        images=[NativeImage(b64=_b64(data), seed=seed) for data, seed in zip(out.images, out.seeds, strict=False)],
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
    gen = to_generation(body)
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
    model = request.app[RUNNER].identity.get("variant", "")
    return await _json_answer(lambda: _native_result(model, served))


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(request: web.Request, body: NativeGenerate) -> web.StreamResponse:
    """Server-Sent Events: ``queued``, one ``progress`` per step, then ``result`` (or ``error``)."""
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_step(done: int, total: int) -> None:
        events.put_nowait(("progress", {"step": done, "total": total}))

    # Everything that can be refused is refused before the stream starts, as an ordinary JSON error.
    admitted = service.admit(request, to_generation(body), output_format=body.output_format, on_step=on_step)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    job_id = admitted.job.id if admitted.job else "cache"
    await response.write(_sse("queued", {"id": job_id}))
    waiter = asyncio.create_task(service.wait(request, admitted), name=f"zimage-sse-{job_id}")
    # Progress reaches the queue through the loop before the job's answer does, so "done" comes last.
    waiter.add_done_callback(lambda _: events.put_nowait(("done", None)))
    try:
        while (item := await events.get())[0] != "done":
            await response.write(_sse(*item))
        try:
            served = waiter.result()
        except ApiError as exc:
            await response.write(_sse("error", {"error": {"code": exc.code, "message": exc.message}}))
        else:
            model = request.app[RUNNER].identity.get("variant", "")
            await response.write(await asyncio.to_thread(lambda: _sse("result", _native_result(model, served))))
    except (ConnectionResetError, asyncio.CancelledError):
        waiter.cancel()  # the client left: service.wait withdraws the job
        raise
    await response.write_eof()
    return response


@routes.post("/v1/images/generations")
async def openai_images(request: web.Request) -> web.Response:
    body: OpenAIImagesRequest = parse(OpenAIImagesRequest, await read_json(request))
    served = await service.generate(request, to_generation(body), output_format=body.output_format)
    images, created = served.output.images, int(time.time())
    if body.response_format == "b64_json":
        return await _json_answer(
            lambda: OpenAIImagesResponse(
                created=created, data=[OpenAIImage(b64_json=_b64(image)) for image in images]
            ).model_dump(exclude_none=True)
        )
    data = []
    for image in images:
        image_id = request.app[IMAGES].put(image, served.output.mime)
        url = request.url.with_path(f"/v1/images/{image_id}").with_query(None)
        data.append(OpenAIImage(url=str(url)))
    return web.json_response(OpenAIImagesResponse(created=created, data=data).model_dump(exclude_none=True))


@routes.get("/v1/images/{image_id}")
async def stored_image(request: web.Request) -> web.Response:
    found = request.app[IMAGES].get(request.match_info["image_id"])
    if found is None:
        raise ApiError(404, "not_found", "no such image (images answered by URL expire)")
    mime, data = found
    return web.Response(body=data, content_type=mime)


@routes.post("/sdapi/v1/txt2img")
async def a1111_txt2img(request: web.Request) -> web.Response:
    body: A1111Txt2Img = parse(A1111Txt2Img, await read_json(request))
    gen = to_generation(body)
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
        "sampler_name": "FlowMatchEuler",
        "sd_model_name": request.app[RUNNER].identity.get("variant", ""),
        "ignored_fields": body.ignored_fields(),
        "job_id": served.job_id,
    }
    return await _json_answer(
        lambda: A1111Response(
            images=[_b64(image) for image in out.images], parameters=body.model_dump(), info=json.dumps(info)
        ).model_dump()
    )
