#!/usr/bin/env python3
"""Write the secrets a site overlay reads (its ``secrets/`` directory), with zimage-edge's own tools.

    python k3s/site-secrets.py k3s/overlays/edge-site --signing-public-key keys/zimage-edge.pub \
        --node orin-nano-01 --node agx-01
    python k3s/site-secrets.py k3s/overlays/datacenter-site --signing-public-key keys/zimage-edge.pub \
        --node t4-01 --controller-replicas 3 --database-url-file db-url

Run it with zimage-edge installed (torch is not needed). The first run makes the site's PKI
(``secrets/pki``: the broker's CA and certificate, one broker password per node and one for the
controller), the broker's password file and ACL, the controller's, agents' and sidecars'
configurations, and three keys printed once and kept in ``secrets/`` (mode 0600): the operators'
controller token, the clients' agent key and Prometheus's scrape key. A later run with more
``--node`` flags provisions only the new nodes and rewrites the files that list them; everything
else is kept. ``secrets/`` holds private keys: keep it out of version control and off shared disks.

With ``--controller-replicas N`` the controller runs as N replicas on the site's PostgreSQL
(k3s/components/controller-replicas): one broker identity per replica, named as its pod
(``zimage-controller-0`` ...), their passwords in ``controller-credentials.env``, the database URL
(read from ``--database-url-file``) in ``database-url``, and ``controller.toml.in``, the replicas' shared
config, which each pod's init container completes with its URL, name and password. Give the same two
options on every later run of such a site.

The paths written into the configurations are where the manifests mount the files (k3s/base,
k3s/agent); tests/k3s checks that every one of them resolves in the rendered overlays.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tomllib
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from edge_agent.settings import AgentSettings, ApiKey
from fleet import security
from fleet.auth import ApiToken, Role
from fleet.cli import ControllerSettings
from fleet.mqtt import MqttSettings
from fleet.node import NodeConfig
from fleet.schema import database_url
from quantize.signing import load_public_key
from zimage_edge.errors import ZimageEdgeError

NAMESPACE = "zimage"
# Service names and ports of k3s/base (broker.yaml, controller.yaml) and the agent's port (k3s/agent).
BROKER_SERVICE = "mosquitto"
BROKER_PORT = security.DEFAULT_PORT
CONTROLLER_SERVICE = "zimage-controller"
CONTROLLER_PORT = 8700
AGENT_PORT = 8188
# Mount points in the pods.
SIGNING_KEY = "/etc/zimage/signing/signing.pub"
MQTT_CA = "/etc/zimage/mqtt/ca.crt"
CONTROLLER_DATA = "/var/lib/zimage-controller"
NODE_STORE = "/var/lib/zimage/models"
BROKER_DATA = Path("/mosquitto/data")
# The sidecar's config template: the pod's init container fills these in (k3s/agent/daemonset.yaml).
NODE_ID_MARK, PASSWORD_MARK, CLASS_MARK = "@NODE_ID@", "@PASSWORD@", "@DEVICE_CLASS@"
# The controller replicas (k3s/components/controller-replicas): the StatefulSet's pods are
# <name>-0, <name>-1, ...; each is a controller id and a broker identity. Their config template is
# completed by the pod's init container: the database line first, then these marks replaced.
CONTROLLER_SET = "zimage-controller"
CONTROLLER_ID_MARK = "@CONTROLLER_ID@"
# The single controller's broker identity (k3s/base).
SINGLE_CONTROLLER = "controller"
# The replicas' MQTT shared-subscription group (fleet/controller.py ControllerConfig.replica_group).
REPLICA_GROUP = "controllers"
# 256-bit keys, as the broker passwords (fleet/security.py PASSWORD_BYTES).
KEY_BYTES = 32


def broker_hosts() -> list[str]:
    """The names the broker's certificate must carry: its Service, short and qualified."""
    return [BROKER_SERVICE, f"{BROKER_SERVICE}.{NAMESPACE}.svc", f"{BROKER_SERVICE}.{NAMESPACE}.svc.cluster.local"]


def _keep_key(path: Path) -> str:
    """The key in ``path``, made (0600) and announced on first use."""
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    print(f"new key in {path}")
    return key


