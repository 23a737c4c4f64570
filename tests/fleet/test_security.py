"""The locked-down broker: the PKI, credentials, Mosquitto's password/ACL/config files, and a real Mosquitto
(TLS, 127.0.0.1) enforcing them. No mocks, no sleeps to wait: brokers are polled with deadlines, and a
message that must not arrive is shown absent by a later one that must (one broker thread, one order)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import grp
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet import security
from fleet.broker import MosquittoBroker, find_mosquitto, free_port
from fleet.mqtt import ConnectError, MqttClient, MqttSettings, PublishError
from fleet.protocol import Topics
from fleet.security import (
    BrokerFiles,
    BrokerLimits,
    BrokerSettings,
    CredentialKind,
    Credentials,
    Deployment,
    Identity,
    PkiError,
    PkiPaths,
    Registry,
    Role,
    Status,
)
from tests.fleet.conftest import (
    POLL_S,
    TEST_RECONNECT_MAX_S,
    TEST_RECONNECT_MIN_S,
    MakeBroker,
    MakeClient,
    next_message,
    unique_id,
    wait_until,
)
from zimage_edge import cli

TOPICS = Topics()
# A client refused at the TLS handshake retries: two failed attempts show it is refused, not slow.
REFUSED_ATTEMPTS = 2
# Mosquitto accepts connections ~15 ms after start (notes/infra.md); 10 s bounds a hang on a busy machine.
START_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return security.init_pki(tmp_path / "pki")


@dataclass
class Site:
    pki: PkiPaths
    broker: MosquittoBroker
    ids: dict[str, Credentials]

    def settings(self, name: str, **overrides: Any) -> MqttSettings:
        return settings_for(self.ids[name], self.broker, **overrides)


@pytest.fixture
def site(pki: PkiPaths, make_broker: MakeBroker, tmp_path: Path) -> Site:
    """A controller, password nodes a and b and certificate node c, behind a broker run from the PKI's config.
    Each node's files are kept outside the PKI, as a node keeps them (revoke_node deletes the PKI's copy)."""
    made = {
        "controller": security.provision_controller(pki.root),
        "a": security.provision_node(pki.root, "a"),
        "b": security.provision_node(pki.root, "b"),
        "c": security.provision_node(pki.root, "c", CredentialKind.CERTIFICATE),
    }
    ids = {name: keep(credentials, tmp_path / "nodes" / name) for name, credentials in made.items()}
    return Site(pki, make_broker(pki=pki.root), ids)


def settings_for(credentials: Credentials, broker: MosquittoBroker, **overrides: Any) -> MqttSettings:
    """Settings of ``credentials`` for the listener of their kind on ``broker``."""
    default = broker.port if credentials.kind is CredentialKind.PASSWORD else broker.certificate_port
    port = overrides.pop("port", default)
    values = {"reconnect_min_s": TEST_RECONNECT_MIN_S, "reconnect_max_s": TEST_RECONNECT_MAX_S} | overrides
    return credentials.mqtt_settings(broker.host, port, **values)


def keep(credentials: Credentials, where: Path) -> Credentials:
    """A copy of an identity's files in ``where``."""
    where.mkdir(parents=True)
    moved: dict[str, Path] = {}
    for field in ("ca_file", "cert_file", "key_file"):
        path = getattr(credentials, field)
        if path is not None:
            moved[field] = where / path.name
            moved[field].write_bytes(path.read_bytes())
    return dataclasses.replace(credentials, directory=where, **moved)


async def refused_at_tls(client: MqttClient) -> None:
    """``client`` never gets a CONNACK: the TLS handshake (or the connection) fails on every attempt."""
    await client.start()
    await wait_until(
        lambda: client.counters.get("connect_failed", 0) + client.counters.get("disconnected", 0) >= REFUSED_ATTEMPTS
    )
    assert not client.connected
    assert "connect_refused" not in client.counters  # it never got as far as MQTT
    await client.close()


