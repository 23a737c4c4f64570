"""A real Mosquitto per test that needs one, and MQTT clients that are closed after the test.

The broker is started from ``fleet.broker`` on a free loopback port with a fresh persistence directory
(~20 ms here). A missing ``mosquitto`` binary fails the test with the command that installs it: a broker
test that skips would pass whatever the code does.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.broker import BrokerError, MosquittoBroker, find_mosquitto, install_hint
from fleet.mqtt import Message, MqttClient, MqttSettings
from fleet.postgres import PostgresError, PostgresServer
from fleet.security import Credentials, init_pki, provision_controller, provision_node, provision_nodes

# Loopback delivery takes milliseconds; 10 s bounds a hang on a machine shared with other test runs.
DELIVERY_TIMEOUT_S = 10.0
# Reconnect quickly in tests: a restarted broker accepts connections ~10 ms after start.
TEST_RECONNECT_MIN_S = 0.05
TEST_RECONNECT_MAX_S = 0.5
# How often wait_until looks again: short next to every delivery time measured here.
POLL_S = 0.01

# The client library's tests connect as one user allowed every topic (no ACL file), over TLS with a password
# as every connection of the suite does; the fleet's own identities and ACLs are the secure_broker's.
TEST_USER = "tester"
TEST_PASSWORD = "tester-password"

MakeBroker = Callable[..., MosquittoBroker]
MakeClient = Callable[..., MqttClient]


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerError:
        pytest.fail(f"the fleet tests need a real Mosquitto broker: {install_hint()}", pytrace=False)


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[MakeBroker]:
    """Start brokers (keyword arguments of ``MosquittoBroker``; by default TLS and the test user's password);
    each is stopped after the test."""
    _require_mosquitto()
    brokers: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        if "pki" not in kwargs:
            kwargs = {"tls": True, "users": {TEST_USER: TEST_PASSWORD}} | kwargs
        broker = MosquittoBroker(tmp_path / f"broker{len(brokers)}", **kwargs)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(make_broker: MakeBroker) -> MosquittoBroker:
    """A broker on a free loopback port: TLS, and the test user's password."""
    return make_broker()


class SecureBroker:
    """The broker as a site runs it (``fleet.security``): TLS only, no anonymous access, each node held to
    its own topics by the ACL. Credentials are made on first use of an identity, and the broker then
    re-reads its password and ACL files (SIGHUP), as an operator's ``provision-node`` is followed by."""

    def __init__(self, broker: MosquittoBroker, pki: Path) -> None:
        self.broker, self.pki = broker, pki
        self._made: dict[str, Credentials] = {}

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    def provision(self, *node_ids: str) -> None:
        """Credentials for many nodes at once, and one reload (a site's first batch of nodes)."""
        for made in provision_nodes(self.pki, [i for i in node_ids if i not in self._made]):
            self._made[made.identity] = made
        self.broker.reload()

    def settings(self, identity: str, *, controller: bool = False, **overrides: Any) -> MqttSettings:
        """Settings for ``identity`` (a node id, or a controller's name with ``controller``)."""
        if identity not in self._made:
            made = provision_controller(self.pki, identity) if controller else provision_node(self.pki, identity)
            self.broker.reload()
            self._made[identity] = made
        reconnect = {"reconnect_min_s": TEST_RECONNECT_MIN_S, "reconnect_max_s": TEST_RECONNECT_MAX_S}
        return self._made[identity].mqtt_settings(self.broker.host, self.broker.port, **(reconnect | overrides))


@pytest.fixture
def secure_broker(make_broker: MakeBroker, tmp_path: Path) -> SecureBroker:
    """A TLS broker with the fleet's ACLs, run from the config ``zimage-edge fleet broker-config`` writes."""
    pki = init_pki(tmp_path / "pki")
    return SecureBroker(make_broker(pki=pki.root), pki.root)


def client_settings(broker: MosquittoBroker, **overrides: Any) -> MqttSettings:
    """Settings for a ``make_broker`` broker: its CA, and the test user when the broker has one."""
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "reconnect_min_s": TEST_RECONNECT_MIN_S,
        "reconnect_max_s": TEST_RECONNECT_MAX_S,
    }
    if broker.tls:
        values["ca_file"] = broker.ca_file
    if TEST_USER in broker.users:
        values |= {"username": TEST_USER, "password": TEST_PASSWORD}
    return MqttSettings.model_validate(values | overrides)


def unique_id(name: str) -> str:
    """A client id no other test (or earlier run) has used: old persistent sessions stay out of the way."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """``make_client(settings, client_id, **kwargs)``: an ``MqttClient`` closed after the test."""
    clients: list[MqttClient] = []

    def make(settings: MqttSettings, client_id: str, **kwargs: Any) -> MqttClient:
        client = MqttClient(settings, client_id, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def next_message(messages: AsyncIterator[Message], timeout_s: float = DELIVERY_TIMEOUT_S) -> Message:
    return await asyncio.wait_for(anext(messages), timeout_s)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = DELIVERY_TIMEOUT_S) -> None:
    """Poll ``predicate`` until it holds; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(POLL_S)


async def within(awaitable: Awaitable[Any], timeout_s: float = DELIVERY_TIMEOUT_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


# PostgreSQL: one throwaway server per test session (~1 s to initdb and start), a fresh database per test
# (~50 ms to create), so that tests of the store on PostgreSQL are as independent as those on SQLite
# files. Requested only by tests that run on PostgreSQL: a SQLite-only run starts no server. A missing
# server fails with the command that installs it, as for Mosquitto.

MakePostgresDatabase = Callable[[], str]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on a free loopback port, stopped (and its directory removed) after the session."""
    try:
        server = PostgresServer()
    except PostgresError as exc:
        pytest.fail(f"the store tests on PostgreSQL need a PostgreSQL server: {exc}", pytrace=False)
    with server:
        yield server


@pytest.fixture
def make_postgres_database(postgres_server: PostgresServer) -> Iterator[MakePostgresDatabase]:
    """``make()`` -> the URL of a new empty database; each is dropped after the test."""
    names: list[str] = []

    def make() -> str:
        names.append(f"test_{uuid.uuid4().hex[:16]}")
        return postgres_server.create_database(names[-1])

    yield make
    for name in names:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_url(make_postgres_database: MakePostgresDatabase) -> str:
    """The URL (``postgresql+psycopg://``) of an empty database of its own."""
    return make_postgres_database()


# The engines the controller's store runs on: a test that takes ``make_store_database`` runs on each.
STORE_ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=STORE_ENGINES)
def make_store_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """``make()`` -> a new empty database of the engine under test, as ``ControllerSettings.database``
    gives one: a SQLite file path, or a PostgreSQL URL (the server starts on first use)."""
    if request.param == "postgresql":
        make: Callable[[], str] = request.getfixturevalue("make_postgres_database")
        return make
    numbers = itertools.count()
    return lambda: str(tmp_path / f"fleet{next(numbers)}.db")
