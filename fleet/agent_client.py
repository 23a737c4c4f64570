"""The node sidecar's view of its agent: plain HTTP to ``/readyz``, ``/metrics``, ``/v1/models`` and
``POST /admin/model``, never an import of ``edge_agent``: a crashed agent does not silence the node's
telemetry, and the sidecar needs no model stack. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from fleet.protocol import MAX_NAME_CHARS, AgentHealth, RunningModel
from zimage_edge.errors import ZimageEdgeError

# A probe that takes longer than this says the agent is not healthy enough to count on.
PROBE_TIMEOUT_S = 5.0
# A swap loads a model: minutes for the real 6 B transformer on a small node's disk.
SWAP_TIMEOUT_S = 900.0


class AgentError(ZimageEdgeError):
    """The agent refused or failed a request; ``status`` is its HTTP status (0: unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AgentClient:
    session: aiohttp.ClientSession
    base_url: str
    api_key: str | None = None  # an admin key when the agent has keys (swaps and /metrics need it)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _get(self, path: str) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        return await self.session.get(f"{self.base_url}{path}", headers=self._headers(), timeout=timeout)

    async def health(self) -> AgentHealth:
        """Alive, ready and why (an unreachable agent is neither)."""
        try:
            async with await self._get("/readyz") as ready:
                reason = (await ready.json()).get("status", "")
                is_ready = ready.status == 200
            async with await self._get("/healthz") as alive:
                is_alive = alive.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return AgentHealth(alive=False, ready=False, reason=f"unreachable: {exc.__class__.__name__}")
        return AgentHealth(alive=is_alive, ready=is_ready, reason=str(reason)[:MAX_NAME_CHARS] or None)

    async def running(self) -> RunningModel | None:
        found = await self.running_with_source()
        return found[0] if found else None

    async def running_with_source(self) -> tuple[RunningModel, str] | None:
        """The model the agent serves, and where it loaded it from (for a swap back to it)."""
        try:
            async with await self._get("/v1/models") as response:
                if response.status != 200:
                    return None
                data: dict[str, Any] = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not data.get("data"):
            return None
        entry = data["data"][0]
        model = RunningModel(
            artifact_id=entry["artifact_id"], variant=entry["variant"], dtype=entry["dtype"], device=entry["device"]
        )
        return model, str(entry["source"])

    async def metrics_text(self) -> str | None:
        try:
            async with await self._get("/metrics") as response:
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def swap(self, model_dir: str) -> dict[str, Any]:
        """Ask the agent to load ``model_dir`` (its own swap keeps the old model on failure)."""
        timeout = aiohttp.ClientTimeout(total=SWAP_TIMEOUT_S)
        try:
            async with self.session.post(
                f"{self.base_url}/admin/model", json={"model": model_dir}, headers=self._headers(), timeout=timeout
            ) as response:
                body: dict[str, Any] = await response.json()
                if response.status != 200:
                    message = body.get("error", {}).get("message", str(body))
                    raise AgentError(response.status, f"the agent refused the swap: {message}")
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentError(0, f"the agent did not answer the swap: {exc.__class__.__name__}") from exc

    async def wait_ready(self, timeout_s: float) -> AgentHealth:
        """Poll ``/readyz`` until ready or ``timeout_s``; returns the last health seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = await self.health()
            if health.ready or time.monotonic() >= deadline:
                return health
            await asyncio.sleep(0.2)  # a probe five times a second is nothing to the agent