async def refused_by_broker(client: MqttClient) -> None:
    with pytest.raises(ConnectError) as refused:
        await client.connect(CONNECT_TIMEOUT_S)
    assert refused.value.code == 135  # "Not authorized" under MQTT v5


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and (files) content: "nothing changed" is equality."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): (path.lstat().st_mode, path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- Mosquitto's password hash ------------------------------------------------------------------------


def test_password_lines_have_the_shape_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = find_mosquitto("mosquitto_passwd")
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run([tool, "-b", str(passwd), "n1", "s3cret pass"], check=True, capture_output=True, timeout=30)
    theirs = passwd.read_text().strip()
    shape = re.compile(r"^n1:\$7\$101\$([A-Za-z0-9+/=]{16})\$([A-Za-z0-9+/=]{88})$")
    match = shape.match(theirs)
    assert match, theirs
    salt = base64.b64decode(match[1])
    assert (len(salt), len(base64.b64decode(match[2]))) == (security.SALT_BYTES, security.HASH_BYTES)
    # Same salt, same password: the very line mosquitto_passwd wrote.
    assert security.mosquitto_password_line("n1", "s3cret pass", salt=salt) == theirs
    assert security.check_password_line(theirs, "s3cret pass")
    assert not security.check_password_line(theirs, "s3cret pas")
    ours = security.mosquitto_password_line("n1", "s3cret pass")
    assert shape.match(ours)
    assert ours != security.mosquitto_password_line("n1", "s3cret pass"), "a fresh random salt each time"
    with pytest.raises(ValueError, match=":"):
        security.mosquitto_password_line("a:b", "x")
    with pytest.raises(ValueError, match="not a Mosquitto"):
        security.check_password_line("n1:$6$abc", "x")


# -- pure texts ---------------------------------------------------------------------------------------


def _registry(**identities: Identity) -> Registry:
    return Registry(prefix="site/v1", hosts=["localhost"], identities=identities)


def test_the_acl_pins_each_node_to_its_own_topics_and_gives_the_controller_the_rest() -> None:
    registry = _registry(
        n1=Identity(role=Role.NODE, kind=CredentialKind.PASSWORD, password_line="x", issued_at=0),
        gone=Identity(role=Role.NODE, kind=CredentialKind.CERTIFICATE, status=Status.REVOKED, issued_at=0),
        ctl=Identity(role=Role.CONTROLLER, kind=CredentialKind.CERTIFICATE, serial="1f", issued_at=0),
    )
    rules = [line for line in security.acl_text(registry).splitlines() if line and not line.startswith("#")]
    assert rules == [
        "user ctl",
        "topic read site/v1/nodes/+/state",
        "topic readwrite site/v1/nodes/+/desired",
        "topic read site/v1/nodes/+/reported",
        "topic read site/v1/nodes/+/telemetry",
        "topic read site/v1/nodes/+/events",
        "topic readwrite site/v1/nodes/+/ack",
        "topic readwrite site/v1/controller/state",
        "user n1",
        # Its own state is read too: a late will replacing its birth makes the node publish it again.
        "topic readwrite site/v1/nodes/n1/state",
        "topic write site/v1/nodes/n1/reported",
        "topic write site/v1/nodes/n1/telemetry",
        "topic write site/v1/nodes/n1/events",
        "topic read site/v1/nodes/n1/desired",
        "topic read site/v1/nodes/n1/ack",
    ]
    # No rule before the first user line: it would apply to anonymous clients.
    assert not any(line.startswith(("topic", "pattern")) for line in security.acl_text(_registry()).splitlines())
    assert security.password_file_text(registry) == "x\n"


