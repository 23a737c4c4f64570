"""Request id, access log and metrics; errors as JSON; API keys and rate limits."""

from __future__ import annotations

import logging
import math
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from edge_agent.errors import ApiError, error_response
from edge_agent.keys import ADMIN, AUTH, CALLER, METRICS, SETTINGS
from edge_agent.logs import request_id

log = logging.getLogger("edge_agent.access")

# Paths anyone may call: probes, metrics (protect them with a NetworkPolicy), the page and its spec.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/", "/openapi.json"})
ADMIN_PREFIX = "/admin/"
_CLEAN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id (from ``X-Request-ID`` or new), one ``request_done`` line, metrics."""
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if _CLEAN_ID.match(incoming) else uuid.uuid4().hex
    token = request_id.set(rid)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        elapsed = time.perf_counter() - started
        route = _route_name(request)
        metrics = request.app[METRICS]
        metrics.requests.labels(route, str(status)).inc()
        metrics.request_seconds.labels(route).observe(elapsed)
        if route not in {"/metrics", "/healthz", "/readyz"}:
            log.info("request_done", extra={
                "event": "request_done", "method": request.method, "path": request.path, "status": status,
                "duration_sec": round(elapsed, 6), "caller": request.get(CALLER), "request_id": rid,
            })  # fmt: skip
        request_id.reset(token)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as ``{"error": {...}}`` with a fitting status; nothing leaks a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(413, "body_too_large", f"the body exceeds {limit} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        # Keep headers that matter to the client (Allow on 405); the body becomes JSON.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in {"content-type", "content-length"}}
        return error_response(exc.status, code, exc.reason, headers=headers)
    except Exception:
        log.exception("unhandled", extra={"event": "unhandled_error", "path": request.path})
        return error_response(500, "internal_error", "internal error; see the agent's log for the request id")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API keys on everything but the open paths; admin keys on /admin/; per-key token buckets."""
    settings = request.app[SETTINGS]
    if request.path in OPEN_PATHS or not settings.auth_enabled:
        request[ADMIN] = not settings.auth_enabled
        return await handler(request)
    from edge_agent.auth import presented_key

    presented = presented_key(request.headers)
    if presented is None:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer KEY)",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    auth = request.app[AUTH]
    key = auth.identify(presented)
    if key is None:
        raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    if request.path.startswith(ADMIN_PREFIX) and not key.admin:
        raise ApiError(403, "forbidden", f"key {key.name!r} may not call admin endpoints")
    wait = auth.rate_limit(key)
    if wait > 0:
        raise ApiError(429, "rate_limited", f"key {key.name!r} is over its rate limit",
                       headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
    request[CALLER] = key.name
    request[ADMIN] = key.admin
    return await handler(request)
