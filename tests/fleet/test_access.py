"""Who may do what with the controller: API tokens with roles, and the signing policy of ``publish``.

The controller here is not running (no broker needed): its HTTP app and ``publish_release`` are
exercised directly on a SQLite store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet.api import create_controller_app
from fleet.artifact_server import ArtifactCatalog
from fleet.auth import ApiToken, Role, TokenBook
from fleet.cli import ControllerSettings
from fleet.controller import Controller, ControllerConfig
from fleet.store import Store
from quantize.manifest import ArtifactError
from quantize.signing import generate_keypair, load_private_key

OPERATOR, VIEWER = "operator-secret", "viewer-secret"


@pytest.fixture
def controller(tmp_path: Path):
    with Store.open(tmp_path / "fleet.db") as store:
        yield Controller(ControllerConfig(artifact_base_url="http://127.0.0.1:1"), store, ArtifactCatalog())


def test_a_token_is_found_by_its_hash_and_names_must_be_unique() -> None:
    book = TokenBook([ApiToken.of("ops", OPERATOR, Role.OPERATOR), ApiToken.of("view", VIEWER, Role.READ)])
    holder = book.holder(VIEWER)
    assert holder is not None
    assert (holder.name, holder.role) == ("view", Role.READ)
    assert book.holder(OPERATOR).role is Role.OPERATOR  # type: ignore[union-attr]
    assert book.holder("viewer-secre") is None
    assert book.holder("") is None
    with pytest.raises(ValueError, match="unique"):
        TokenBook([ApiToken.of("a", "x", Role.READ), ApiToken.of("a", "y", Role.READ)])
    with pytest.raises(ValueError, match="at least one"):
        TokenBook([])


def test_controller_settings_need_a_token_and_keep_none_in_clear() -> None:
    with pytest.raises(ValueError, match="api_tokens"):
        ControllerSettings.model_validate({})
    settings = ControllerSettings.model_validate(
        {"api_tokens": [{"name": "grafana", "sha256": ApiToken.hash(VIEWER)}], "api_token": OPERATOR}
    )
    roles = {token.name: token.role for token in settings.tokens()}
    assert roles == {"api_token": Role.OPERATOR, "grafana": Role.READ}  # a hashed token reads by default
    assert OPERATOR not in repr(settings)


async def test_a_read_token_reads_an_operator_token_changes(aiohttp_client, controller: Controller) -> None:
    app = create_controller_app(
        controller, [ApiToken.of("ops", OPERATOR, Role.OPERATOR), ApiToken.of("view", VIEWER, Role.READ)]
    )
    client = await aiohttp_client(app)
    viewer, operator = {"Authorization": f"Bearer {VIEWER}"}, {"Authorization": f"Bearer {OPERATOR}"}
    assert (await client.get("/api/v1/nodes")).status == 401
    assert (await client.get("/api/v1/nodes", headers={"Authorization": "Bearer nope"})).status == 401
    assert (await client.get("/healthz")).status == 200  # probes stay open
    for path in ("/api/v1/nodes", "/api/v1/releases", "/api/v1/rollouts", "/metrics"):
        assert (await client.get(path, headers=viewer)).status == 200, path
    body = {"release": "r1", "waves": ["100%"]}
    refused = await client.post("/api/v1/rollouts", json=body, headers=viewer)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "forbidden"
    assert (await client.post("/api/v1/rollouts/ro-x/pause", headers=viewer)).status == 403
    # The operator gets as far as the request itself (no such release).
    assert (await client.post("/api/v1/rollouts", json=body, headers=operator)).status == 422
    assert controller.store.list_rollouts() == []


def test_publish_refuses_unsigned_and_untrusted_artifacts_and_registers_nothing(
    controller: Controller, tiny_model_dir, artifacts, signing_keys, tmp_path: Path
) -> None:
    unsigned = artifacts.get(tiny_model_dir, "int8")
    private, public, _ = signing_keys
    signed = artifacts.get(tiny_model_dir, "int8-te8", sign_key=private)
    with pytest.raises(ValueError, match="not signed"):
        controller.publish_release("r1", [signed, unsigned])
    assert controller.store.list_releases() == []
    assert controller.catalog.entries == {}
    # Trusted keys configured: a signature by another key is refused, one by a trusted key accepted.
    other = load_private_key(generate_keypair(tmp_path / "other")[0])
    stranger = artifacts.get(tiny_model_dir, "bf16", sign_key=other)
    controller.trusted_keys = [public]
    with pytest.raises(ArtifactError):
        controller.publish_release("r1", [signed, stranger])
    assert controller.store.list_releases() == []
    assert controller.catalog.entries == {}
    release = controller.publish_release("r1", [signed])
    assert [v.variant for v in release.variants] == ["int8-te8"]
    assert set(controller.catalog.entries) == {release.variants[0].artifact_id}
    # Told otherwise, an unsigned artifact is published.
    copy = tmp_path / "copy"
    shutil.copytree(unsigned, copy)
    assert controller.publish_release("r2", [copy], allow_unsigned=True).variants[0].variant == "int8"