def test_the_config_is_tls_only_authenticated_persistent_and_sized_for_the_fleet(tmp_path: Path) -> None:
    files = BrokerFiles.beside(tmp_path / "zimage.conf")
    assert files.password_file == tmp_path.resolve() / "zimage.passwd"
    limits = BrokerLimits.for_fleet(5000)
    text = security.broker_config(
        files, BrokerSettings(data_dir=tmp_path / "data", bind="10.0.0.2", limits=limits, group="mosquitto")
    )
    lines = text.splitlines()
    directives = [line for line in lines if line and not line.startswith("#")]
    for expected in (
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
        "persistence true",
        f"persistence_location {tmp_path / 'data'}/",
        "listener 8883 10.0.0.2",
        "listener 8884 10.0.0.2",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {files.crl_file}",
        f"keyfile {files.key_file}",
    ):
        assert expected in directives
    assert directives.count("use_username_as_clientid true") == 2
    assert directives.count("tls_version tlsv1.2") == 2
    assert not any(line.startswith("user ") for line in directives)  # Mosquitto's own default
    values = {line.split()[0]: int(line.split()[1]) for line in directives if line.split()[-1].isdigit()}
    assert values["max_queued_messages"] == 5000 // 10 * 900 > 1000  # Mosquitto's default drops beyond 1000
    assert values["max_connections"] >= 2 * 5000
    assert values["max_inflight_messages"] > 20
    assert values["max_packet_size"] == 128 * 1024
    assert values["autosave_interval"] == 10
    # Every limit says why, in the line above it.
    for name in ("max_queued_messages", "max_inflight_messages", "max_packet_size", "max_connections",
                 "autosave_interval"):  # fmt: skip
        where = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        assert lines[where - 1].startswith("#"), name
    # Passwords only: no certificate listener, no CRL.
    only = security.broker_config(files, BrokerSettings(certificate_port=None))
    assert "require_certificate" not in only
    assert "crlfile" not in only
    assert "listener 8883\n" in only
    assert BrokerLimits.for_fleet(10).max_queued_messages == security.MIN_QUEUED_MESSAGES
    with pytest.raises(ValueError, match="at least 1"):
        BrokerLimits.for_fleet(0)


# -- the PKI directory ----------------------------------------------------------------------------------


def test_init_pki_makes_a_ca_and_a_server_certificate_and_keeps_keys_private(tmp_path: Path) -> None:
    paths = security.init_pki(tmp_path / "pki", ["broker.site.lan", "10.0.0.5"])
    assert mode_of(paths.ca_key) == mode_of(paths.server_key) == 0o600
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.site.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= datetime.timedelta(days=3650)
    server_days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 729 <= server_days <= 731
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert len(crl) == 0
    assert crl.next_update_utc == ca.not_valid_after_utc  # an expired CRL would refuse every client
    assert security.load_registry(paths.root) == Registry(hosts=["broker.site.lan", "10.0.0.5"])

    security.provision_node(paths.root, "n1")
    before = snapshot(paths.root)
    with pytest.raises(PkiError, match="already holds a PKI"):
        security.init_pki(paths.root)
    assert snapshot(paths.root) == before
    replaced = security.init_pki(paths.root, force=True)
    assert replaced.ca_cert.read_bytes() != before["ca.crt"][1]
    assert not replaced.clients.exists(), "credentials of the old CA are gone with it"
    assert security.load_registry(paths.root).identities == {}

    for bad in (["bad host"], [], ["-x.lan"]):
        with pytest.raises(ValueError, match="host"):
            security.init_pki(tmp_path / "other", bad)
    with pytest.raises(ValueError, match="prefix"):
        security.init_pki(tmp_path / "other", prefix="a/#")
    assert not (tmp_path / "other").exists()


async def test_many_nodes_are_provisioned_at_once_and_the_broker_takes_them(
    pki: PkiPaths, make_broker, make_client
) -> None:
    ids = [f"bulk-{index:03d}" for index in range(200)]
    made = security.provision_nodes(pki.root, ids)
    assert [credentials.identity for credentials in made] == ids
    registry = security.load_registry(pki.root)
    assert set(ids) <= set(registry.identities)
    for credentials in (made[0], made[-1]):
        line = registry.identities[credentials.identity].password_line
        assert line is not None
        assert credentials.password is not None
        assert security.check_password_line(line, credentials.password.get_secret_value())
    broker = make_broker(pki=pki.root)
    last = make_client(settings_for(made[-1], broker), made[-1].identity)
    await last.connect(5)
    # A batch with an id already taken, repeated or invalid is refused whole, before anything is written.
    before = pki.registry.read_bytes()
    with pytest.raises(security.PkiError, match="already provisioned"):
        security.provision_nodes(pki.root, ["fresh-1", "bulk-000"])
    with pytest.raises(security.PkiError, match="twice"):
        security.provision_nodes(pki.root, ["fresh-1", "fresh-1"])
    with pytest.raises(ValueError, match="invalid"):
        security.provision_nodes(pki.root, ["fresh-1", "bad:id"])
    assert pki.registry.read_bytes() == before
    assert not (pki.root / "clients" / "fresh-1").exists()


