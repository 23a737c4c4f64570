"""The agent attacked by a hostile client and run by a careless operator.

Malformed bodies, slow and stalled sockets, aborted requests, cross-site browsers, DNS rebinding,
other keys' images, loose A1111 fields. The agents here run on the production server
(``AgentRunner``), on real loopback sockets; raw ``asyncio`` connections play the bad clients.
Timeouts under test are set tiny (0.3 s) and every wait has a generous deadline, so the tests hold
on a loaded machine without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from yarl import URL

from edge_agent.app import create_app
from edge_agent.http_server import AgentRunner
from edge_agent.images import ImageStore, public_base_url
from edge_agent.keys import SCHEDULER, SETTINGS, STATE
from edge_agent.runner import default_batch_fn
from edge_agent.settings import AgentSettings, ApiKey
from tests.agent.conftest import SMALL, WARM_TIMEOUT_S, decode_image, error_of
from zimage_edge.request import MAX_IMAGES, GenerationRequest

# Bound on every wait for the server to do something; the tiny model and these agents answer in
# milliseconds, so this only turns a hang into a failure.
DEADLINE_S = 30.0
# The time limits under test: tiny, so the tests are quick, and their outcome does not hang on them.
SHORT_S = 0.3

KEYS = [
    {"name": "kiosk", "sha256": ApiKey.hash("kiosk-secret")},
    {"name": "lobby", "sha256": ApiKey.hash("lobby-secret")},
    {"name": "ops", "sha256": ApiKey.hash("ops-secret"), "admin": True},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class AgentTestServer(TestServer):
    """The test server on the production runner (head deadline, keep-alive, JSON protocol errors)."""

    async def _make_runner(self, **kwargs: Any) -> AgentRunner:
        return AgentRunner(self.app, http=self.app[SETTINGS].http, **kwargs)


class FakeBatches:
    """The real generation, except: prompt "big" gives large noise images, "boom" raises, and the
    model thread can be held at a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        rng = np.random.default_rng(0)
        # Noise does not compress: ~3 MB of PNG each, far past what socket buffers hold.
        self.noise = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))

    def __call__(self, pipe: Any, requests: Any, **kwargs: Any) -> list[Any]:
        prompts = {r.prompt for r in requests}
        if "boom" in prompts:
            raise RuntimeError("the model fell over")
        self.entered.set()
        assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        results = default_batch_fn(pipe, requests, **kwargs)
        if "big" in prompts:
            results = [dataclasses.replace(r, images=[self.noise] * len(r.images)) for r in results]
        return results

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, DEADLINE_S)


StartAgent = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def batches() -> FakeBatches:
    return FakeBatches()