def _quote(value: str) -> str:
    # A TOML basic string: the values here are paths, names, URLs and url-safe keys.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _controller_text(controller_id: str, password: str, operator_token: str, extra: list[str]) -> str:
    mqtt = MqttSettings(host=BROKER_SERVICE, port=BROKER_PORT, ca_file=Path(MQTT_CA), username=controller_id,
                        password=password)  # type: ignore[arg-type]  # fmt: skip
    return "\n".join(
        [
            f"controller_id = {_quote(controller_id)}",
            *extra,
            'host = "0.0.0.0"',
            f"port = {CONTROLLER_PORT}",
            f"public_url = {_quote(f'http://{CONTROLLER_SERVICE}:{CONTROLLER_PORT}')}",
            f"signing_public_keys = [{_quote(SIGNING_KEY)}]",
            "",
            "[[api_tokens]]",
            'name = "operator"',
            f"sha256 = {_quote(ApiToken.hash(operator_token))}",
            f"role = {_quote(Role.OPERATOR.value)}",
            "",
            mqtt.toml(),
        ]
    )


def controller_toml(password: str, operator_token: str) -> str:
    """The single controller's config: SQLite on its claim."""
    database = f"database = {_quote(CONTROLLER_DATA + '/fleet.db')}"
    text = _controller_text(SINGLE_CONTROLLER, password, operator_token, [database])
    ControllerSettings.model_validate(tomllib.loads(text))
    return text


def check_database_url(url: str) -> str:
    """``url`` if it names PostgreSQL and can sit in a TOML string as it is; ``ValueError`` otherwise."""
    if any(c in url for c in '"\\') or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("the database URL holds a quote, a backslash, a space or a control character: "
                         "percent-encode it")  # fmt: skip
    try:
        backend = make_url(database_url(url)).get_backend_name() if "://" in url else "sqlite"
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"the database URL does not parse: {exc}") from exc
    if backend != "postgresql":
        raise ValueError(f"controller replicas share a PostgreSQL database, not {backend}: a postgresql:// URL")
    return url


def complete_replica_toml(template: str, database: str, replica: str, password: str) -> str:
    """What a replica's init container writes (k3s/components/controller-replicas/statefulset.yaml)."""
    body = template.replace(CONTROLLER_ID_MARK, replica).replace(PASSWORD_MARK, password)
    return f"database = {_quote(database)}\n{body}"


def replica_toml_template(operator_token: str, database: str) -> str:
    """The replicas' shared config, less its database line; checked completed for a replica."""
    extra = [f"replica_group = {_quote(REPLICA_GROUP)}"]
    text = _controller_text(CONTROLLER_ID_MARK, PASSWORD_MARK, operator_token, extra)
    completed = complete_replica_toml(text, database, f"{CONTROLLER_SET}-0", "x")
    ControllerSettings.model_validate(tomllib.loads(completed))
    return text


def replica_ids(replicas: int) -> list[str]:
    return [f"{CONTROLLER_SET}-{i}" for i in range(replicas)]