def test_provisioning_records_hashes_only_and_hands_the_node_its_files(pki: PkiPaths) -> None:
    node = security.provision_node(pki.root, "n1")
    assert node.password is not None
    plain = node.password.get_secret_value()
    assert len(plain) >= 43  # 256 random bits
    assert (node.directory / "password").read_text().strip() == plain
    assert mode_of(node.directory / "password") == 0o600
    assert node.ca_file.read_bytes() == pki.ca_cert.read_bytes()
    registry_text = pki.registry.read_text()
    assert plain not in registry_text
    entry = security.load_registry(pki.root).identities["n1"]
    assert entry.password_line is not None
    assert security.check_password_line(entry.password_line, plain)
    settings = node.mqtt_settings("localhost", 8883)
    assert (settings.username, settings.ca_file, settings.cert_file) == ("n1", node.ca_file, None)

    cert_node = security.provision_node(pki.root, "n2", "certificate")
    assert cert_node.cert_file is not None
    assert cert_node.key_file is not None
    assert mode_of(cert_node.key_file) == 0o600
    cert = x509.load_pem_x509_certificate(cert_node.cert_file.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n2"
    assert security.load_registry(pki.root).identities["n2"].serial == f"{cert.serial_number:x}"
    assert cert_node.mqtt_settings("localhost", 8884).username is None  # the broker takes the CN

    # Rotation: a new certificate, the old one revoked in the CRL.
    rotated = security.rotate_node(pki.root, "n2")
    assert rotated.cert_file is not None
    new_cert = x509.load_pem_x509_certificate(rotated.cert_file.read_bytes())
    assert new_cert.serial_number != cert.serial_number
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(new_cert.serial_number) is None

    security.revoke_node(pki.root, "n2")
    assert not rotated.directory.exists()
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(new_cert.serial_number) is not None
    assert security.load_registry(pki.root).identities["n2"].status is Status.REVOKED
    # A revoked id may be provisioned again, with new credentials.
    again = security.provision_node(pki.root, "n2")
    assert again.kind is CredentialKind.PASSWORD


def test_bad_input_changes_nothing(pki: PkiPaths, tmp_path: Path) -> None:
    security.provision_node(pki.root, "n1")
    security.provision_node(pki.root, "gone")
    security.revoke_node(pki.root, "gone")
    before = snapshot(pki.root)
    refusals: list[tuple[type[Exception], str, Any]] = [
        (ValueError, "invalid node id", lambda: security.provision_node(pki.root, "a/b")),
        (ValueError, "':'", lambda: security.provision_node(pki.root, "a:b")),
        (ValueError, "password, certificate", lambda: security.provision_node(pki.root, "n9", "cert")),
        (PkiError, "already provisioned", lambda: security.provision_node(pki.root, "n1")),
        (PkiError, "already provisioned", lambda: security.provision_controller(pki.root, "n1")),
        (PkiError, "not provisioned", lambda: security.rotate_node(pki.root, "n9")),
        (PkiError, "revoked", lambda: security.revoke_node(pki.root, "gone")),
        (PkiError, "revoked", lambda: security.rotate_node(pki.root, "gone")),
        (PkiError, "not a directory", lambda: security.write_broker_config(pki.root, tmp_path / "no" / "x.conf")),
        (ValueError, "no group", lambda: security.write_broker_config(
            pki.root, tmp_path / "x.conf", BrokerSettings(group="no-such-group-here"))),
        (ValueError, "below", lambda: security.write_broker_config(
            pki.root, tmp_path / "x.conf", BrokerSettings(limits=dataclasses.replace(
                BrokerLimits.for_fleet(), max_connections=0)))),
    ]  # fmt: skip
    for error, message, call in refusals:
        with pytest.raises(error, match=message):
            call()
    assert snapshot(pki.root) == before
    assert not (tmp_path / "x.conf").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PkiError, match="init-pki"):
        security.provision_node(empty, "n1")
    assert list(empty.iterdir()) == []


