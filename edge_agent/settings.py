"""The agent's settings: one pydantic-settings model, from a TOML file and ``ZIMAGE_*`` variables.

Environment variables are read here and nowhere else. Nested fields use ``__``
(``ZIMAGE_QUEUE__MAX_BATCH=4``). Precedence: command-line flags, then the environment, then the file.
Validation is strict (``extra="forbid"``) and cross-field: binding to anything but loopback without
API keys is refused, because the agent would then be open to the site.
"""

from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zimage_edge.cpu import CpuPolicy
from zimage_edge.request import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SIDE, MIN_SIDE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiKey(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="who holds the key")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the key (zimage-edge hash-key); never the key itself"
    )
    rate_per_minute: float | None = Field(default=None, gt=0, description="requests per minute (token bucket)")
    burst: int = Field(default=5, ge=1, description="bucket size: requests allowed at once")
    admin: bool = Field(default=False, description="may call /admin/* (model swap), read all usage and scrape /metrics")

    @staticmethod
    def hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()


class QueueSettings(_Section):
    max_pending: int = Field(default=32, ge=1, le=10_000, description="queued requests before 429")
    max_batch: int = Field(default=4, ge=1, le=64, description="requests per micro-batch")
    batch_window_ms: float = Field(
        default=15.0, ge=0, le=1000, description="how long the oldest request waits for companions"
    )
    request_timeout_s: float = Field(default=300.0, gt=0, description="per-request deadline; 504 after it")


class CacheSettings(_Section):
    max_bytes: int = Field(default=64 * 2**20, ge=0, description="result cache size (0 disables it)")


class GuardSettings(_Section):
    max_prompt_chars: int = Field(default=2000, ge=1, le=MAX_PROMPT_CHARS, description="longest prompt accepted")
    deny: list[str] = Field(
        default_factory=list, description="case-insensitive regular expressions a prompt may not match"
    )
    max_side: int = Field(default=1536, ge=MIN_SIDE, le=MAX_SIDE, description="largest width or height served")
    max_images: int = Field(default=4, ge=1, le=MAX_IMAGES, description="most images per request")

    @field_validator("deny")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"deny pattern {pattern!r} is not a regular expression: {exc}") from exc
        return value


class HttpSettings(_Section):
    """How long a client may hold a connection without making progress (slow or stalled clients)."""

    # A request head is a few hundred bytes; even a congested cellular link delivers it in well under
    # a second, so 10 s is generous for real clients and short for a slowloris holding sockets open.
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300,
        description="time to send a request's head: from connecting (first request) or from its first byte; "
        "the connection is closed (408 if part of a head came) after it",
    )  # fmt: skip
    # The largest body (max_body_bytes, 256 KiB by default) takes ~21 s at 100 kbit/s.
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="time to receive a request body once its head is read; 408 after it"
    )
    # Longer than the usual load-balancer idle timeout (60 s on AWS ALB, nginx's upstream default), so
    # the agent never closes a connection the balancer is about to reuse; aiohttp's own default is an hour.
    keepalive_timeout_s: float = Field(
        default=75.0, gt=0, le=3600, description="how long an idle keep-alive connection stays open between requests"
    )
    # A reading client takes a 64 KiB slice of an event in milliseconds; 30 s rides out a mobile link's
    # TCP retransmission backoff, and a client that takes nothing for that long is not reading.
    sse_write_timeout_s: float = Field(
        default=30.0, gt=0, le=600,
        description="Server-Sent Events: time for a client to take each 64 KiB of the stream; "
        "a client that does not read is dropped and its job cancelled",
    )  # fmt: skip


class AgentSettings(BaseSettings):
    """Everything the agent can be told. A description on every field; ``--check-config`` prints them."""

    model_config = SettingsConfigDict(
        env_prefix="ZIMAGE_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    model: str = Field(
        description="artifact directory, diffusers directory or Hugging Face id (cached); "
        "'noop' or 'noop:SIDE' serves the no-op benchmarking model, which draws nothing"
    )
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8188, ge=0, le=65535, description="port to bind (0: any free port)")
    node_name: str = Field(default="edge", description="this node's name in logs, metrics and /v1/models")
    trusted_keys: list[Path] = Field(
        default_factory=list, description="public keys (PEM); when set, only artifacts they signed load"
    )
    api_keys: list[ApiKey] = Field(default_factory=list, description="clients allowed in (none: no auth)")
    allow_unauthenticated: bool = Field(
        default=False, description="serve without API keys on a non-loopback address (not recommended)"
    )
    queue: QueueSettings = Field(default_factory=QueueSettings, description="queueing and micro-batching")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="result cache")
    guard: GuardSettings = Field(default_factory=GuardSettings, description="input limits")
    cpu: CpuPolicy = Field(
        default_factory=CpuPolicy, description="torch CPU threads (ZIMAGE_CPU__THREADS, ZIMAGE_CPU__SHARE)"
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="largest request body; 413 above")
    warmup: bool = Field(default=True, description="run one small generation before reporting ready")
    device_profile: str | None = Field(
        default=None,
        description="plan request budgets for this device profile (zimage-edge plan lists them) instead of "
        "the detected device: for simulated nodes, or to hold a node to less than it has",
    )
    swap_strategy: Literal["auto", "overlap", "drain"] = Field(
        default="auto",
        description="model swap: load beside the old model (overlap), unload first (drain), or pick by free memory",
    )
    drain_grace_s: float = Field(default=30.0, ge=0, description="SIGTERM: time for queued work to finish")
    image_ttl_s: float = Field(default=600.0, gt=0, description="how long images answered by URL stay fetchable")
    # A 1024x1024 PNG is 1-3 MB: 64 MiB keeps a few dozen answers, small beside the model's memory.
    # The floor holds the largest image the agent can make (2048x2048 RGB, 12 MiB even as incompressible
    # PNG), so every image fits.
    image_store_max_bytes: int = Field(
        default=64 * 2**20, ge=16 * 2**20, description="memory for images answered by URL; the oldest go first"
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="base URL clients reach the agent at (behind a proxy: its URL), for links in answers "
        "(response_format=url); default: http://<bound address>:<port>, never the client's Host header. "
        "Browser pages from this origin may also post, and without API keys its host is served",
    )
    http: HttpSettings = Field(default_factory=HttpSettings, description="timeouts for slow and stalled clients")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="log level")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments win over the environment; no .env or secrets files are read.
        return (init_settings, env_settings)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @field_validator("device_profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        from quantize.profiles import PROFILES

        if value is not None and value not in PROFILES:
            raise ValueError(f"unknown device profile {value!r}; choose one of: {', '.join(PROFILES)}")
        return value

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> AgentSettings:
        if not self.api_keys and not self.loopback and not self.allow_unauthenticated:
            raise ValueError(
                f"binding to {self.host} without api_keys would expose the agent to the network; "
                "configure api_keys (or set allow_unauthenticated)"
            )
        names = [k.name for k in self.api_keys]
        if len(names) != len(set(names)):
            raise ValueError("api_keys names must be unique")
        return self


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from an optional TOML file, overlaid by ``ZIMAGE_*`` variables, then by ``overrides``."""
    from pydantic_settings import EnvSettingsSource

    data: dict[str, Any] = {}
    if config_file is not None:
        with Path(config_file).open("rb") as handle:
            data = tomllib.load(handle)
    env = EnvSettingsSource(AgentSettings, env_prefix="ZIMAGE_", env_nested_delimiter="__")()
    data = _merge(_merge(data, env), {k: v for k, v in overrides.items() if v is not None})
    return AgentSettings(**data)
