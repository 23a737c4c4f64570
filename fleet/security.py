"""A locked-down broker for a real site: a private CA, one credential per node and per controller, and
Mosquitto's password, ACL, CRL and config files, all made from one registry. Torch-free.

A PKI directory (``init_pki``) holds::

    ca.key ca.crt              the site's CA (private key 0600): it signs the broker's and the clients' certificates
    server.key server.crt      the broker's TLS certificate, for the host names and addresses it is reached at
    crl.pem                    the certificates revoked so far (revoke_node, rotate_node)
    registry.json              every identity (node or controller): its kind, status, password hash or certificate
                               serial; the topic prefix; the broker configs to keep current (written atomically)
    clients/ID/                what a node or controller needs: ca.crt, and password or client.crt + client.key

Identities are node ids (one topic level, the broker user name; ACLs pin each node to its own topics) or
controller names. A node with a password connects to the password listener (TLS, server certificate
only); one with a client certificate (CN = its id) to the certificate listener, where Mosquitto takes
the certificate's CN as the user name (``use_identity_as_username``). Both listeners share the ACL.

``write_broker_config`` writes a mosquitto.conf and, beside it, the files it references; every later
change (provision, rotate, revoke) rewrites that config's password, ACL and CRL files. Mosquitto 2.0.11
re-reads all three on SIGHUP (measured, see ``revoke_node``).

Started as root, Mosquitto switches to user ``mosquitto`` before it reads the server key and the password
file (measured with 2.0.11): ``BrokerSettings.group`` makes those files 0640 in that user's group.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import grp
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from fleet.mqtt import MqttSettings
from fleet.protocol import DEFAULT_PREFIX, MAX_PAYLOAD_BYTES, TopicKind, Topics, validate_node_id
from zimage_edge.errors import ZimageEdgeError

# -- validity -----------------------------------------------------------------------------------------
# The CA signs every credential of the site: replacing it means re-provisioning every node, so it lives
# as long as the hardware it is deployed with (10 years). Its key should live offline between uses.
CA_VALIDITY = datetime.timedelta(days=3650)
# The broker's certificate is renewed at a maintenance window; two years bounds how long a leaked broker
# key stays useful while sparing the site a yearly visit. Node certificates likewise; rotate_node renews.
SERVER_VALIDITY = datetime.timedelta(days=730)
CLIENT_VALIDITY = datetime.timedelta(days=730)
# Certificates and the CRL are valid from a little before they were made: a node whose clock runs a few
# minutes behind the operator's machine would otherwise refuse them ("not yet valid").
BACKDATE = datetime.timedelta(minutes=5)

# -- Mosquitto's password hash --------------------------------------------------------------------------
# Mosquitto 2.x ``$7$`` lines: ``user:$7$ITERATIONS$BASE64(SALT)$BASE64(PBKDF2-SHA512(password, salt))``,
# standard base64 with padding, a 12-byte salt and a 64-byte hash; mosquitto_passwd 2.0.11 writes 101
# iterations (measured: its lines verify with hashlib.pbkdf2_hmac("sha512", password, salt, 101)). The broker
# reads the count from each line. The passwords made here are 256 random bits, for which 101 iterations
# are no weakness, and the broker (one thread) hashes once per CONNECT: a thousand nodes reconnecting
# after a restart must not cost it seconds.
PBKDF2_ITERATIONS: Final = 101
SALT_BYTES: Final = 12
HASH_BYTES: Final = 64
# secrets.token_urlsafe(32): 256 bits, 43 characters of [A-Za-z0-9_-] (safe in TOML, shells and URLs).
PASSWORD_BYTES: Final = 32
_PASSWORD_LINE = re.compile(r"^([^:\s]+):\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")

# -- the broker ---------------------------------------------------------------------------------------
# 8883 is MQTT over TLS (IANA); 8884 is where test.mosquitto.org requires client certificates: a common choice.
DEFAULT_PORT: Final = 8883
DEFAULT_CERTIFICATE_PORT: Final = 8884
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")
DEFAULT_CONTROLLER: Final = "controller"
# Fleet size the limits are sized for when the operator does not say.
DEFAULT_FLEET_SIZE: Final = 1000
REGISTRY_VERSION: Final = 1
# What a node publishes (its birth/death, what it runs, metrics, progress) and reads (what to run, which
# outbox rows it may delete). It also reads its own ``state``: a late will of an earlier connection that
# replaced its retained birth makes it publish its birth again (fleet/node.py).
NODE_WRITES: Final = (TopicKind.STATE, TopicKind.REPORTED, TopicKind.TELEMETRY, TopicKind.EVENTS)
NODE_READS: Final = (TopicKind.STATE, TopicKind.DESIRED, TopicKind.ACK)
CONTROLLER_WRITES: Final = (TopicKind.DESIRED, TopicKind.ACK)

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DNS_NAME_MAX = 253


class PkiError(ZimageEdgeError):
    """The PKI directory or an identity in it is not in the state the operation needs."""


class Role(StrEnum):
    NODE = "node"
    CONTROLLER = "controller"


class CredentialKind(StrEnum):
    PASSWORD = "password"
    CERTIFICATE = "certificate"


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Identity(BaseModel):
    """One node or controller in the registry (never a plain password: only Mosquitto's hash line)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    kind: CredentialKind
    status: Status = Status.ACTIVE
    password_line: str | None = Field(default=None, description="the Mosquitto $7$ line of a password identity")
    serial: str | None = Field(default=None, description="hex serial of a certificate identity's current certificate")
    issued_at: float = Field(description="Unix time its current credential was made")
    revoked_at: float | None = None


class RevokedCertificate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serial: str = Field(description="hex serial")
    identity: str
    revoked_at: float


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="absolute path of a mosquitto.conf written by write_broker_config")
    group: str | None = Field(default=None, description="group its private files are readable by")


