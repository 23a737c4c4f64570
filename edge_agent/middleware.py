"""Request id, access log and metrics; errors as JSON; browser safety; API keys and rate limits.

With API keys configured, ``/metrics`` needs an admin key: its per-key usage series name every key,
which ``/v1/usage`` shows only to admins. Prometheus scrapes it with a bearer token, e.g.::

    scrape_configs:
      - job_name: zimage-edge
        authorization: {type: Bearer, credentials_file: /etc/prometheus/zimage-admin-key}

Give the scraper its own admin key, without ``rate_per_minute``. The probes stay open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
import uuid

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from edge_agent.a1111 import PREFIX as A1111_PREFIX
from edge_agent.errors import INTERNAL_MESSAGE, ApiError
from edge_agent.keys import ADMIN, AUTH, CALLER, CLIENT_LEFT, METRICS, SETTINGS
from edge_agent.logs import request_id
from edge_agent.settings import AgentSettings

log = logging.getLogger("edge_agent.access")

# Paths anyone may call: probes, the page and its spec.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/openapi.json"})
# Kubelets and load balancers probe with whatever Host they like; the probes tell a page nothing.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
ADMIN_PREFIX = "/admin/"
# Admin-only outside /admin/: the metrics carry every key's name and usage.
ADMIN_PATHS = frozenset({"/metrics"})
# Methods a browser page may send cross-site without consequence: everything else changes state.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# nginx's "client closed request": no standard status says the client left before the answer.
CLIENT_CLOSED = 499
_CLEAN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A Host header: a name or an IPv4 address, or an IPv6 address in brackets, then an optional port.
_HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::(?P<port>\d{1,5}))?$")


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or being closed): nobody will read an answer."""
    transport = request.transport
    return transport is None or transport.is_closing()


def client_left(request: web.Request) -> None:
    """A streaming handler's note that its client went away mid-answer: counted as a 499."""
    request[CLIENT_LEFT] = True


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
        # A stream dropped mid-way said 200 on the wire, but the client never got all of it; an answer
        # not yet sent when the connection closed reaches nobody. (A stream that ended may see its
        # client close at once: only the handler knows it was cut short.)
        if request.get(CLIENT_LEFT) or (not response.prepared and client_gone(request)):
            status = CLIENT_CLOSED
        if not response.prepared:  # a stream sets its own before it starts
            response.headers["X-Request-ID"] = rid
        return response
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects, and on shutdown with the client still there.
        status = CLIENT_CLOSED if client_gone(request) else 503
        raise
    except ConnectionResetError:
        status = CLIENT_CLOSED
        raise
    except web.HTTPException as exc:  # redirects and the like, which the errors middleware passes on
        status = exc.status
        raise
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
    """Every failure leaves as ``{"error": {...}}`` with a fitting status; nothing leaks a traceback.

    Under ``/sdapi/`` the body takes AUTOMATIC1111's error shape, which its clients parse.
    """
    a1111 = request.path.startswith(A1111_PREFIX)
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response(a1111=a1111)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return ApiError(413, "body_too_large", f"the body exceeds {limit} bytes").response(a1111=a1111)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        # Keep headers that matter to the client (Allow on 405); the body becomes JSON.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in {"content-type", "content-length"}}
        return ApiError(exc.status, code, exc.reason, headers=headers).response(a1111=a1111)
    except ConnectionResetError:
        raise  # the client left: there is nobody to answer, and observe counts it as such
    except Exception:
        log.exception("unhandled", extra={"event": "unhandled_error", "path": request.path})
        return ApiError(500, "internal_error", INTERNAL_MESSAGE).response(a1111=a1111)


def _host_of(header: str | None) -> tuple[str, int | None] | None:
    """``(hostname, port)`` of a Host header, lower-case and without a trailing dot; None if malformed."""
    match = _HOST_HEADER.match(header or "")
    if match is None:
        return None
    name = (match["v6"] or match["name"]).lower().rstrip(".")
    return name, int(match["port"]) if match["port"] else None


def _origin_of(origin: str) -> tuple[str, int | None] | None:
    try:
        url = URL(origin)
    except ValueError:
        return None
    if not url.absolute or url.host is None:  # "null": a sandboxed frame or a file
        return None
    return url.host.lower().rstrip("."), url.explicit_port


def _is_loopback(name: str) -> bool:
    # Browsers resolve localhost and *.localhost to loopback themselves, so no DNS answer can rebind them.
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_unspecified(address: str) -> bool:
    """A wildcard bind (0.0.0.0, ::) names no host; some browsers even send it to loopback."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def _public_host(settings: AgentSettings) -> tuple[str, int | None] | None:
    return _origin_of(settings.public_url) if settings.public_url else None


def _host_allowed(settings: AgentSettings, host: tuple[str, int | None]) -> bool:
    """Without keys, only names a DNS-rebinding page cannot point at us: loopback, the bind, public_url."""
    name = host[0]
    if _is_loopback(name) or (name == settings.host.lower() and not _is_unspecified(settings.host)):
        return True
    public = _public_host(settings)
    return public is not None and public[0] == name


def check_browser_safety(request: web.Request, settings: AgentSettings) -> None:
    """Refuse what a hostile web page can make a browser send to an agent it can reach.

    A page may POST a ``text/plain`` body cross-site without a CORS preflight, and a DNS-rebinding
    page reaches a loopback agent under its own host name. Both matter most without API keys.
    """
    raw_host = request.headers.get(hdrs.HOST)
    host = _host_of(raw_host)
    if (
        not settings.auth_enabled
        and raw_host is not None
        and request.path not in PROBE_PATHS
        and (host is None or not _host_allowed(settings, host))
    ):
        raise ApiError(421, "misdirected_request", "this agent answers only to its loopback or configured names")
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        sender = _origin_of(origin)
        if sender is None or sender not in (host, _public_host(settings)):
            raise ApiError(403, "cross_origin", "requests from other origins may not change anything here")
    if request.body_exists and request.content_type.lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Browser safety, then API keys on everything but the open paths; admin keys on /admin/ and
    /metrics; per-key token buckets."""
    settings = request.app[SETTINGS]
    check_browser_safety(request, settings)
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
    if (request.path.startswith(ADMIN_PREFIX) or request.path in ADMIN_PATHS) and not key.admin:
        raise ApiError(403, "forbidden", f"key {key.name!r} may not call admin endpoints")
    wait = auth.rate_limit(key)
    if wait > 0:
        raise ApiError(429, "rate_limited", f"key {key.name!r} is over its rate limit",
                       headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
    request[CALLER] = key.name
    request[ADMIN] = key.admin
    return await handler(request)
