"""API keys, admin keys, rate limits, usage metering, and the loopback-only default."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_agent.auth import Authenticator, TokenBucket
from edge_agent.settings import AgentSettings, ApiKey
from tests.agent.conftest import SMALL, FrozenClock

KEYS = [
    {"name": "kiosk", "sha256": ApiKey.hash("kiosk-secret"), "rate_per_minute": 60, "burst": 2},
    {"name": "ops", "sha256": ApiKey.hash("ops-secret"), "admin": True},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def client(start_agent, clock: FrozenClock):
    # The rate limit reads the injected clock: however slow the machine, no token refills unasked.
    # The batching window reads it too, so it is off here (a frozen clock would never end it).
    return await start_agent(api_keys=KEYS, clock=clock, queue={"batch_window_ms": 0})


async def test_missing_and_wrong_keys_are_refused(client) -> None:
    missing = await client.post("/v1/generate", json=SMALL)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = await client.post("/v1/generate", json=SMALL, headers=bearer("kiosk-secreT"))
    assert wrong.status == 401
    assert (await wrong.json())["error"]["message"] == "the API key is not valid"
    ok = await client.post("/v1/generate", json=SMALL, headers=bearer("ops-secret"))
    assert ok.status == 200
    x_api_key = await client.post("/v1/generate", json=SMALL, headers={"X-API-Key": "ops-secret"})
    assert x_api_key.status == 200


async def test_probes_stay_open_and_metrics_need_an_admin_key(client) -> None:
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/v1/models")).status == 401
    # The metrics name every key and its usage: an admin's (Prometheus's) bearer token reads them.
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=bearer("kiosk-secret"))).status == 403
    assert (await client.get("/metrics", headers=bearer("ops-secret"))).status == 200


async def test_admin_endpoints_need_an_admin_key(client) -> None:
    response = await client.post("/admin/model", json={"model": "/nowhere"}, headers=bearer("kiosk-secret"))
    assert response.status == 403
    response = await client.post("/admin/model", json={"model": "/nowhere"}, headers=bearer("ops-secret"))
    assert response.status == 422  # an admin may, and the bad path is reported; the old model serves on


async def test_rate_limit_answers_429_with_retry_after(client, clock: FrozenClock) -> None:
    statuses = []
    for _ in range(3):
        response = await client.post("/v1/generate", json=SMALL, headers=bearer("kiosk-secret"))
        statuses.append(response.status)
    assert statuses == [200, 200, 429]  # burst 2
    assert response.headers["Retry-After"] == "1"  # 60 per minute: one token a second
    assert (await response.json())["error"]["code"] == "rate_limited"
    other = await client.post("/v1/generate", json=SMALL, headers=bearer("ops-secret"))
    assert other.status == 200  # buckets are per key
    clock.advance(1.0)  # one token back
    again = await client.post("/v1/generate", json=SMALL, headers=bearer("kiosk-secret"))
    assert again.status == 200
    assert (await client.post("/v1/generate", json=SMALL, headers=bearer("kiosk-secret"))).status == 429


async def test_usage_is_metered_per_key(client) -> None:
    await client.post("/v1/generate", json={**SMALL, "n": 2, "steps": 4}, headers=bearer("kiosk-secret"))
    await client.post("/v1/generate", json=SMALL, headers=bearer("ops-secret"))
    own = await (await client.get("/v1/usage", headers=bearer("kiosk-secret"))).json()
    assert list(own["usage"]) == ["kiosk"]
    kiosk = own["usage"]["kiosk"]
    assert kiosk["images"] == 2
    assert kiosk["megapixel_steps"] == pytest.approx(64 * 64 / 1e6 * 4 * 2, rel=1e-3)
    assert kiosk["gpu_seconds"] > 0
    everyone = await (await client.get("/v1/usage", headers=bearer("ops-secret"))).json()
    assert set(everyone["usage"]) == {"kiosk", "ops"}
    metrics = await (await client.get("/metrics", headers=bearer("ops-secret"))).text()
    assert 'zimage_usage_images_total{key="kiosk"} 2.0' in metrics


def test_keys_are_stored_hashed_and_matched_exactly() -> None:
    auth = Authenticator([ApiKey(name="a", sha256=ApiKey.hash("secret"))])
    assert auth.identify("secret").name == "a"
    assert auth.identify("secret ") is None
    assert auth.identify("") is None
    assert auth.identify(None) is None


def test_token_bucket_refills_with_the_clock() -> None:
    bucket = TokenBucket(rate=1.0, capacity=2, tokens=2, updated=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0


def test_auth_is_off_by_default_only_on_loopback(tiny_model_dir) -> None:
    AgentSettings(model=str(tiny_model_dir), host="127.0.0.1")
    AgentSettings(model=str(tiny_model_dir), host="::1")
    with pytest.raises(ValidationError, match="without api_keys would expose"):
        AgentSettings(model=str(tiny_model_dir), host="0.0.0.0")
    AgentSettings(model=str(tiny_model_dir), host="0.0.0.0", api_keys=KEYS)
    with pytest.raises(ValidationError, match="sha256"):
        AgentSettings(model=str(tiny_model_dir), api_keys=[{"name": "x", "sha256": "plaintext-key"}])