class Registry(BaseModel):
    """``registry.json``: everything the broker files are made from."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = REGISTRY_VERSION
    prefix: str = DEFAULT_PREFIX
    hosts: list[str]
    identities: dict[str, Identity] = Field(default_factory=dict)
    revoked: list[RevokedCertificate] = Field(default_factory=list)
    crl_number: int = Field(default=1, ge=1, description="number of the current CRL; each new CRL has the next")
    deployments: list[Deployment] = Field(
        default_factory=list, description="broker configs whose password, ACL and CRL files to keep current"
    )


@dataclass(frozen=True)
class PkiPaths:
    """Where things are in a PKI directory."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    def client_dir(self, identity: str) -> Path:
        return self.clients / identity


@dataclass(frozen=True)
class Credentials:
    """What one node or controller needs to connect (the files live in ``directory``)."""

    identity: str
    role: Role
    kind: CredentialKind
    directory: Path
    ca_file: Path
    password: SecretStr | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def username(self) -> str | None:
        # On the certificate listener the broker takes the certificate's CN as the user name.
        return self.identity if self.kind is CredentialKind.PASSWORD else None

    def mqtt_settings(self, host: str, port: int, **overrides: Any) -> MqttSettings:
        """``MqttSettings`` for this identity (``port``: the listener of its kind)."""
        values: dict[str, Any] = {"host": host, "port": port, "ca_file": self.ca_file}
        if self.kind is CredentialKind.PASSWORD:
            values |= {"username": self.identity, "password": self.password}
        else:
            values |= {"cert_file": self.cert_file, "key_file": self.key_file}
        return MqttSettings.model_validate(values | overrides)


# -- pure parts ---------------------------------------------------------------------------------------


def validate_identity(name: str) -> str:
    """``name`` if it can be a node id, a broker user name and a certificate CN; ``ValueError`` otherwise."""
    validate_node_id(name)
    if ":" in name:
        # Mosquitto splits a password file line at its first ':' (user:hash).
        raise ValueError(f"invalid identity {name!r}: ':' cannot appear in a Mosquitto user name")
    return name


def validate_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name; ``ValueError`` otherwise."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    labels = host.split(".")
    if not host or len(host) > _DNS_NAME_MAX or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid host {host!r}: a DNS name or an IP address")
    return host