def agent_toml(client_key: str, sidecar_key: str, scrape_key: str) -> str:
    keys = [("clients", client_key, False), ("node-sidecar", sidecar_key, True), ("prometheus", scrape_key, True)]
    lines = [f"trusted_keys = [{_quote(SIGNING_KEY)}]"]
    for name, key, admin in keys:
        lines += ["", "[[api_keys]]", f"name = {_quote(name)}", f"sha256 = {_quote(ApiKey.hash(key))}",
                  f"admin = {'true' if admin else 'false'}"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    AgentSettings(model="check", host="0.0.0.0", **tomllib.loads(text))
    return text


def node_toml_template(sidecar_key: str) -> str:
    mqtt = MqttSettings(host=BROKER_SERVICE, port=BROKER_PORT, ca_file=Path(MQTT_CA), username=NODE_ID_MARK,
                        password=PASSWORD_MARK)  # type: ignore[arg-type]  # fmt: skip
    text = "\n".join(
        [
            f"node_id = {_quote(NODE_ID_MARK)}",
            f"agent_url = {_quote(f'http://127.0.0.1:{AGENT_PORT}')}",
            f"agent_key = {_quote(sidecar_key)}",
            f"store_dir = {_quote(NODE_STORE)}",
            f"trusted_keys = [{_quote(SIGNING_KEY)}]",
            "",
            "[labels]",
            f"device-class = {_quote(CLASS_MARK)}",
            "",
            mqtt.toml(),
        ]
    )
    filled = text.replace(NODE_ID_MARK, "node-1").replace(PASSWORD_MARK, "x").replace(CLASS_MARK, "cpu")
    NodeConfig.model_validate(tomllib.loads(filled))
    return text


def write_site(out: Path, nodes: list[str], signing_public_key: Path, controller_replicas: int | None = None,
               database_url_file: Path | None = None) -> None:  # fmt: skip
    """Everything the overlay's generators read, in ``out``; with ``controller_replicas``, for that many
    controller replicas on the PostgreSQL database whose URL ``database_url_file`` holds."""
    load_public_key(signing_public_key)  # refuse a file that is not an ed25519 public key
    if (controller_replicas is None) != (database_url_file is None):
        raise ValueError("--controller-replicas and --database-url-file go together")
    database = None
    if database_url_file is not None:
        database = check_database_url(database_url_file.read_text().strip())
    if controller_replicas is not None and controller_replicas < 1:
        raise ValueError("--controller-replicas must be at least 1")
    controllers = replica_ids(controller_replicas) if controller_replicas is not None else [SINGLE_CONTROLLER]
    out.mkdir(parents=True, exist_ok=True)
    pki = out / "pki"
    first = not (pki / "registry.json").exists()
    if first:
        security.init_pki(pki, broker_hosts())
    registry = security.load_registry(pki)
    for identity in controllers:
        if identity not in registry.identities:
            security.provision_controller(pki, identity)
    if first:
        # The broker's files beside a config in out/: provision-node, rotate-node and revoke-node on
        # this PKI rewrite the password file and the ACL there, ready for the next `kubectl apply -k`.
        settings = security.BrokerSettings(data_dir=BROKER_DATA, certificate_port=None)
        security.write_broker_config(pki, out / "mosquitto.conf", settings)
    registry = security.load_registry(pki)
    new = [n for n in dict.fromkeys(nodes) if n not in registry.identities]
    if new:
        security.provision_nodes(pki, new)
    paths = security.PkiPaths(pki)

    def password(identity: str) -> str:
        return (paths.client_dir(identity) / "password").read_text().strip()

    shutil.copyfile(paths.ca_cert, out / "ca.crt")
    shutil.copyfile(signing_public_key, out / "signing.pub")
    operator = _keep_key(out / "operator-token")
    client, sidecar, scrape = (_keep_key(out / name) for name in ("client-key", "sidecar-key", "scrape-key"))
    written = ["node.toml.in", "node-credentials.env", "mosquitto.server.key"]
    if database is None:
        (out / "controller.toml").write_text(controller_toml(password(SINGLE_CONTROLLER), operator))
        written.append("controller.toml")
    else:
        template = replica_toml_template(operator, database)
        for replica in controllers:
            completed = complete_replica_toml(template, database, replica, password(replica))
            ControllerSettings.model_validate(tomllib.loads(completed))
        (out / "controller.toml.in").write_text(template)
        # One key per replica, its pod's name: the pod's init container picks its own.
        (out / "controller-credentials.env").write_text("".join(f"{r}={password(r)}\n" for r in controllers))
        (out / "database-url").write_text(database + "\n")
        written += ["controller.toml.in", "controller-credentials.env", "database-url"]
    (out / "agent.toml").write_text(agent_toml(client, sidecar, scrape))
    (out / "node.toml.in").write_text(node_toml_template(sidecar))
    registry = security.load_registry(pki)
    active = sorted(i for i, e in registry.identities.items() if e.role is security.Role.NODE
                    and e.status is security.Status.ACTIVE)  # fmt: skip
    # One key per node id, its broker password: the pod's init container picks its node's.
    (out / "node-credentials.env").write_text("".join(f"{node}={password(node)}\n" for node in active))
    for secret in written:
        (out / secret).chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlay", type=Path, help="the site overlay directory (its secrets/ is written)")
    parser.add_argument("--node", action="append", default=[], help="a node's name as Kubernetes knows it (repeat)")
    parser.add_argument("--signing-public-key", type=Path, required=True,
                        help="the public key artifacts are signed with (zimage-edge keys generate)")  # fmt: skip
    parser.add_argument(
        "--controller-replicas",
        type=int,
        metavar="N",
        help="run the controller as N replicas on PostgreSQL (components/controller-replicas)",
    )
    parser.add_argument(
        "--database-url-file",
        type=Path,
        metavar="PATH",
        help="a file holding the replicas' URL (postgresql://user:password@host/db)",
    )
    args = parser.parse_args(argv)
    try:
        write_site(args.overlay / "secrets", args.node, args.signing_public_key, args.controller_replicas,
                   args.database_url_file)  # fmt: skip
    except (OSError, ValueError, ZimageEdgeError) as exc:
        print(f"site-secrets: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.overlay / 'secrets'}; apply with: kubectl apply -k {args.overlay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
