"""The sidecar's HTTP view of a real agent (tiny model, loopback), and of an agent that is not there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from edge_agent.app import create_app
from edge_agent.keys import STATE
from edge_agent.settings import AgentSettings, ApiKey
from fleet.agent_client import AgentClient, AgentError
from fleet.telemetry import AgentWatch, parse_metrics
from zimage_edge.model.toy import save_toy_model

KEYS = [{"name": "node", "sha256": ApiKey.hash("node-secret"), "admin": True}]
WAIT_S = 60


@pytest.fixture
async def agent(aiohttp_server, tiny_model_dir: Path):
    app = create_app(AgentSettings(model=str(tiny_model_dir), api_keys=KEYS))
    server = await aiohttp_server(app)
    await asyncio.wait_for(app[STATE].warmed.wait(), WAIT_S)
    return str(server.make_url("")).rstrip("/")


async def test_health_model_metrics_and_a_swap(agent: str, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        client = AgentClient(session, agent, api_key="node-secret")
        health = await client.health()
        assert (health.alive, health.ready) == (True, True)
        before = await client.running()
        assert before is not None
        assert len(before.artifact_id) == 64
        text = await client.metrics_text()
        assert text is not None
        assert AgentWatch().update(parse_metrics(text)).queue_depth == 0
        other = save_toy_model(tmp_path / "other", size="tiny", seed=3)
        answer = await client.swap(str(other))
        assert answer["model"]["source"] == str(other)
        after = await client.running()
        assert after is not None
        assert after.artifact_id != before.artifact_id
        with pytest.raises(AgentError, match="previous model keeps serving") as info:
            await client.swap(str(tmp_path / "missing"))
        assert info.value.status == 422
        assert (await client.wait_ready(WAIT_S)).ready


async def test_without_its_admin_key_the_sidecar_sees_no_metrics(agent: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert await AgentClient(session, agent).metrics_text() is None


async def test_an_agent_that_is_not_there(unused_tcp_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        client = AgentClient(session, f"http://127.0.0.1:{unused_tcp_port}")
        health = await client.health()
        assert (health.alive, health.ready) == (False, False)
        assert health.reason.startswith("unreachable")
        assert await client.running() is None
        with pytest.raises(AgentError) as info:
            await client.swap("/x")
        assert info.value.status == 0