@pytest.fixture
def start(aiohttp_client, tiny_model_dir: Path, batches: FakeBatches) -> StartAgent:
    async def start(**overrides: Any) -> TestClient:
        app = create_app(AgentSettings(model=str(tiny_model_dir), **overrides), batch_fn=batches)
        client = await aiohttp_client(AgentTestServer(app))
        await asyncio.wait_for(app[STATE].warmed.wait(), WARM_TIMEOUT_S)
        assert app[STATE].failed is None, app[STATE].failed
        return client

    return start


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``predicate`` until it holds; a failure after DEADLINE_S names ``what``."""
    deadline = time.monotonic() + DEADLINE_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # a poll interval, not a wait for something to happen


async def metrics_text(client: TestClient, **headers: str) -> str:
    return await (await client.get("/metrics", headers=headers)).text()


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def exchange(client: TestClient, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE_S)
    finally:
        writer.close()


def post_head(client: TestClient, path: str, length: int, **headers: str) -> bytes:
    fields = {"Host": f"127.0.0.1:{client.port}", "Content-Type": "application/json", "Content-Length": str(length),
              "Connection": "close", **headers}  # fmt: skip
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


# --- 1. every malformed body is a 400 in the JSON error shape ---------------------------------------

MALFORMED = {
    "integer past Python's 4300-digit limit": b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}",
    "nested 50,000 deep": b"[" * 50_000 + b"]" * 50_000,
    "bare NaN": b'{"prompt": "x", "guidance": NaN}',
    "bare Infinity": b'{"prompt": "x", "cfg_scale": Infinity}',
    "bare -Infinity": b'{"prompt": "x", "steps": -Infinity}',
}
BODY_ROUTES = ["/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img", "/admin/model"]


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_json_is_a_400_on_every_route(start, body: bytes) -> None:
    client = await start()
    for path in BODY_ROUTES:
        response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400, (path, await response.text())
        assert response.content_type == "application/json"
        error = error_of(path, await response.json())
        assert error["code"] == "invalid_json"
        assert "sys.set_int_max_str_digits" not in error["message"]
    assert (await client.get("/readyz")).status == 200


async def test_unreadable_bodies_are_400_json(start) -> None:
    client = await start()
    corrupt = b"\x78\x9c this is not deflate data"
    raw = await exchange(client, post_head(client, "/v1/generate", len(corrupt), **{"Content-Encoding": "deflate"})
                         + corrupt)  # fmt: skip
    status, headers, body = parse_answer(raw)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "invalid_body"
    # A deflate body that is valid is read as usual.
    packed = zlib.compress(json.dumps({"prompt": "x", "width": 70}).encode())
    raw = await exchange(client, post_head(client, "/v1/generate", len(packed), **{"Content-Encoding": "deflate"})
                         + packed)  # fmt: skip
    assert parse_answer(raw)[0] == 422
    # Chunked framing that aiohttp itself rejects, before the app sees the request.
    head = post_head(client, "/v1/generate", 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    status, headers, body = parse_answer(await exchange(client, head + b"zz\r\nabc\r\n0\r\n\r\n"))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert set(json.loads(body)["error"]) == {"code", "message"}


async def test_openai_size_with_thousands_of_digits_is_a_422(start) -> None:
    client = await start()
    response = await client.post("/v1/images/generations", json={"prompt": "x", "size": "9" * 5000 + "x64"})
    assert response.status == 422
    assert (await response.json())["error"]["field"] == "size"


# --- 2. slow and stalled clients are dropped -------------------------------------------------------


async def test_a_request_head_must_arrive_in_time(start) -> None:
    client = await start(http={"header_timeout_s": SHORT_S, "keepalive_timeout_s": 600})
    # Part of a head, then nothing: a 408 in the JSON shape, then the connection closes.
    status, headers, body = parse_answer(await exchange(client, b"POST /v1/generate HTTP/1.1\r\nHost: 127.0"))
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "header_timeout"
    # Connecting and sending nothing: closed without an answer.
    assert await exchange(client, b"") == b""
    # After a complete request on a kept-alive connection, the next head has its own deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\n\r\n".encode())
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    assert first.startswith(b"HTTP/1.1 200")
    length = int(parse_answer(first)[1]["content-length"])
    await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
    writer.write(b"GET /healthz HT")
    rest = await asyncio.wait_for(reader.read(), DEADLINE_S)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 408")


async def test_idle_keepalive_connections_are_closed(start) -> None:
    client = await start(http={"keepalive_timeout_s": SHORT_S, "header_timeout_s": 300})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S)  # the answer, then the close
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" not in answer  # kept alive, then closed for idling


async def test_a_slow_body_is_a_408(start) -> None:
    client = await start(http={"body_timeout_s": SHORT_S})
    raw = await exchange(client, post_head(client, "/v1/generate", 100) + b'{"prompt":')
    status, headers, body = parse_answer(raw)
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "body_timeout"


async def test_an_sse_client_that_does_not_read_is_dropped(start, caplog: pytest.LogCaptureFixture) -> None:
    client = await start(http={"sse_write_timeout_s": SHORT_S}, cache={"max_bytes": 0})
    body = json.dumps({**SMALL, "prompt": "big", "n": 3, "stream": True}).encode()
    sock = socket.socket()
    # A small receive window, so the server's writes back up after a few kilobytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.port))
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    with caplog.at_level(logging.INFO):
        writer.write(post_head(client, "/v1/generate", len(body)) + body)  # and never read a byte
        dropped = 'zimage_requests_total{route="/v1/generate",status="499"} 1.0'

        async def was_dropped() -> bool:
            return dropped in await metrics_text(client)

        await until(was_dropped, "the stalled stream to be dropped")
    writer.close()
    assert any(r.getMessage() == "sse_client_stalled" for r in caplog.records)
    scheduler = client.server.app[SCHEDULER]
    assert not scheduler.pending
    assert not scheduler.running


# --- 3. client aborts are 499, not 500 --------------------------------------------------------------


async def test_a_client_that_hangs_up_is_counted_as_499(
    start, batches: FakeBatches, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start()
    batches.hold()
    body = json.dumps(SMALL).encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    with caplog.at_level(logging.INFO, logger="edge_agent.access"):
        writer.write(post_head(client, "/v1/generate", len(body)) + body)
        await batches.wait_entered()
        writer.close()  # hang up while the model works

        async def counted() -> bool:
            return 'zimage_requests_total{route="/v1/generate",status="499"} 1.0' in await metrics_text(client)

        await until(counted, "the abort to be counted")
    batches.gate.set()
    text = await metrics_text(client)
    assert 'route="/v1/generate",status="500"' not in text
    done = [r.__dict__ for r in caplog.records if r.getMessage() == "request_done"]
    assert [line["status"] for line in done if line["path"] == "/v1/generate"] == [499]


# --- 4. /metrics is for admins when keys are configured ---------------------------------------------


async def test_metrics_need_an_admin_key(start) -> None:
    client = await start(api_keys=KEYS)
    assert (await client.get("/metrics")).status == 401
    refused = await client.get("/metrics", headers=bearer("kiosk-secret"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "forbidden"
    scraped = await client.get("/metrics", headers=bearer("ops-secret"))
    assert scraped.status == 200
    assert "zimage_requests_total" in await scraped.text()
    for probe in ("/healthz", "/readyz"):
        assert (await client.get(probe)).status == 200, probe


# --- 5. browsers: JSON only, same origin only, loopback names only without keys ----------------------


async def test_posts_must_be_json(start) -> None:
    client = await start()
    # What a cross-site <form> or a no-cors fetch can send without a preflight.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = await client.post(
            "/admin/model", data=json.dumps({"model": "/elsewhere"}), headers={"Content-Type": content_type}
        )
        assert response.status == 415, content_type
        assert (await response.json())["error"]["code"] == "unsupported_media_type"
    response = await client.post("/v1/generate", data=b"{}", headers={"Content-Type": "text/plain"})
    assert response.status == 415
    json_charset = {"Content-Type": "application/json; charset=utf-8"}
    assert (await client.post("/v1/generate", data=json.dumps(SMALL), headers=json_charset)).status == 200


@pytest.mark.parametrize("keys", [[], KEYS], ids=["no keys", "keys"])
async def test_posts_from_other_origins_are_refused(start, keys: list) -> None:
    client = await start(api_keys=keys)
    auth = bearer("ops-secret") if keys else {}
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{client.port + 1}", "https://localhost"):
        response = await client.post("/admin/model", json={"model": "/elsewhere"}, headers={"Origin": origin, **auth})
        assert response.status == 403, origin
        assert (await response.json())["error"]["code"] == "cross_origin"
    same = {"Origin": f"http://127.0.0.1:{client.port}", **auth}
    assert (await client.post("/v1/generate", json=SMALL, headers=same)).status == 200
    # Reading is not refused: a cross-origin page cannot see the answer without CORS anyway.
    assert (await client.get("/v1/models", headers={"Origin": "http://evil.example", **auth})).status == 200


async def test_public_url_is_an_accepted_origin(start) -> None:
    client = await start(public_url="https://agent.site.example/zimage")
    response = await client.post("/v1/generate", json=SMALL, headers={"Origin": "https://agent.site.example"})
    assert response.status == 200


async def test_dns_rebinding_is_refused_without_keys(start) -> None:
    client = await start()
    for host in ("evil.example", f"evil.example:{client.port}", "127.0.0.1.evil.example", "0.0.0.0", "bad host"):
        response = await client.get("/v1/models", headers={"Host": host})
        assert response.status == 421, host
        assert (await response.json())["error"]["code"] == "misdirected_request"
    for host in (f"localhost:{client.port}", "127.0.0.1", f"[::1]:{client.port}", "app.localhost"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host
    for probe in ("/healthz", "/readyz"):  # kubelets probe by pod IP
        assert (await client.get(probe, headers={"Host": "10.42.0.7:8188"})).status == 200, probe
    keyed = await start(api_keys=KEYS)
    assert (await keyed.get("/v1/models", headers={"Host": "node-7.site.example", **bearer("kiosk-secret")})).ok


# --- 6. image links: from configuration, for their owner, bounded -----------------------------------


async def test_image_links_ignore_the_host_header(start) -> None:
    client = await start(api_keys=KEYS)
    ask = {"prompt": "x", "size": "64x64", "response_format": "url"}
    headers = {"Host": "evil.example", **bearer("kiosk-secret")}
    answer = await (await client.post("/v1/images/generations", json=ask, headers=headers)).json()
    link = URL(answer["data"][0]["url"])
    assert (link.host, link.port) == ("127.0.0.1", client.port)
    configured = await start(api_keys=KEYS, public_url="https://agent.site.example/zimage/")
    answer = await (await configured.post("/v1/images/generations", json=ask, headers=headers)).json()
    assert answer["data"][0]["url"].startswith("https://agent.site.example/zimage/v1/images/")


async def test_stored_images_are_readable_by_their_owner_only(start) -> None:
    client = await start(api_keys=KEYS)
    ask = {"prompt": "x", "size": "64x64", "response_format": "url"}
    answer = await (await client.post("/v1/images/generations", json=ask, headers=bearer("kiosk-secret"))).json()
    path = URL(answer["data"][0]["url"]).path
    own = await client.get(path, headers=bearer("kiosk-secret"))
    assert own.status == 200
    assert decode_image(await own.read()).size == (64, 64)
    other = await client.get(path, headers=bearer("lobby-secret"))
    assert other.status == 404  # as if it did not exist
    assert (await other.json()) == (await (await client.get("/v1/images/nope", headers=bearer("lobby-secret"))).json())
    assert (await client.get(path, headers=bearer("ops-secret"))).status == 200


def test_image_store_is_bounded_in_bytes() -> None:
    now = [0.0]
    store = ImageStore(ttl_s=60, max_bytes=100, clock=lambda: now[0])
    first = store.put(b"a" * 40, "image/png", "kiosk")
    second = store.put(b"b" * 40, "image/png", "kiosk")
    third = store.put(b"c" * 40, "image/png", "kiosk")
    assert store.get(first, reader="kiosk") is None  # the oldest went to make room
    assert store.get(second, reader="kiosk") is not None
    assert store.get(third, reader="lobby") is None
    assert store.get(third, reader="lobby", admin=True) is not None
    assert store.total_bytes == 80
    now[0] = 61
    assert store.get(third, reader="kiosk") is None
    assert store.total_bytes == 0
    floor = AgentSettings.model_fields["image_store_max_bytes"].metadata
    assert any(getattr(m, "ge", 0) >= 2048 * 2048 * 3 for m in floor)  # the largest image always fits


def test_public_base_url_comes_from_configuration(tiny_model_dir: Path) -> None:
    plain = AgentSettings(model=str(tiny_model_dir), port=0)
    assert public_base_url(plain, ("127.0.0.1", 8188)) == "http://127.0.0.1:8188"
    assert public_base_url(plain, ("::1", 8188, 0, 0)) == "http://[::1]:8188"
    assert public_base_url(AgentSettings(model=str(tiny_model_dir), port=9000), None) == "http://127.0.0.1:9000"
    proxied = AgentSettings(model=str(tiny_model_dir), public_url="https://a.example/agent/")
    assert public_base_url(proxied, ("127.0.0.1", 8188)) == "https://a.example/agent"


# --- 7. streams carry the request id and report every failure ---------------------------------------


def sse_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_streams_carry_the_request_id_and_end_with_an_error_event(
    start, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start()
    headers = {"X-Request-ID": "site-a:cam-7:9"}
    ok = await client.post("/v1/generate", json={**SMALL, "stream": True, "steps": 2}, headers=headers)
    assert ok.headers["X-Request-ID"] == "site-a:cam-7:9"
    assert sse_events(await ok.text())[-1][0] == "result"
    with caplog.at_level(logging.INFO):
        failed = await client.post("/v1/generate", json={**SMALL, "prompt": "boom", "stream": True})
        events = sse_events(await failed.text())
    assert failed.headers["X-Request-ID"]
    assert [name for name, _ in events] == ["queued", "error"]
    assert events[-1][1]["error"]["code"] == "internal_error"
    logged = [r for r in caplog.records if r.getMessage() == "stream_failed"]
    assert logged
    assert logged[0].exc_info is not None


# --- 8. A1111: strict known fields, only they are echoed ---------------------------------------------


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in an answer")

    return json.loads(text, parse_constant=refuse)


async def test_a1111_echoes_only_validated_fields(start) -> None:
    client = await start()
    payload = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 3, "sampler_name": "Euler a",
               "alwayson_scripts": {"deep": [[[1e308]]]}, "restore_faces": False}  # fmt: skip
    response = await client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status == 200, await response.text()
    answer = strict_json(await response.text())
    assert set(answer["parameters"]) == {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height",
                                         "seed", "batch_size", "n_iter"}  # fmt: skip
    info = strict_json(answer["info"])
    assert info["ignored_fields"] == ["alwayson_scripts", "restore_faces", "sampler_name"]
    defaults = await (await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})).json()
    assert defaults["parameters"]["steps"] == GenerationRequest.model_fields["steps"].default


A1111_BAD: list[tuple[dict[str, Any], str | None]] = [
    ({"batch_size": -2, "n_iter": -1}, "batch_size"),  # negatives used to multiply to a positive count
    ({"n_iter": 0}, "n_iter"),
    ({"batch_size": MAX_IMAGES + 1}, "batch_size"),
    ({"batch_size": 4, "n_iter": 4}, None),  # each fine, the product is not
    ({"steps": True}, "steps"),  # used to run one step
    ({"steps": "8"}, "steps"),
    ({"width": 64.0}, "width"),
    ({"cfg_scale": "1"}, "cfg_scale"),
    ({"seed": -7}, "seed"),
]


async def test_a1111_known_fields_are_strict(start) -> None:
    client = await start()
    for patch, field in A1111_BAD:
        response = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, **patch})
        assert response.status == 422, (patch, await response.text())
        error = error_of("/sdapi/v1/txt2img", await response.json())
        assert error.get("field") == field, patch
        if field is None:
            assert "batch_size * n_iter" in error["message"]
