"""API keys (stored hashed, compared in constant time), per-key token buckets and usage metering."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edge_agent.settings import ApiKey

Clock = Callable[[], float]


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; one token per request."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token; returns 0 when granted, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Usage:
    requests: int = 0
    images: int = 0
    megapixel_steps: float = 0.0
    gpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "images": self.images,
            "megapixel_steps": round(self.megapixel_steps, 4),
            "gpu_seconds": round(self.gpu_seconds, 4),
        }


@dataclass
class Authenticator:
    keys: list[ApiKey]
    clock: Clock = time.monotonic
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)

    def identify(self, presented: str | None) -> ApiKey | None:
        """The key whose hash matches ``presented``; every stored hash is compared, in constant time."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def rate_limit(self, key: ApiKey) -> float:
        """0 when the request may go, else seconds to wait."""
        if key.rate_per_minute is None:
            return 0.0
        now = self.clock()
        bucket = self.buckets.get(key.name)
        if bucket is None:
            bucket = self.buckets[key.name] = TokenBucket(
                rate=key.rate_per_minute / 60, capacity=key.burst, tokens=key.burst, updated=now
            )
        return bucket.take(now)

    def record(self, name: str, *, images: int, megapixel_steps: float, gpu_seconds: float) -> None:
        usage = self.usage.setdefault(name, Usage())
        usage.requests += 1
        usage.images += images
        usage.megapixel_steps += megapixel_steps
        usage.gpu_seconds += gpu_seconds


def presented_key(headers: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer KEY`` (what OpenAI clients send) or ``X-API-Key: KEY``."""
    get = headers.get
    auth = get("Authorization", "") or ""
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip())
    key = get("X-API-Key")
    return str(key) if key else None
