"""The AUTOMATIC1111-compatible API with a published client library, unchanged: ``webuiapi`` against a
real agent serving the shapes model on a loopback socket."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import webuiapi

from edge_agent.settings import ApiKey
from zimage_edge.model.generate import generate_batch
from zimage_edge.shapes import PRETRAINED

WAIT_S = 60
KEYS = [
    {"name": "ops", "sha256": ApiKey.hash("ops-secret"), "admin": True},
    {"name": "kiosk", "sha256": ApiKey.hash("kiosk-secret")},
    {"name": "other", "sha256": ApiKey.hash("other-secret")},
]
PROMPT = "a red circle on a blue background"


class SteppedBatches:
    """The real ``generate_batch``, but once armed each denoising step waits for the test's go-ahead,
    so that a test can watch progress advance step by step."""

    def __init__(self) -> None:
        self.armed = False
        self.go = threading.Semaphore(0)
        self.done = 0

    def __call__(self, pipe, requests, *, on_step=None, **kwargs):
        if not self.armed:
            return generate_batch(pipe, requests, on_step=on_step, **kwargs)

        def stepped(done: int, total: int) -> None:
            if on_step is not None:
                on_step(done, total)
            self.done = done
            assert self.go.acquire(timeout=WAIT_S), "the test never let the step go"

        return generate_batch(pipe, requests, on_step=stepped, **kwargs)


async def client_for(agent, key: str) -> webuiapi.WebUIApi:
    """A webuiapi client with the key in its session, made in a thread: its constructor already calls
    the server (``scripts``), with blocking I/O."""

    def make() -> webuiapi.WebUIApi:
        api = webuiapi.WebUIApi(baseurl=str(agent.make_url("/sdapi/v1")))
        api.session.headers["Authorization"] = f"Bearer {key}"
        return api

    return await asyncio.to_thread(make)


async def poll(call, predicate, what: str):
    """Call ``call`` (blocking, in a thread) until ``predicate(result)``, within a deadline."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = await asyncio.to_thread(call)
        if predicate(result):
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {result}"


@pytest.fixture
async def agent(start_agent):
    batches = SteppedBatches()
    client = await start_agent(model=str(PRETRAINED), api_keys=KEYS, batch_fn=batches)
    client.batches = batches
    return client


async def test_models_options_txt2img_and_a_swap_there_and_back(agent, tiny_model_dir: Path, artifacts) -> None:
    ops = await client_for(agent, "ops-secret")
    models = await asyncio.to_thread(ops.get_sd_models)
    assert len(models) == 1
    first = models[0]
    identity = (await (await agent.get("/v1/models", headers={"Authorization": "Bearer ops-secret"})).json())["data"][0]
    assert first["sha256"] == identity["artifact_id"]
    assert first["hash"] == identity["artifact_id"][:10]
    assert first["title"] == f"diffusers [{first['hash']}]"
    assert first["filename"] == str(PRETRAINED)
    assert set(first) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    options = await asyncio.to_thread(ops.get_options)
    assert options["sd_model_checkpoint"] == first["title"]
    assert options["samples_format"] == "png"
    assert await asyncio.to_thread(ops.util_get_current_model) == first["title"]

    # webuiapi sends its own defaults too (512x512, steps 20, sampler "Euler a"): all accepted.
    result = await asyncio.to_thread(ops.txt2img, prompt=PROMPT, seed=7, width=64, height=64)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 7
    assert result.info["sampler_name"] == "Euler"
    assert "sampler_name" in result.info["ignored_fields"]
    assert result.parameters["prompt"] == PROMPT

    artifact = artifacts.get(tiny_model_dir, "int8")
    answer = await asyncio.to_thread(ops.set_options, {"sd_model_checkpoint": str(artifact), "sd_vae": "x"})
    assert answer == {"applied": ["sd_model_checkpoint"], "ignored": ["sd_vae"]}
    options = await asyncio.to_thread(ops.get_options)
    assert options["sd_model_checkpoint"].startswith("int8 [")
    titles = await asyncio.to_thread(ops.util_get_model_names)
    assert sorted(titles) == sorted([first["title"], options["sd_model_checkpoint"]])
    # Back by title, as A1111 clients do.
    await asyncio.to_thread(ops.util_set_model, first["title"], find_closest=False)
    assert (await asyncio.to_thread(ops.get_options))["sd_model_checkpoint"] == first["title"]
    assert (await asyncio.to_thread(ops.txt2img, prompt=PROMPT, seed=7, width=64, height=64)).image.size == (64, 64)


