"""SIGTERM in a real ``zimage-edge serve`` process: queued and running work finishes, new work gets
503, readiness drops, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

WAIT_S = 60
# 50 steps at 512x512 keep each job on the tiny model busy for a few hundred milliseconds: long
# enough that the drain is still running when the test sends new work.
SLOW = {"prompt": "a slow one", "width": 512, "height": 512, "steps": 50, "stream": True}


async def _log_event(stream: asyncio.StreamReader, event: str) -> dict:
    while True:
        line = await asyncio.wait_for(stream.readline(), WAIT_S)
        assert line, f"the agent exited before logging {event}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == event:
            return record


async def _stream_until(response: aiohttp.ClientResponse, event: str) -> list[str]:
    seen = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("event: "):
            seen.append(line[7:])
            if line[7:] == event:
                return seen
    return seen


async def test_sigterm_drains_then_exits_zero(tiny_model_dir: Path) -> None:
    env = {**os.environ, "ZIMAGE_QUEUE__MAX_BATCH": "1", "ZIMAGE_DRAIN_GRACE_S": "60"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zimage_edge.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        listening = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode()
        base = listening.strip().rsplit(" ", 1)[1]
        await _log_event(proc.stderr, "model_loaded")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session:
            streams = []
            for seed in range(3):
                response = await session.post(f"{base}/v1/generate", json={**SLOW, "seed": seed})
                assert response.status == 200
                assert await _stream_until(response, "queued") == ["queued"]
                streams.append(response)
            proc.send_signal(signal.SIGTERM)
            await _log_event(proc.stderr, "drain_started")
            refused = await session.post(f"{base}/v1/generate", json={**SLOW, "stream": False})
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "not_ready"
            ready = await session.get(f"{base}/readyz")
            assert ready.status == 503
            assert (await ready.json())["status"] == "draining"
            for response in streams:
                events = await _stream_until(response, "result")
                assert events[-1] == "result"
                assert events.count("progress") >= 1
                await response.read()  # the end of the stream
                response.release()
            refused.release()
            ready.release()
        drained = await _log_event(proc.stderr, "drain_done")
        assert drained["cancelled"] == 0
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