def test_broker_files_follow_every_change(pki: PkiPaths, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    group = grp.getgrgid(os.getgid()).gr_name  # one this process may give its files
    files = security.write_broker_config(pki.root, tmp_path / "etc" / "zimage.conf", BrokerSettings(group=group))
    assert mode_of(files.key_file) == mode_of(files.password_file) == (0o640 if group else 0o600)
    assert files.password_file.read_text() == ""
    node = security.provision_node(pki.root, "n1")
    assert node.password is not None
    (line,) = files.password_file.read_text().splitlines()
    assert security.check_password_line(line, node.password.get_secret_value())
    assert "user n1" in files.acl_file.read_text()
    assert mode_of(files.password_file) == (0o640 if group else 0o600)
    security.revoke_node(pki.root, "n1")
    assert files.password_file.read_text() == ""
    assert "user n1" not in files.acl_file.read_text()
    assert files.crl_file.read_bytes() == pki.crl.read_bytes()
    assert security.load_registry(pki.root).deployments == [Deployment(config=str(files.config), group=group)]
    # A config deleted since is forgotten at the next change.
    files.config.unlink()
    security.provision_node(pki.root, "n2")
    assert security.load_registry(pki.root).deployments == []


# -- a real broker enforcing it -----------------------------------------------------------------------


async def test_a_node_publishes_and_reads_only_its_own_topics(site: Site, make_client: MakeClient) -> None:
    controller = make_client(site.settings("controller"), unique_id("controller"))
    await controller.connect(CONNECT_TIMEOUT_S)
    await controller.subscribe([("zimage/v1/nodes/+/telemetry", 1)])
    telemetry = aiter(controller.messages())
    a = make_client(site.settings("a"), unique_id("node-a"))
    b = make_client(site.settings("b"), unique_id("node-b"))
    await a.connect(CONNECT_TIMEOUT_S)
    await b.connect(CONNECT_TIMEOUT_S)

    await a.publish(TOPICS.telemetry("a"), b"mine")
    assert (await next_message(telemetry)).topic == TOPICS.telemetry("a")
    for topic in (TOPICS.telemetry("b"), TOPICS.state("b"), TOPICS.desired("a"), TOPICS.ack("a"),
                  TOPICS.controller_state, "zimage/v1/other", "$SYS/x"):  # fmt: skip
        with pytest.raises(PublishError) as denied:
            await a.publish(topic, b"as someone else")
        assert (denied.value.code, denied.value.reason) == (135, "Not authorized"), topic
    # The controller reads nodes and writes what they should run; it cannot speak for a node.
    with pytest.raises(PublishError):
        await controller.publish(TOPICS.telemetry("a"), b"forged")

    # b's desired and ack are retained before a subscribes to everything: a gets none of it, only its own.
    await controller.publish(TOPICS.desired("b"), b"b runs X", retain=True)
    await controller.publish(TOPICS.ack("b"), b"b acked", retain=True)
    assert await a.subscribe([("zimage/v1/#", 1)]) == [1]  # granted, and then filtered by the ACL
    mine = aiter(a.messages())
    await b.publish(TOPICS.telemetry("b"), b"b's telemetry")
    await controller.publish(TOPICS.desired("a"), b"a runs Y", retain=True)
    first = await next_message(mine)
    assert (first.topic, first.payload) == (TOPICS.desired("a"), b"a runs Y")
    await controller.publish(TOPICS.ack("b"), b"b acked again")
    await controller.publish(TOPICS.ack("a"), b"a acked")
    second = await next_message(mine)
    assert (second.topic, second.payload) == (TOPICS.ack("a"), b"a acked")
    # b reads its own desired (the retained one).
    await b.subscribe([(TOPICS.desired("b"), 1)])
    assert (await next_message(aiter(b.messages()))).payload == b"b runs X"
    assert (await next_message(telemetry)).topic == TOPICS.telemetry("b")


async def test_unknown_and_revoked_clients_cannot_connect(site: Site, make_client: MakeClient) -> None:
    broker = site.broker
    assert broker.ca_file is not None
    stranger = MqttSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file, username="z", password="pw")
    await refused_by_broker(make_client(stranger, unique_id("stranger")))
    guessing = site.settings("a", password="a guess")
    await refused_by_broker(make_client(guessing, unique_id("guess")))
    # No credentials at all: anonymous access is off.
    anonymous = MqttSettings(host=broker.host, port=broker.port, ca_file=broker.ca_file)
    await refused_by_broker(make_client(anonymous, unique_id("anonymous")))

    b = make_client(site.settings("b"), unique_id("node-b"))
    await b.connect(CONNECT_TIMEOUT_S)
    security.revoke_node(site.pki.root, "b")
    broker.reload()
    # Mosquitto drops a connected client whose password line is gone, and refuses it from then on.
    await b.wait_disconnected(CONNECT_TIMEOUT_S)
    await refused_by_broker(make_client(site.settings("b"), unique_id("node-b")))
    a = make_client(site.settings("a"), unique_id("node-a"))
    await a.connect(CONNECT_TIMEOUT_S)  # the others are untouched