async def test_setting_the_checkpoint_needs_an_admin_key(agent, tiny_model_dir: Path) -> None:
    kiosk = await client_for(agent, "kiosk-secret")
    answer = await asyncio.to_thread(kiosk.set_options, {"sd_model_checkpoint": str(tiny_model_dir)})
    assert answer["error"] == "forbidden"  # A1111's error shape: error, detail, body, errors
    assert "admin key" in answer["detail"]
    assert set(answer) == {"error", "detail", "body", "errors"}
    assert (await asyncio.to_thread(kiosk.get_options))["sd_model_checkpoint"].startswith("diffusers [")
    # Other options are accepted (and ignored) without admin rights.
    assert await asyncio.to_thread(kiosk.set_options, {"sd_vae": "x"}) == {"applied": [], "ignored": ["sd_vae"]}


async def test_progress_advances_and_interrupt_ends_the_request(agent) -> None:
    kiosk, other = await client_for(agent, "kiosk-secret"), await client_for(agent, "other-secret")
    idle = await asyncio.to_thread(kiosk.get_progress)
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)
    agent.batches.armed = True
    running = asyncio.create_task(asyncio.to_thread(kiosk.txt2img, prompt=PROMPT, seed=1, steps=8, width=64, height=64))
    first = await poll(kiosk.get_progress, lambda p: p["state"]["sampling_step"] == 1, "step 1")
    assert first["state"]["sampling_steps"] == 8
    assert first["state"]["job_count"] == 1
    assert first["progress"] == pytest.approx(1 / 8)
    agent.batches.go.release()
    second = await poll(kiosk.get_progress, lambda p: p["state"]["sampling_step"] == 2, "step 2")
    assert second["progress"] == pytest.approx(2 / 8)
    assert second["eta_relative"] >= 0

    # Another key sees nothing of it and cannot stop it.
    theirs = await asyncio.to_thread(other.get_progress)
    assert (theirs["state"]["job_count"], theirs["state"]["sampling_step"]) == (0, 0)
    assert await asyncio.to_thread(other.interrupt) == {"interrupted": 0}
    agent.batches.go.release()
    await poll(kiosk.get_progress, lambda p: p["state"]["sampling_step"] == 3, "step 3 after the other key's try")

    assert await asyncio.to_thread(kiosk.interrupt) == {"interrupted": 1}
    agent.batches.go.release()  # the model thread sees the stop at the end of this step
    with pytest.raises(RuntimeError) as info:
        await asyncio.wait_for(running, WAIT_S)
    assert info.value.args[0] == 409
    assert '"interrupted"' in info.value.args[1]
    assert agent.batches.done < 8
    after = await poll(kiosk.get_progress, lambda p: p["state"]["job_count"] == 0, "the job to leave")
    assert after["progress"] == 0.0


async def test_samplers_and_schedulers_name_what_runs(agent) -> None:
    kiosk = await client_for(agent, "kiosk-secret")
    assert await asyncio.to_thread(kiosk.util_get_sampler_names) == ["Euler"]
    assert await asyncio.to_thread(kiosk.util_get_scheduler_names) == ["automatic"]
    result = await asyncio.to_thread(
        kiosk.txt2img, prompt=PROMPT, seed=3, width=64, height=64, sampler_name="Euler", scheduler="automatic"
    )
    assert result.image.size == (64, 64)
    assert await asyncio.to_thread(kiosk.skip) == {"skipped": 0}


async def test_a1111_errors_take_a1111s_shape(agent) -> None:
    response = await agent.post(
        "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 0}, headers={"Authorization": "Bearer kiosk-secret"}
    )
    assert response.status == 422
    body = await response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["error"] == "invalid_request"
    assert body["body"] == "steps"
    missing = await agent.get("/sdapi/v1/nothing", headers={"Authorization": "Bearer kiosk-secret"})
    assert (await missing.json())["error"] == "not_found"
    # The native API keeps its own shape.
    native = await agent.post("/v1/generate", json={"prompt": PROMPT, "steps": 0},
                              headers={"Authorization": "Bearer kiosk-secret"})  # fmt: skip
    assert set((await native.json())["error"]) >= {"code", "message"}
