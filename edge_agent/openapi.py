"""The OpenAPI 3.1 document, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from edge_agent.a1111 import (
    OptionsResult,
    OptionsUpdate,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
)
from edge_agent.api_models import (
    A1111Response,
    A1111Txt2Img,
    NativeGenerate,
    NativeResult,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    SwapRequest,
)
from zimage_edge import __version__

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}},
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERRORS = {
    str(code): {"description": text, "content": {"application/json": {"schema": _ERROR_REF}}}
    for code, text in (
        (400, "malformed body or rejected prompt"),
        (401, "missing or invalid API key"),
        (403, "the key may not do this, or a cross-site request"),
        (408, "the request head or body arrived too slowly"),
        (413, "body too large"),
        (415, "the body is not JSON"),
        (421, "not a name this node answers to without API keys (set public_url)"),
        (422, "invalid field"),
        (429, "queue full or rate limited (see Retry-After)"),
        (499, "the client closed the connection (logged and counted, never sent)"),
        (503, "not ready, draining, or out of device memory"),
        (504, "the request timed out"),
    )
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _post(summary: str, body: type[BaseModel], answer: type[BaseModel], extra: dict[str, Any] | None = None) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": _ref(answer)}}
    content.update(extra or {})
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {"200": {"description": "generated", "content": content}, **ERRORS},
            "security": [{"bearer": []}, {}],
        }
    }


def _get(summary: str, content_type: str = "application/json", schema: dict[str, Any] | None = None) -> dict:
    content = {content_type: {"schema": schema} if schema else {}}
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok", "content": content}}}}


def _list_of(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "array", "items": _ref(model)}


def _post_empty(summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "responses": {"200": {"description": "how many jobs were stopped"}},
                     "security": [{"bearer": []}, {}]}}  # fmt: skip


@cache
def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        NativeGenerate, NativeResult, OpenAIImagesRequest, OpenAIImagesResponse, A1111Txt2Img, A1111Response,
        SwapRequest, SDModelItem, SamplerItem, SchedulerItem, ProgressResponse, OptionsUpdate, OptionsResult,
    ]  # fmt: skip
    _, schema = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = dict(schema.get("$defs", {}))
    schemas["Error"] = ERROR
    stream = {"text/event-stream": {"schema": {"type": "string", "description": "queued, progress*, result|error"}}}
    image = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "zimage-edge agent", "version": __version__},
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/generate": _post(
                "Generate images (JSON, image bytes, or SSE)", NativeGenerate, NativeResult, {**stream, **image}
            ),
            "/v1/images/generations": _post(
                "OpenAI-compatible image generation", OpenAIImagesRequest, OpenAIImagesResponse
            ),
            "/sdapi/v1/txt2img": _post("AUTOMATIC1111-compatible txt2img", A1111Txt2Img, A1111Response),
            "/sdapi/v1/sd-models": _get("Models this node has served, A1111 checkpoints", schema=_list_of(SDModelItem)),
            "/sdapi/v1/options": {
                **_get("A1111 options: sd_model_checkpoint and A1111's defaults"),
                **_post(
                    "Set sd_model_checkpoint (a model swap, admin key); other keys ignored",
                    OptionsUpdate,
                    OptionsResult,
                ),
            },
            "/sdapi/v1/progress": _get("The caller's jobs in flight", schema=_ref(ProgressResponse)),
            "/sdapi/v1/samplers": _get("The sampler the Turbo pipeline runs", schema=_list_of(SamplerItem)),
            "/sdapi/v1/schedulers": _get("Its sigma schedule", schema=_list_of(SchedulerItem)),
            "/sdapi/v1/interrupt": _post_empty("Stop the caller's running and queued jobs (409 for them)"),
            "/sdapi/v1/skip": _post_empty("Stop the caller's running job"),
            "/sdapi/v1/scripts": _get("A1111 scripts (none)"),
            "/admin/model": _post("Swap the loaded model (admin key)", SwapRequest, SwapRequest),
            "/v1/images/{image_id}": _get("An image answered by URL", "image/png"),
            "/v1/models": _get("The loaded model (OpenAI list format)"),
            "/v1/usage": _get("Usage per API key"),
            "/healthz": _get("Liveness"),
            "/readyz": _get("Readiness: warm, not swapping, not draining"),
            "/metrics": _get("Prometheus metrics (an admin key when API keys are configured)", "text/plain"),
            "/": _get("A page to try prompts", "text/html"),
        },
    }