def mosquitto_password_line(
    username: str, password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A Mosquitto 2.x password file line (``$7$``: PBKDF2-SHA512), as ``mosquitto_passwd`` writes it."""
    validate_identity(username)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password_line(line: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` password file line (``ValueError`` if it is not one)."""
    match = _PASSWORD_LINE.match(line.strip())
    if match is None:
        raise ValueError("not a Mosquitto $7$ password line")
    salt, expected = base64.b64decode(match[3]), base64.b64decode(match[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(match[2]))
    return hmac.compare_digest(digest, expected)


def password_file_text(registry: Registry) -> str:
    """Mosquitto's password file: one line per active password identity."""
    lines = [
        identity.password_line
        for _, identity in sorted(registry.identities.items())
        if identity.status is Status.ACTIVE and identity.password_line is not None
    ]
    return "".join(f"{line}\n" for line in lines)


def acl_text(registry: Registry) -> str:
    """Mosquitto's ACL file: a ``user`` block per active identity, and nothing for anyone else.

    A node writes its own state/reported/telemetry/events and reads its own state/desired/ack; a controller
    reads every node topic, writes every node's desired and ack, and owns controller/state. Explicit
    blocks rather than ``pattern`` rules: a pattern applies to every user, controllers included, and a
    revoked identity keeps nothing when its block goes.
    """
    topics = Topics(registry.prefix)
    lines = [
        "# Written by zimage-edge from registry.json; regenerated on every change: do not edit.",
        "# No rule before the first 'user' line: anonymous clients (refused anyway) get nothing.",
    ]
    for name, identity in sorted(registry.identities.items()):
        if identity.status is not Status.ACTIVE:
            continue
        lines += ["", f"user {name}"]
        if identity.role is Role.NODE:
            for kind in dict.fromkeys((*NODE_WRITES, *NODE_READS)):
                rights = ("read" if kind in NODE_READS else "") + ("write" if kind in NODE_WRITES else "")
                lines.append(f"topic {rights} {topics.node(kind, name)}")
        else:
            for kind in TopicKind:
                if kind is TopicKind.CONTROLLER_STATE:
                    continue
                rights = "readwrite" if kind in CONTROLLER_WRITES else "read"
                lines.append(f"topic {rights} {topics.all_nodes(kind)}")
            lines.append(f"topic readwrite {topics.controller_state}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BrokerLimits:
    """Mosquitto's limits for a fleet; ``for_fleet`` sizes them (each value's reason is in the config)."""

    nodes: int  # the fleet size they were sized for
    max_connections: int
    max_queued_messages: int
    max_inflight_messages: int
    max_packet_size: int
    autosave_interval_s: int

    @classmethod
    def for_fleet(
        cls,
        nodes: int = DEFAULT_FLEET_SIZE,
        *,
        controllers: int = 2,
        telemetry_interval_s: float = 10.0,
        controller_outage_s: float = 900.0,
    ) -> BrokerLimits:
        """Limits for ``nodes`` nodes sending telemetry every ``telemetry_interval_s``, whose controller may be
        away ``controller_outage_s`` without the broker dropping what was queued for it."""
        if nodes < 1 or controllers < 1 or telemetry_interval_s <= 0 or controller_outage_s < 0:
            raise ValueError("nodes and controllers must be at least 1, the interval positive, the outage >= 0")
        queued = math.ceil(nodes / telemetry_interval_s * controller_outage_s)
        return cls(
            nodes=nodes,
            # Twice the fleet: room to grow before the config is regenerated; beyond that a runaway client
            # (a reconnect loop that leaks sockets) cannot take every file descriptor of the broker.
            max_connections=2 * (nodes + controllers) + CONNECTION_HEADROOM,
            max_queued_messages=max(MIN_QUEUED_MESSAGES, queued),
            max_inflight_messages=MAX_INFLIGHT_MESSAGES,
            max_packet_size=MAX_PACKET_BYTES,
            autosave_interval_s=AUTOSAVE_INTERVAL_S,
        )


# Operators' tools (mosquitto_sub while debugging, a monitoring probe) beside the fleet's connections.
CONNECTION_HEADROOM: Final = 16
# Mosquitto's default is 1000 per client, beyond which messages for an offline persistent session are
# dropped without a word. Only a controller away for a while queues that many (telemetry of the whole
# fleet); nodes queue their few desired/ack updates. 10,000 is the floor for a small fleet.
MIN_QUEUED_MESSAGES: Final = 10_000
# Mosquitto's default is 20. A controller's throughput is about in-flight / round trip: 100 at a 20 ms WAN
# round trip is 5,000 QoS 1 messages/s, what one Python client handles (notes/infra.md).
MAX_INFLIGHT_MESSAGES: Final = 100
# fleet.protocol refuses payloads over 64 KiB; topic, header and properties add a few hundred bytes. Twice
# that bounds what a buggy or hostile client can make the broker buffer; it is disconnected beyond it.
MAX_PACKET_BYTES: Final = 2 * MAX_PAYLOAD_BYTES
# Mosquitto saves its database every 1800 s by default: a crash would lose half an hour of retained
# desired states and queued messages. Ten seconds bounds the loss (nodes' outboxes resend what was not
# acknowledged) at the cost of a save every ten seconds, which takes milliseconds at these sizes.
AUTOSAVE_INTERVAL_S: Final = 10


@dataclass(frozen=True)
class BrokerFiles:
    """The files a broker config references (absolute paths)."""

    config: Path
    password_file: Path
    acl_file: Path
    crl_file: Path
    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def beside(cls, config: Path) -> BrokerFiles:
        """``NAME.conf`` and, in its directory, ``NAME.passwd``, ``NAME.acl``, ``NAME.crl.pem``, ``NAME.ca.crt``,
        ``NAME.server.crt``, ``NAME.server.key`` (a conf.d directory includes only ``*.conf``)."""
        config = config.resolve()

        def sibling(suffix: str) -> Path:
            return config.with_name(f"{config.stem}.{suffix}")

        return cls(config, sibling("passwd"), sibling("acl"), sibling("crl.pem"), sibling("ca.crt"),
                   sibling("server.crt"), sibling("server.key"))  # fmt: skip


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how the broker listens, and what it keeps."""

    data_dir: Path = Path("/var/lib/mosquitto")
    bind: str | None = None  # None: every interface
    port: int = DEFAULT_PORT
    certificate_port: int | None = DEFAULT_CERTIFICATE_PORT  # None: no client-certificate listener
    limits: BrokerLimits = field(default_factory=BrokerLimits.for_fleet)
    run_as: str | None = None  # None: Mosquitto's default (user "mosquitto" when started as root)
    # Group of the broker's user: its server key and password file become 0640 in it (else 0600, readable
    # only by whoever wrote them). Debian's broker, started as root, reads them as user "mosquitto".
    group: str | None = None
    log_dest: str = "stderr"

    def __post_init__(self) -> None:
        ports = [self.port] if self.certificate_port is None else [self.port, self.certificate_port]
        if not all(0 < port < 65536 for port in ports) or len(set(ports)) != len(ports):
            raise ValueError(f"listener ports {ports}: two different ports in 1-65535")
        if self.bind is not None:
            validate_host(self.bind)


def broker_config(files: BrokerFiles, settings: BrokerSettings) -> str:
    """A complete mosquitto.conf (Mosquitto 2.0) for the fleet: TLS only, no anonymous access, the ACL."""
    limits = settings.limits
    bind = f" {settings.bind}" if settings.bind else ""
    lines = [
        "# Mosquitto configuration of a zimage-edge fleet, written by `zimage-edge fleet broker-config`.",
        "# Regenerate it rather than edit it. Its password, ACL and CRL files are rewritten by provision-node,",
        "# rotate-node and revoke-node: send the broker SIGHUP after those (it re-reads all three).",
        "# The broker's user must be able to read every file named here.",
        "",
        "# One password file and one ACL for both listeners.",
        "per_listener_settings false",
        "# Every client is a provisioned node or controller.",
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
        "",
        "# Retained desired states and queued QoS 1 messages survive a restart.",
        "persistence true",
        f"persistence_location {settings.data_dir}/",
        f"# Save every {limits.autosave_interval_s} s (default 1800): a crash loses at most that much; nodes' outboxes",
        "# resend what the controller did not acknowledge.",
        f"autosave_interval {limits.autosave_interval_s}",
        "",
        f"# Limits sized for a fleet of {limits.nodes} nodes (`broker-config --fleet-size`).",
        "# Per client. The default, 1000, drops what is queued beyond it for an offline persistent session",
        "# without a word; a controller away for a while has the whole fleet's telemetry queued.",
        f"max_queued_messages {limits.max_queued_messages}",
        "# QoS 1 messages in flight to one client (default 20): throughput is about this / round trip.",
        f"max_inflight_messages {limits.max_inflight_messages}",
        "# fleet.protocol payloads are at most 64 KiB; a client sending a larger packet is disconnected.",
        "# (message_size_limit is deprecated in Mosquitto 2.0 in favour of this.)",
        f"max_packet_size {limits.max_packet_size}",
        "",
        f"log_dest {settings.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if settings.run_as is not None:
        lines.append(f"user {settings.run_as}")
    tls = [
        f"cafile {files.ca_file}",
        f"certfile {files.cert_file}",
        f"keyfile {files.key_file}",
        "# TLS 1.2 and 1.3 only.",
        "tls_version tlsv1.2",
        "# The client id is the user name: one identity cannot take over another's session.",
        "use_username_as_clientid true",
        "# Twice the fleet: room to grow; a runaway client cannot take every file descriptor (the broker's",
        "# own limit, e.g. LimitNOFILE, must be above this).",
        f"max_connections {limits.max_connections}",
    ]
    lines += ["", "# Nodes and controllers with a password: TLS with the server's certificate.",
              f"listener {settings.port}{bind}", *tls]  # fmt: skip
    if settings.certificate_port is not None:
        lines += [
            "",
            "# Nodes and controllers with a client certificate of this site's CA; its CN is the user name.",
            f"listener {settings.certificate_port}{bind}",
            *tls,
            "require_certificate true",
            "use_identity_as_username true",
            "# Revoked certificates (re-read on SIGHUP).",
            f"crlfile {files.crl_file}",
        ]
    return "\n".join(lines) + "\n"


# -- the PKI directory ----------------------------------------------------------------------------------


def init_pki(
    directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, prefix: str = DEFAULT_PREFIX, force: bool = False
) -> PkiPaths:
    """A CA and the broker's server certificate (for ``hosts``: DNS names or IP addresses), an empty CRL and
    an empty registry in ``directory``. Refuses a directory that already holds a PKI unless ``force``, which
    also removes every credential issued by the old CA and forgets the broker configs written for it (run
    broker-config again: they hold the old CA)."""
    hosts = [validate_host(host) for host in hosts]
    if not hosts:
        raise ValueError("at least one host the broker is reached at")
    Topics(prefix)  # ValueError for an invalid prefix
    paths = PkiPaths(Path(directory))
    if paths.root.exists() and not paths.root.is_dir():
        raise PkiError(f"{paths.root} is not a directory")
    existing = [p for p in (paths.ca_key, paths.ca_cert, paths.registry) if p.exists()]
    if existing and not force:
        raise PkiError(f"{paths.root} already holds a PKI ({existing[0].name}); --force replaces it")
    paths.root.mkdir(parents=True, exist_ok=True)
    with _locked(paths, new=True):
        now = _now()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zimage-edge fleet CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            # path_length 0: this CA signs end-entity certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        names = [_general_name(host) for host in hosts]
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _issue(
            ca_key,
            ca_cert,
            server_key,
            hosts[0],
            validity=SERVER_VALIDITY,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            san=x509.SubjectAlternativeName(names),
        )
        registry = Registry(prefix=prefix, hosts=hosts)
        if force and paths.clients.exists():
            shutil.rmtree(paths.clients)
        _write_atomic(paths.ca_key, _private_pem(ca_key), 0o600)
        _write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_atomic(paths.server_key, _private_pem(server_key), 0o600)
        _write_atomic(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
        _write_atomic(paths.crl, _crl_pem(ca_key, ca_cert, registry))
        _save_registry(paths, registry)
    return paths


def load_registry(pki_dir: Path) -> Registry:
    """The registry of a PKI directory (``PkiError`` if there is none or it is damaged)."""
    paths = PkiPaths(Path(pki_dir))
    try:
        return Registry.model_validate_json(paths.registry.read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"{paths.root} holds no PKI (no registry.json): run `zimage-edge fleet init-pki` first"
        ) from None
    except (OSError, ValidationError) as exc:
        raise PkiError(f"cannot read {paths.registry}: {exc}") from exc


def provision_node(pki_dir: Path, node_id: str, kind: CredentialKind | str = CredentialKind.PASSWORD) -> Credentials:
    """Credentials for a new node (a random password, or a client certificate with CN = ``node_id``)."""
    return _provision(Path(pki_dir), node_id, Role.NODE, _kind(kind))


def provision_nodes(
    pki_dir: Path, node_ids: Sequence[str], kind: CredentialKind | str = CredentialKind.PASSWORD
) -> list[Credentials]:
    """``provision_node`` for many nodes at once (a site's first thousand): one lock, one registry and
    broker-file write for all of them instead of one each. All or none are recorded: an id that is
    invalid, repeated or already provisioned refuses the whole batch before anything is written."""
    ids = [validate_identity(node_id) for node_id in node_ids]
    if len(set(ids)) != len(ids):
        raise PkiError("a node id is given twice")
    paths = PkiPaths(Path(pki_dir))
    with _locked(paths):
        registry = load_registry(paths.root)
        taken = [i for i in ids if (e := registry.identities.get(i)) is not None and e.status is Status.ACTIVE]
        if taken:
            raise PkiError(f"already provisioned: {', '.join(taken[:5])}: rotate-node renews one")
        made = [_issue_credentials(paths, registry, i, Role.NODE, _kind(kind), commit=False) for i in ids]
        _commit(paths, registry)
    return made


def provision_controller(
    pki_dir: Path, name: str = DEFAULT_CONTROLLER, kind: CredentialKind | str = CredentialKind.PASSWORD
) -> Credentials:
    """Credentials for a controller: reads every node topic, writes desired and ack. One per replica: the
    client id is the user name, so two connections of one identity take each other's session over."""
    return _provision(Path(pki_dir), name, Role.CONTROLLER, _kind(kind))


def rotate_node(pki_dir: Path, identity: str) -> Credentials:
    """New credentials of the same kind for an active identity. The old password stops working when the broker
    re-reads its password file (SIGHUP); the old certificate joins the CRL (also re-read on SIGHUP)."""
    paths = PkiPaths(Path(pki_dir))
    with _locked(paths):
        registry = load_registry(paths.root)
        current = _active(registry, identity)
        return _issue_credentials(paths, registry, identity, current.role, current.kind)


def revoke_node(pki_dir: Path, identity: str) -> None:
    """Revoke an identity: its password line and ACL block go, its certificate joins the CRL, its files in
    ``clients/`` are deleted. Measured with Mosquitto 2.0.11, after SIGHUP: a connected password client
    whose line is gone is disconnected; a connected certificate client stays connected but may publish and
    receive nothing (its ACL block is gone), and a new connection with the revoked certificate fails its
    TLS handshake (the CRL is re-read)."""
    paths = PkiPaths(Path(pki_dir))
    with _locked(paths):
        registry = load_registry(paths.root)
        current = _active(registry, identity)
        now = time.time()
        if current.serial is not None:
            registry.revoked.append(RevokedCertificate(serial=current.serial, identity=identity, revoked_at=now))
        registry.identities[identity] = current.model_copy(
            update={"status": Status.REVOKED, "password_line": None, "revoked_at": now}
        )
        _commit(paths, registry)
        shutil.rmtree(paths.client_dir(identity), ignore_errors=True)


def write_broker_config(pki_dir: Path, config: Path, settings: BrokerSettings | None = None) -> BrokerFiles:
    """Write ``config`` and, beside it, the files it references (``BrokerFiles.beside``): copies of the CA and
    server certificate and key, the CRL, the password file and the ACL. The config is remembered in the
    registry, so later changes rewrite its password, ACL and CRL files."""
    settings = settings or BrokerSettings()
    paths = PkiPaths(Path(pki_dir))
    files = BrokerFiles.beside(Path(config))
    if not files.config.parent.is_dir():
        raise PkiError(f"{files.config.parent} is not a directory")
    _private_mode(settings.group)  # ValueError for an unknown group, before anything is written
    with _locked(paths):
        registry = load_registry(paths.root)
        nodes = sum(1 for i in registry.identities.values() if i.role is Role.NODE and i.status is Status.ACTIVE)
        if settings.limits.max_connections < nodes:
            raise ValueError(
                f"max_connections {settings.limits.max_connections} is below the {nodes} provisioned nodes"
            )
        _write_atomic(files.ca_file, paths.ca_cert.read_bytes())
        _write_atomic(files.cert_file, paths.server_cert.read_bytes())
        _write_atomic(files.key_file, paths.server_key.read_bytes(), *_private_mode(settings.group))
        _write_broker_credentials(paths, registry, files, settings.group)
        _write_atomic(files.config, broker_config(files, settings).encode())
        deployment = Deployment(config=str(files.config), group=settings.group)
        registry.deployments = [*(d for d in registry.deployments if d.config != deployment.config), deployment]
        _save_registry(paths, registry)
    return files


# -- internals ----------------------------------------------------------------------------------------


def _kind(kind: CredentialKind | str) -> CredentialKind:
    try:
        return CredentialKind(kind)
    except ValueError:
        raise ValueError(f"credential kind {kind!r}: one of {', '.join(CredentialKind)}") from None


def _provision(root: Path, identity: str, role: Role, kind: CredentialKind) -> Credentials:
    validate_identity(identity)
    paths = PkiPaths(root)
    with _locked(paths):
        registry = load_registry(paths.root)
        existing = registry.identities.get(identity)
        if existing is not None and existing.status is Status.ACTIVE:
            raise PkiError(
                f"{identity} is already provisioned ({existing.role}, {existing.kind}): rotate-node renews it"
            )
        return _issue_credentials(paths, registry, identity, role, kind)


def _issue_credentials(
    paths: PkiPaths, registry: Registry, identity: str, role: Role, kind: CredentialKind, *, commit: bool = True
) -> Credentials:
    """Make and write new credentials for ``identity``, revoking its previous certificate if any; the registry
    is the commit point (written after the client's files, before the broker's), by this call or, with
    ``commit=False``, by the caller once for a batch."""
    now = time.time()
    previous = registry.identities.get(identity)
    if previous is not None and previous.status is Status.ACTIVE and previous.serial is not None:
        registry.revoked.append(RevokedCertificate(serial=previous.serial, identity=identity, revoked_at=now))
    directory = paths.client_dir(identity)
    staging = paths.clients / f".{identity}.{secrets.token_hex(4)}.tmp"
    staging.mkdir(parents=True, mode=0o700)
    try:
        shutil.copyfile(paths.ca_cert, staging / "ca.crt")
        password: SecretStr | None = None
        entry = Identity(role=role, kind=kind, issued_at=now)
        if kind is CredentialKind.PASSWORD:
            plain = secrets.token_urlsafe(PASSWORD_BYTES)
            password = SecretStr(plain)
            entry.password_line = mosquitto_password_line(identity, plain)
            _write_atomic(staging / "password", f"{plain}\n".encode(), 0o600)
        else:
            ca_key, ca_cert = _load_ca(paths)
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(
                ca_key, ca_cert, key, identity, validity=CLIENT_VALIDITY, usage=ExtendedKeyUsageOID.CLIENT_AUTH
            )
            entry.serial = f"{cert.serial_number:x}"
            _write_atomic(staging / "client.crt", cert.public_bytes(serialization.Encoding.PEM))
            _write_atomic(staging / "client.key", _private_pem(key), 0o600)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    registry.identities[identity] = entry
    if commit:
        _commit(paths, registry)
    return Credentials(
        identity=identity, role=role, kind=kind, directory=directory, ca_file=directory / "ca.crt", password=password,
        cert_file=directory / "client.crt" if kind is CredentialKind.CERTIFICATE else None,
        key_file=directory / "client.key" if kind is CredentialKind.CERTIFICATE else None,
    )  # fmt: skip


def _active(registry: Registry, identity: str) -> Identity:
    current = registry.identities.get(identity)
    if current is None:
        raise PkiError(f"{identity} is not provisioned")
    if current.status is not Status.ACTIVE:
        raise PkiError(f"{identity} is revoked: provision-node gives it new credentials")
    return current


def _commit(paths: PkiPaths, registry: Registry) -> None:
    """Save the registry, then bring the CRL and every remembered broker config's files up to date."""
    ca_key, ca_cert = _load_ca(paths)
    registry.crl_number += 1
    crl = _crl_pem(ca_key, ca_cert, registry)
    # A config deleted since (a test's temporary broker, a decommissioned one) is forgotten.
    registry.deployments = [d for d in registry.deployments if Path(d.config).is_file()]
    _save_registry(paths, registry)
    _write_atomic(paths.crl, crl)
    for deployment in registry.deployments:
        _write_broker_credentials(paths, registry, BrokerFiles.beside(Path(deployment.config)), deployment.group)


def _write_broker_credentials(paths: PkiPaths, registry: Registry, files: BrokerFiles, group: str | None) -> None:
    # The password file holds hashes only, still private: an offline guess needs the hash first.
    mode, gid = _private_mode(group)
    _write_atomic(files.password_file, password_file_text(registry).encode(), mode, gid)
    _write_atomic(files.acl_file, acl_text(registry).encode())
    _write_atomic(files.crl_file, paths.crl.read_bytes())


def _private_mode(group: str | None) -> tuple[int, int | None]:
    """Mode and group id of a file only the broker may read: 0600, or 0640 in ``group``."""
    if group is None:
        return 0o600, None
    try:
        return 0o640, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group {group!r} on this machine") from None


def _load_ca(paths: PkiPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{paths.ca_key} is not the EC key init-pki writes")
    return key, x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    validity: datetime.timedelta,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # Never past the CA: a chain is only as valid as its shortest-lived link.
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _crl_pem(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, registry: Registry) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        # OpenSSL refuses every client certificate once the CRL's next update has passed, and a quiet site may
        # revoke nothing for years: the CRL is valid as long as the CA (a revocation writes a new one anyway).
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(registry.crl_number), critical=False)
    )
    for revoked in registry.revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(revoked.serial, 16))
            .revocation_date(datetime.datetime.fromtimestamp(revoked.revoked_at, datetime.UTC))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _save_registry(paths: PkiPaths, registry: Registry) -> None:
    _write_atomic(paths.registry, (registry.model_dump_json(indent=2) + "\n").encode())


def _write_atomic(path: Path, data: bytes, mode: int = 0o644, gid: int | None = None) -> None:
    """Write ``path`` whole or not at all: a temporary file in its directory (created with ``mode``, so a
    private key is never readable by others, not even for a moment), flushed to disk, then renamed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # the umask does not decide
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(paths: PkiPaths, *, new: bool = False) -> Iterator[None]:
    """One change to a PKI directory at a time (two operators, or a script run twice). Outside ``init_pki``
    a directory without a registry is refused before anything (the lock file included) is written there."""
    if not paths.root.is_dir() or not (new or paths.registry.is_file()):
        raise PkiError(f"{paths.root} holds no PKI: run `zimage-edge fleet init-pki` first")
    with paths.lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
