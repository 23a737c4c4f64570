"""Agents on real loopback sockets, serving the tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from edge_agent.app import create_app
from edge_agent.keys import STATE
from edge_agent.settings import AgentSettings

StartAgent = Callable[..., Awaitable[TestClient]]
# Loading the tiny model and one warm-up generation take well under a second; this bounds a hang.
WARM_TIMEOUT_S = 60


@pytest.fixture
def start_agent(aiohttp_client, tiny_model_dir: Path) -> StartAgent:
    async def start(*, loader=None, batch_fn=None, clock=None, **overrides: Any) -> TestClient:
        settings = AgentSettings(**{"model": str(tiny_model_dir), **overrides})
        kwargs: dict[str, Any] = {}
        if loader is not None:
            kwargs["loader"] = loader
        if batch_fn is not None:
            kwargs["batch_fn"] = batch_fn
        if clock is not None:
            kwargs["clock"] = clock
        app = create_app(settings, **kwargs)
        client = await aiohttp_client(app)
        await asyncio.wait_for(app[STATE].warmed.wait(), WARM_TIMEOUT_S)
        return client

    return start


def decode_image(data: bytes | str) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


class FrozenClock:
    """A monotonic clock that moves only when a test advances it (rate limits, expiry, windows)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def error_of(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """``{"code", "message", "field"}`` of an error answer, in either shape: the agent's own, or
    AUTOMATIC1111's (``{"error": code, "detail": message, "body": field, "errors"}``) under /sdapi/."""
    if path.startswith("/sdapi/"):
        assert set(body) == {"error", "detail", "body", "errors"}, body
        return {"code": body["error"], "message": body["detail"], "field": body["body"] or None}
    error: dict[str, Any] = body["error"]
    return error


SMALL = {"prompt": "a red circle on a blue background", "width": 64, "height": 64}