async def test_a_rotated_password_stops_working_after_the_broker_reloads(site: Site, make_client: MakeClient) -> None:
    old = site.settings("a")
    rotated = security.rotate_node(site.pki.root, "a")
    site.broker.reload()
    await refused_by_broker(make_client(old, unique_id("node-a")))
    new = make_client(settings_for(rotated, site.broker), unique_id("node-a"))
    await new.connect(CONNECT_TIMEOUT_S)
    await new.publish(TOPICS.telemetry("a"), b"with the new password")


async def test_plain_tcp_to_a_tls_listener_gets_nowhere(site: Site, make_client: MakeClient) -> None:
    for port in (site.broker.port, site.broker.certificate_port):
        assert port
        plain = site.settings("a", port=port, ca_file=None)
        await refused_at_tls(make_client(plain, unique_id("plain")))


async def test_a_client_certificate_node_works_until_revoked(site: Site, make_client: MakeClient) -> None:
    broker = site.broker
    controller = make_client(site.settings("controller"), unique_id("controller"))
    await controller.connect(CONNECT_TIMEOUT_S)
    await controller.subscribe([("zimage/v1/nodes/+/telemetry", 1)])
    c = make_client(site.settings("c"), unique_id("node-c"))
    info = await c.connect(CONNECT_TIMEOUT_S)
    assert not info.session_present
    await c.publish(TOPICS.telemetry("c"), b"by certificate")
    assert (await next_message(aiter(controller.messages()))).payload == b"by certificate"
    with pytest.raises(PublishError):
        await c.publish(TOPICS.telemetry("a"), b"as a")
    # The certificate listener wants a certificate; the password listener wants a password.
    no_cert = site.settings("c", cert_file=None, key_file=None, username="c", password="x")
    await refused_at_tls(make_client(no_cert, unique_id("no-cert")))
    await refused_by_broker(make_client(site.settings("c", port=broker.port), unique_id("cert-on-password")))
    # A certificate of another CA is refused at the handshake.
    other = security.init_pki(site.pki.root.parent / "other-pki")
    forged = security.provision_node(other.root, "c", CredentialKind.CERTIFICATE)
    forged_settings = site.settings("c", cert_file=forged.cert_file, key_file=forged.key_file)
    await refused_at_tls(make_client(forged_settings, unique_id("forged")))

    security.revoke_node(site.pki.root, "c")
    broker.reload()
    # Still connected (Mosquitto re-checks passwords, not certificates, on reload), but its ACL block is gone.
    with pytest.raises(PublishError):
        await c.publish(TOPICS.telemetry("c"), b"after revocation")
    # A new connection fails its TLS handshake: the CRL was re-read.
    await refused_at_tls(make_client(site.settings("c"), unique_id("node-c")))


