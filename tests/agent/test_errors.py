"""Bad input on every field, malformed and oversized bodies: clear JSON errors, no model work."""

from __future__ import annotations

import pytest

from tests.agent.conftest import SMALL

BAD_FIELDS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"width": 70}, "width"),
    ({"width": "64"}, "width"),
    ({"height": 0}, "height"),
    ({"height": 4096}, "height"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance": -1}, "guidance"),
    ({"guidance": "strong"}, "guidance"),
    ({"seed": -5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"n": 0}, "n"),
    ({"n": 100}, "n"),
    ({"max_sequence_length": 5}, "max_sequence_length"),
    ({"output_format": "gif"}, "output_format"),
    ({"stream": "yes"}, "stream"),
    ({"unknown": 1}, "unknown"),
]


@pytest.fixture
async def client(start_agent):
    return await start_agent(guard={"max_side": 1024, "deny": [r"\bforbidden\b"], "max_prompt_chars": 100})


@pytest.mark.parametrize(("patch", "field"), BAD_FIELDS)
async def test_bad_field_is_named(client, patch: dict, field: str) -> None:
    response = await client.post("/v1/generate", json={**SMALL, **patch})
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert field in error["message"]


async def test_missing_prompt(client) -> None:
    response = await client.post("/v1/generate", json={"width": 64})
    assert (await response.json())["error"]["field"] == "prompt"


async def test_no_model_work_for_bad_input(client) -> None:
    await client.post("/v1/generate", json={**SMALL, "width": 70})
    metrics = await (await client.get("/metrics")).text()
    assert "zimage_images_generated_total 0.0" in metrics
    assert "zimage_batch_images_count 0.0" in metrics  # the warm-up runs outside the queue


async def test_malformed_json(client) -> None:
    response = await client.post("/v1/generate", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"
    response = await client.post("/v1/generate", json=["a", "list"])
    assert response.status == 422


async def test_oversized_body(start_agent) -> None:
    client = await start_agent(max_body_bytes=2048)
    response = await client.post("/v1/generate", json={**SMALL, "prompt": "x" * 5000})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert (await client.post("/v1/generate", json=SMALL)).status == 200  # and the slot is free


async def test_prompt_guard_names_the_rule(client) -> None:
    response = await client.post("/v1/generate", json={**SMALL, "prompt": "a FORBIDDEN thing"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "prompt_rejected"
    assert "forbidden" in error["message"]
    long = await client.post("/v1/generate", json={**SMALL, "prompt": "y" * 101})
    assert long.status == 400
    assert "rule: length" in (await long.json())["error"]["message"]


async def test_site_size_limit(client) -> None:
    response = await client.post("/v1/generate", json={**SMALL, "width": 1280})
    assert response.status == 422
    assert (await response.json())["error"]["message"] == "width: at most 1024 on this node"


async def test_unknown_route_and_method_are_json(client) -> None:
    missing = await client.get("/v2/nothing")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.get("/v1/generate")
    assert wrong.status == 405
    assert "error" in await wrong.json()


async def test_a1111_and_openai_validation(client) -> None:
    response = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 63})
    assert response.status == 422
    assert (await response.json())["body"] == "width"  # A1111's error shape on its routes
    response = await client.post("/v1/images/generations", json={"prompt": "x", "n": 0})
    assert (await response.json())["error"]["field"] == "n"
    response = await client.post("/v1/images/generations", json={"prompt": "x", "colour": "red"})
    assert (await response.json())["error"]["field"] == "colour"


async def test_the_process_serves_on_after_bad_input(client) -> None:
    for patch, _field in BAD_FIELDS:
        await client.post("/v1/generate", json={**SMALL, **patch})
    assert (await client.post("/v1/generate", json=SMALL)).status == 200
    assert (await client.get("/readyz")).status == 200
