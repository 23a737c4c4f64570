"""Liveness and readiness: alive once serving; ready only when warm, not swapping, not draining."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class AgentState:
    warm: bool = False
    swapping: bool = False  # a drain-then-swap is in progress (readiness down)
    draining: bool = False  # SIGTERM: finishing queued work, refusing new work
    failed: str | None = None  # the model could not be loaded at start: not alive
    lost: str | None = None  # a swap failed and the previous model could not be restored: no model
    warmed: asyncio.Event = field(default_factory=asyncio.Event)  # set once warm (or failed)
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        """What /readyz reports: the load balancer sends new traffic only to ready nodes."""
        return self.warm and not self.swapping and not self.draining and self.lost is None

    @property
    def accepting(self) -> bool:
        """Whether new work is queued: during a swap it is (it runs on the new model), while draining not."""
        return self.warm and not self.draining and self.failed is None and self.lost is None

    def reason(self) -> str:
        if self.failed is not None:
            return f"model failed to load: {self.failed}"
        if self.lost is not None:
            return f"no model loaded: {self.lost}"
        if self.draining:
            return "draining"
        if self.swapping:
            return "swapping model"
        if not self.warm:
            return "loading model"
        return "ready"