async def test_a_rotated_certificate_is_revoked(site: Site, make_client: MakeClient) -> None:
    rotated = security.rotate_node(site.pki.root, "c")
    site.broker.reload()
    await refused_at_tls(make_client(site.settings("c"), unique_id("node-c")))
    new = make_client(settings_for(rotated, site.broker), unique_id("node-c"))
    await new.connect(CONNECT_TIMEOUT_S)
    await new.publish(TOPICS.telemetry("c"), b"new certificate")


async def test_one_identity_cannot_take_over_anothers_session(site: Site, make_client: MakeClient) -> None:
    b = make_client(site.settings("b"), "node-b")
    await b.connect(CONNECT_TIMEOUT_S)
    # a picks b's client id: the broker uses a's user name as its client id instead of kicking b off.
    impostor = make_client(site.settings("a"), "node-b")
    await impostor.connect(CONNECT_TIMEOUT_S)
    # Had the broker closed b's connection, b would have seen that before this PUBACK (one socket, in order).
    await b.publish(TOPICS.telemetry("b"), b"still here")
    assert b.connected
    assert "disconnected" not in b.counters


async def test_a_password_line_made_in_python_is_accepted_by_mosquitto(site: Site, make_client: MakeClient) -> None:
    config = Path(security.load_registry(site.pki.root).deployments[0].config)
    assert config == site.broker.config_file.resolve()
    lines = BrokerFiles.beside(config).password_file.read_text().splitlines()
    registry = security.load_registry(site.pki.root)
    assert sorted(lines) == sorted(i.password_line for i in registry.identities.values() if i.password_line)
    node = make_client(site.settings("a"), unique_id("node-a"))
    await node.connect(CONNECT_TIMEOUT_S)  # Mosquitto hashed the password and matched the line


# -- the commands -------------------------------------------------------------------------------------


