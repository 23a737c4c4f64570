"""Typed keys of every object an app holds (no module-level globals), all in this one module."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from edge_agent.auth import Authenticator
from edge_agent.cache import ResultCache
from edge_agent.images import ImageStore
from edge_agent.metrics import Metrics
from edge_agent.runner import ModelRunner
from edge_agent.scheduler import Scheduler
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState
from quantize.identity import ModelIdentity
from zimage_edge.cpu import ThreadDecision

SETTINGS = web.AppKey("settings", AgentSettings)
METRICS = web.AppKey("metrics", Metrics)
RUNNER = web.AppKey("runner", ModelRunner)
SCHEDULER = web.AppKey("scheduler", Scheduler)
STATE = web.AppKey("state", AgentState)
CACHE = web.AppKey("cache", ResultCache)
AUTH = web.AppKey("auth", Authenticator)
IMAGES = web.AppKey("images", ImageStore)
DENY = web.AppKey("deny", list[re.Pattern[str]])
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")  # monotonic seconds; tests inject their own
SWAP_LOCK = web.AppKey("swap_lock", asyncio.Lock)
SWAPS = web.AppKey("swaps", set[asyncio.Task[dict[str, Any]]])  # swaps in flight, owned by the app
PAGE = web.AppKey("page", str)
MODELS = web.AppKey("models", dict[str, ModelIdentity])  # every model this node has served, by artifact_id
CPU_THREADS = web.AppKey("cpu_threads", ThreadDecision)  # the thread policy this process runs under

# Per-request values left by the auth middleware.
CALLER = web.RequestKey("caller", str)
ADMIN = web.RequestKey("admin", bool)
# Set by a handler whose client left in the middle of a streamed answer.
CLIENT_LEFT = web.RequestKey("client_left", bool)
