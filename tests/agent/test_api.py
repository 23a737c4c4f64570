"""Each API end to end over a real socket, including the official openai SDK and the SSE stream."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from yarl import URL

from tests.agent.conftest import SMALL, decode_image


async def test_native_json(start_agent) -> None:
    client = await start_agent()
    response = await client.post("/v1/generate", json={**SMALL, "seed": 5, "n": 2, "width": 96})
    assert response.status == 200, await response.text()
    assert response.headers["X-Request-ID"]
    body = await response.json()
    assert [img["seed"] for img in body["images"]] == [5, 6]
    assert body["mime"] == "image/png"
    assert decode_image(body["images"][0]["b64"]).size == (96, 64)
    assert body["timings"]["steps"] == 8
    assert body["cached"] is False


async def test_native_image_bytes_and_formats(start_agent) -> None:
    client = await start_agent()
    response = await client.post("/v1/generate", json={**SMALL, "seed": 1}, headers={"Accept": "image/png"})
    assert response.status == 200
    assert response.content_type == "image/png"
    assert response.headers["X-Seed"] == "1"
    assert decode_image(await response.read()).format == "PNG"
    response = await client.post("/v1/generate", json={**SMALL, "seed": 1, "output_format": "jpeg"})
    body = await response.json()
    assert body["mime"] == "image/jpeg"
    assert decode_image(body["images"][0]["b64"]).format == "JPEG"
    response = await client.post("/v1/generate", json={**SMALL, "n": 2}, headers={"Accept": "image/png"})
    assert response.status == 406
    assert (await response.json())["error"]["field"] == "n"


async def test_same_seed_same_image_over_http(start_agent) -> None:
    client = await start_agent(cache={"max_bytes": 0})
    images = []
    for _ in range(2):
        body = await (await client.post("/v1/generate", json={**SMALL, "seed": 9})).json()
        images.append(np.asarray(decode_image(body["images"][0]["b64"])))
    assert np.array_equal(images[0], images[1])


async def test_sse_stream(start_agent) -> None:
    client = await start_agent()
    response = await client.post("/v1/generate", json={**SMALL, "seed": 3, "stream": True, "steps": 4})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    text = await response.text()
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    assert events[0][0] == "queued"
    assert [e[1]["step"] for e in events if e[0] == "progress"] == [1, 2, 3, 4]
    assert events[-1][0] == "result"
    assert events[-1][1]["images"][0]["seed"] == 3


async def test_sse_by_accept_header_and_errors_before_the_stream(start_agent) -> None:
    client = await start_agent()
    headers = {"Accept": "text/event-stream"}
    response = await client.post("/v1/generate", json={**SMALL, "steps": 2}, headers=headers)
    assert response.content_type == "text/event-stream"
    assert "event: result" in await response.text()
    bad = await client.post("/v1/generate", json={**SMALL, "width": 65}, headers=headers)
    assert bad.status == 422
    assert bad.content_type == "application/json"


async def test_openai_sdk_unchanged(start_agent) -> None:
    from openai import OpenAI

    client = await start_agent()
    sdk = OpenAI(base_url=str(client.make_url("/v1")), api_key="not-needed-on-loopback", max_retries=0)

    def call(**kwargs):
        return sdk.images.generate(model="z-image-turbo", prompt="a lighthouse", size="64x64", **kwargs)

    # The SDK is synchronous: run it off the event loop that serves it.
    result = await asyncio.to_thread(call, n=2, response_format="b64_json")
    assert len(result.data) == 2
    assert decode_image(result.data[0].b64_json).size == (64, 64)
    by_url = await asyncio.to_thread(call, response_format="url")
    fetched = await client.get(URL(by_url.data[0].url).path)
    assert fetched.status == 200
    assert decode_image(await fetched.read()).size == (64, 64)


async def test_openai_bad_size(start_agent) -> None:
    client = await start_agent()
    response = await client.post("/v1/images/generations", json={"prompt": "x", "size": "large"})
    assert response.status == 422
    assert (await response.json())["error"]["field"] == "size"
    response = await client.post("/v1/images/generations", json={"prompt": "x", "size": "100x64"})
    assert response.status == 422
    assert (await response.json())["error"]["field"] == "width"


async def test_a1111_txt2img(start_agent) -> None:
    client = await start_agent()
    payload = {"prompt": "a cat", "width": 64, "height": 80, "steps": 4, "seed": 11, "batch_size": 2,
               "cfg_scale": 0, "sampler_name": "Euler a", "restore_faces": False}  # fmt: skip
    response = await client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert len(body["images"]) == 2
    assert decode_image(body["images"][1]).size == (64, 80)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12]
    assert info["ignored_fields"] == ["restore_faces", "sampler_name"]
    assert body["parameters"]["prompt"] == "a cat"
    random_seed = await (await client.post("/sdapi/v1/txt2img", json={**payload, "seed": -1})).json()
    assert json.loads(random_seed["info"])["seed"] >= 0


async def test_models_health_ready_metrics_openapi(start_agent) -> None:
    client = await start_agent(node_name="site-a-01")
    assert (await (await client.get("/healthz")).json()) == {"status": "alive"}
    assert (await client.get("/readyz")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    entry = models["data"][0]
    assert entry["object"] == "model"
    assert entry["node"] == "site-a-01"
    assert entry["dtype"] == "float32"
    await client.post("/v1/generate", json=SMALL)
    metrics = await (await client.get("/metrics")).text()
    for name in ("pending_generation_tasks", "zimage_requests_total", "zimage_queue_wait_seconds_bucket",
                 "zimage_batch_images_bucket", "zimage_images_generated_total", "zimage_model_info",
                 "zimage_model_load_seconds", "zimage_request_seconds_bucket"):  # fmt: skip
        assert name in metrics, name
    assert 'zimage_requests_total{route="/v1/generate",status="200"} 1.0' in metrics
    # Gauges read live state: ready (warm, not swapping or draining), nothing left queued.
    assert "\nzimage_ready 1.0\n" in metrics
    assert "\npending_generation_tasks 0.0\n" in metrics
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    schemas = spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for operation in item.values():
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if ref:
                assert ref["$ref"].rsplit("/", 1)[1] in schemas, path
    assert "width" in schemas["NativeGenerate"]["properties"]
    page = await client.get("/")
    assert page.content_type == "text/html"
    assert "/v1/generate" in await page.text()


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img"])
async def test_every_api_generates_the_same_image_for_a_seed(start_agent, path: str) -> None:
    client = await start_agent(cache={"max_bytes": 0})
    native = await (await client.post("/v1/generate", json={**SMALL, "seed": 21})).json()
    expected = np.asarray(decode_image(native["images"][0]["b64"]))
    body = {"prompt": SMALL["prompt"], "seed": 21}
    if path == "/v1/images/generations":
        body["size"] = "64x64"
    else:
        body.update(width=64, height=64)
    response = await (await client.post(path, json=body)).json()
    b64 = {
        "/v1/generate": lambda r: r["images"][0]["b64"],
        "/v1/images/generations": lambda r: r["data"][0]["b64_json"],
        "/sdapi/v1/txt2img": lambda r: r["images"][0],
    }[path](response)
    assert np.array_equal(np.asarray(decode_image(b64)), expected)


async def test_request_id_is_propagated_and_logged(start_agent, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from edge_agent.logs import JsonFormatter

    client = await start_agent()
    with caplog.at_level(logging.INFO, logger="edge_agent.access"):
        response = await client.post("/v1/generate", json=SMALL, headers={"X-Request-ID": "site-a:cam-7:42"})
    assert response.headers["X-Request-ID"] == "site-a:cam-7:42"
    done = [r for r in caplog.records if r.getMessage() == "request_done"]
    line = json.loads(JsonFormatter().format(done[-1]))
    assert line["event"] == "request_done"
    assert line["request_id"] == "site-a:cam-7:42"
    assert line["status"] == 200
    assert line["path"] == "/v1/generate"
    assert line["duration_sec"] > 0
    odd = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert odd.headers["X-Request-ID"] != "bad id with spaces"  # replaced, never echoed unchecked