@pytest.fixture
def run_mosquitto(tmp_path: Path) -> Iterator[Any]:
    """``run(config, ports)``: Mosquitto on a config as an operator wrote it; stopped after the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def run(config: Path, ports: tuple[int, ...]) -> Any:
        log = tmp_path / "mosquitto.log"
        with log.open("ab") as handle:
            process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=handle, stderr=handle,
                                       stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(_listening(port) for port in ports):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(POLL_S)

        def reload() -> None:
            before = log.read_text().count("Reloading config.")
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + START_TIMEOUT_S
            while log.read_text().count("Reloading config.") <= before:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(POLL_S)

        return reload

    yield run
    for process in processes:
        process.terminate()
        process.wait(START_TIMEOUT_S)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


async def test_the_commands_set_up_a_site_a_real_broker_enforces(
    tmp_path: Path, make_client: MakeClient, run_mosquitto: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, etc, data = tmp_path / "pki", tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    data.mkdir()
    assert cli.main(["fleet", "init-pki", str(pki), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    assert cli.main(["fleet", "provision-node", "n1", "--pki", str(pki)]) == 0
    assert cli.main(["fleet", "provision-node", "n2", "--pki", str(pki), "--certificate"]) == 0
    assert cli.main(["fleet", "provision-node", "ops", "--pki", str(pki), "--controller"]) == 0
    out = capsys.readouterr().out
    assert 'username = "n1"' in out
    assert "client.key" in out
    port, certificate_port = free_port(), free_port()
    as_root = ["--user", "root"] if os.geteuid() == 0 else []  # started as root it would switch to "mosquitto"
    config = etc / "mosquitto.conf"
    assert cli.main(["fleet", "broker-config", "--pki", str(pki), "--out", str(config), "--bind", "127.0.0.1",
                     "--port", str(port), "--certificate-port", str(certificate_port), "--data-dir", str(data),
                     "--fleet-size", "10", *as_root]) == 0  # fmt: skip
    reload = run_mosquitto(config, (port, certificate_port))

    def node(name: str, listener: int, **values: Any) -> MqttClient:
        base = {"host": "127.0.0.1", "port": listener, "ca_file": pki / "ca.crt",
                "reconnect_min_s": TEST_RECONNECT_MIN_S, "reconnect_max_s": TEST_RECONNECT_MAX_S}  # fmt: skip
        return make_client(MqttSettings.model_validate(base | values), unique_id(name))

    def n1_password() -> str:
        return (pki / "clients" / "n1" / "password").read_text().strip()

    n1 = node("n1", port, username="n1", password=n1_password())
    await n1.connect(CONNECT_TIMEOUT_S)
    await n1.publish(TOPICS.telemetry("n1"), b"hello")
    n2_dir = tmp_path / "n2"
    n2_dir.mkdir()
    for name in ("client.crt", "client.key"):
        (n2_dir / name).write_bytes((pki / "clients" / "n2" / name).read_bytes())
    n2 = node("n2", certificate_port, cert_file=n2_dir / "client.crt", key_file=n2_dir / "client.key")
    await n2.connect(CONNECT_TIMEOUT_S)
    await n2.publish(TOPICS.telemetry("n2"), b"hello")

    old_password = n1_password()
    assert cli.main(["fleet", "rotate-node", "n1", "--pki", str(pki)]) == 0
    assert cli.main(["fleet", "revoke-node", "n2", "--pki", str(pki)]) == 0
    reload()
    await n1.wait_disconnected(CONNECT_TIMEOUT_S)  # its password line changed
    await refused_by_broker(node("n1", port, username="n1", password=old_password))
    await node("n1", port, username="n1", password=n1_password()).connect(CONNECT_TIMEOUT_S)
    await refused_at_tls(node("n2", certificate_port, cert_file=n2_dir / "client.crt", key_file=n2_dir / "client.key"))


@pytest.mark.parametrize(
    "case",
    [
        (["init-pki", "{pki}"], 1, "already holds a PKI"),
        (["init-pki", "{tmp}/new", "--host", "bad host"], 2, "invalid host"),
        (["init-pki", "{tmp}/new", "--prefix", "a/+/b"], 2, "invalid topic prefix"),
        (["provision-node", "a/b", "--pki", "{pki}"], 2, "invalid node id"),
        (["provision-node", "a:b", "--pki", "{pki}"], 2, "':'"),
        (["provision-node", "n1", "--pki", "{pki}"], 1, "already provisioned"),
        (["provision-node", "n2", "--pki", "{tmp}/new"], 1, "init-pki"),
        (["rotate-node", "n9", "--pki", "{pki}"], 1, "not provisioned"),
        (["revoke-node", "gone", "--pki", "{pki}"], 1, "revoked"),
        (["broker-config", "--pki", "{pki}", "--out", "{tmp}/new/x.conf"], 1, "not a directory"),
        (["broker-config", "--pki", "{pki}", "--out", "{tmp}/x.conf", "--fleet-size", "0"], 2, "at least 1"),
        (["broker-config", "--pki", "{pki}", "--out", "{tmp}/x.conf", "--port", "8884"], 2, "two different ports"),
        (["broker-config", "--pki", "{pki}", "--out", "{tmp}/x.conf", "--group", "no-such-group-here"], 2, "no group"),
    ],
)
def test_the_commands_refuse_bad_input_and_change_nothing(
    case: tuple[list[str], int, str], pki: PkiPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, status, message = case
    security.provision_node(pki.root, "n1")
    security.provision_node(pki.root, "gone")
    security.revoke_node(pki.root, "gone")
    capsys.readouterr()
    before = snapshot(tmp_path)
    argv = [arg.format(pki=pki.root, tmp=tmp_path) for arg in args]
    assert cli.main(["fleet", *argv]) == status
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path) == before
