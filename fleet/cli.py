"""The ``node`` and ``fleet`` subcommands. Importing this module is torch-free (and so are they).

``zimage-edge node --config node.toml`` runs the sidecar; ``zimage-edge fleet controller --config
controller.toml`` runs the controller (MQTT, its store, its HTTP server); the other ``fleet``
subcommands are an operator's client of the controller's REST API (``--url``/``--token`` or
``ZIMAGE_FLEET_URL``/``ZIMAGE_FLEET_TOKEN``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.auth import ApiToken, Role
from fleet.mqtt import MqttSettings
from fleet.node import NodeConfig
from zimage_edge.errors import UsageError, ZimageEdgeError

if TYPE_CHECKING:
    from fleet.security import Credentials

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ControllerSettings(BaseModel):
    """The controller process (from a TOML file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    controller_id: str = Field(default="controller", description="this controller instance")
    database: str = Field(default="fleet.db", description="SQLite file, or a SQLAlchemy URL (postgresql://...)")
    host: str = Field(default="127.0.0.1", description="address of the HTTP server (API, artifacts, metrics)")
    port: int = Field(default=8700, ge=0, le=65535, description="its port")
    public_url: str | None = Field(default=None, description="how nodes reach that server (default http://host:port)")
    api_token: SecretStr | None = Field(
        default=None, description="one plain operator token (a small site); prefer api_tokens, stored hashed"
    )
    api_tokens: list[ApiToken] = Field(
        default_factory=list, description="tokens of the REST API by sha256 (zimage-edge hash-key), each with a role"
    )
    signing_public_keys: list[Path] = Field(
        default_factory=list, description="ed25519 public keys (PEM) a published artifact's signature must match"
    )

    @model_validator(mode="after")
    def _some_token(self) -> ControllerSettings:
        if self.api_token is None and not self.api_tokens:
            raise ValueError("set api_tokens (or api_token): the REST API is never open")
        return self

    def tokens(self) -> list[ApiToken]:
        plain = [ApiToken.of("api_token", self.api_token.get_secret_value(), Role.OPERATOR)] if self.api_token else []
        return [*plain, *self.api_tokens]

    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="the broker")
    prefix: str = Field(default="zimage/v1", description="MQTT topic prefix")
    replica_group: str | None = Field(
        default=None, description="run as one of several replicas on a shared database: their MQTT share group"
    )
    lease_ttl_s: float = Field(default=15.0, gt=0, description="how long a dead leader's rollout lease lasts")


class ClientSettings(BaseSettings):
    """Where the operator's commands find the controller."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_FLEET_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8700", description="the controller's HTTP server")
    token: SecretStr | None = Field(default=None, description="the controller's api_token")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``500ms``, ``1h`` -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise UsageError(f"duration {text!r} must look like 90s, 2m, 500ms or 1h")
    return float(match[1]) * _SECONDS[match[2]]


def _pairs(text: str | None, what: str) -> dict[str, str]:
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} {item!r} must look like key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"invalid configuration: {where}: {first['msg']}") from exc


async def _until_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _cmd_node(args: argparse.Namespace) -> int:
    from fleet.node import Node
    from quantize.profiles import get_profile

    config: NodeConfig = _validated(NodeConfig, _read_toml(args.config))
    facts = None
    if args.device_profile:
        try:
            facts = get_profile(args.device_profile).facts()
        except ValueError as exc:
            raise UsageError(str(exc)) from exc

    async def main() -> None:
        if facts is None:
            from zimage_edge.device import detect_device

            detected = await asyncio.to_thread(detect_device)
        node = Node(config, facts=facts or detected)
        await node.run(await _until_signal())

    asyncio.run(main())
    return 0


def _cmd_controller(args: argparse.Namespace) -> int:
    from aiohttp import web

    from fleet.api import create_controller_app
    from fleet.artifact_server import ArtifactCatalog
    from fleet.controller import Controller, ControllerConfig
    from fleet.store import Store
    from quantize.signing import load_public_keys

    settings: ControllerSettings = _validated(ControllerSettings, _read_toml(args.config))
    public = settings.public_url or f"http://{settings.host}:{settings.port}"

    async def main() -> None:
        store = Store.open(settings.database)
        controller = Controller(
            ControllerConfig(controller_id=settings.controller_id, prefix=settings.prefix, mqtt=settings.mqtt,
                             artifact_base_url=public, replica_group=settings.replica_group,
                             lease_ttl_s=settings.lease_ttl_s),
            store, ArtifactCatalog(), trusted_keys=load_public_keys(settings.signing_public_keys),
        )  # fmt: skip
        # Artifacts of the releases already registered are served again after a restart.
        await asyncio.to_thread(controller.restore_catalog)
        runner = web.AppRunner(create_controller_app(controller, settings.tokens()))
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        print(f"controller listening on {public}", flush=True)
        try:
            await controller.run(await _until_signal())
        finally:
            await runner.cleanup()
            store.close()

    asyncio.run(main())
    return 0


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import aiohttp

    client = ClientSettings()
    url = (args.url or client.url).rstrip("/")
    token = args.token or (client.token.get_secret_value() if client.token else None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call() -> Any:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.request(method, f"{url}{path}", json=body, headers=headers) as response:
                    data = await response.json()
                    if response.status >= 400:
                        raise ZimageEdgeError(f"{response.status}: {data['error']['message']}")
                    return data
            except aiohttp.ClientError as exc:
                raise ZimageEdgeError(f"cannot reach the controller at {url}: {exc}") from exc

    return asyncio.run(call())


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _cmd_publish(args: argparse.Namespace) -> int:
    artifacts = [str(Path(p).resolve()) for p in args.artifacts]
    body = {"name": args.release, "artifacts": artifacts, "allow_unsigned": args.allow_unsigned}
    data = _api(args, "POST", "/api/v1/releases", body)
    _table(f"release {data['name']}", ["variant", "artifact_id"], [[k, v] for k, v in data["variants"].items()])
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    query = f"?explain={args.explain}" if args.explain else ""
    nodes = _api(args, "GET", f"/api/v1/nodes{query}")["nodes"]
    columns = ["node", "online", "device", "ready", "generation", "artifact", "error"]
    rows = [[n["id"], n["online"], n["device"], n["ready"], n["generation"], (n["artifact"] or "")[:10], n["error"]]
            for n in nodes]  # fmt: skip
    if args.explain:
        columns += ["variant", "why"]
        for row, node in zip(rows, nodes, strict=True):
            row += [node["variant"], node["explanation"]]
    _table("nodes", columns, rows)
    return 0


def _cmd_releases(args: argparse.Namespace) -> int:
    releases = _api(args, "GET", "/api/v1/releases")["releases"]
    rows = [[r["name"], v["variant"], v["artifact_id"][:10], v["bytes"]] for r in releases for v in r["variants"]]
    _table("releases", ["release", "variant", "artifact", "bytes"], rows)
    return 0


def _print_rollout(state: dict[str, Any]) -> None:
    rows = [[n["node"], n["phase"], (n.get("target") or {}).get("variant"), n.get("reason")] for n in state["nodes"]]
    _table(f"rollout {state['id']} of {state['spec']['release']}: {state['status']} (wave {state['wave'] + 1})",
           ["node", "phase", "variant", "reason"], rows)  # fmt: skip


def _cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "create":
        body = {
            "release": args.release, "selector": _pairs(args.selector, "selector"),
            "waves": [int(w) if w.isdigit() else w for w in args.waves.split(",")],
            "bake_s": parse_duration(args.bake), "max_error_rate": args.max_error_rate,
            "max_p95_ms": args.max_p95_ms, "max_unavailable": args.max_unavailable,
            "node_timeout_s": parse_duration(args.node_timeout), "on_timeout": args.on_timeout,
            "pinned": _pairs(args.pin, "pin"),
        }  # fmt: skip
        _print_rollout(_api(args, "POST", "/api/v1/rollouts", body))
    elif args.action == "status":
        if args.id:
            _print_rollout(_api(args, "GET", f"/api/v1/rollouts/{args.id}"))
        else:
            for state in _api(args, "GET", "/api/v1/rollouts")["rollouts"]:
                _print_rollout(state)
    else:
        _print_rollout(_api(args, "POST", f"/api/v1/rollouts/{args.id}/{args.action}"))
    return 0


@contextlib.contextmanager
def _bad_values_are_usage_errors() -> Iterator[None]:
    """The security library raises ValueError for an invalid id, host, prefix or group: the user's input."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _cmd_init_pki(args: argparse.Namespace) -> int:
    from fleet import security

    with _bad_values_are_usage_errors():
        paths = security.init_pki(Path(args.directory), args.host or security.DEFAULT_HOSTS, prefix=args.prefix,
                                  force=args.force)  # fmt: skip
    print(f"CA and broker certificate in {paths.root} (keep {paths.ca_key.name} offline when you can)")
    return 0


def _print_credentials(credentials: Credentials, what: str, pki: Path) -> None:
    from fleet.security import DEFAULT_CERTIFICATE_PORT, DEFAULT_PORT, CredentialKind, load_registry

    print(f"{what} {credentials.role} {credentials.identity}: its files are in {credentials.directory}")
    print("# its [mqtt] settings, once the files are copied to it (adjust the paths):")
    print("[mqtt]")
    print(f'host = "{load_registry(pki).hosts[0]}"')
    print(f'ca_file = "{credentials.ca_file}"')
    if credentials.kind is CredentialKind.PASSWORD:
        print(f"port = {DEFAULT_PORT}")
        print(f'username = "{credentials.identity}"')
        print(f'password = "..."  # the content of {credentials.directory / "password"}')
    else:
        print(f"port = {DEFAULT_CERTIFICATE_PORT}")
        print(f'cert_file = "{credentials.cert_file}"')
        print(f'key_file = "{credentials.key_file}"')
    print("# then send the broker SIGHUP (kill -HUP): it re-reads its password, ACL and CRL files")


def _cmd_provision_node(args: argparse.Namespace) -> int:
    from fleet import security

    kind = security.CredentialKind.CERTIFICATE if args.certificate else security.CredentialKind.PASSWORD
    provision = security.provision_controller if args.controller else security.provision_node
    with _bad_values_are_usage_errors():
        credentials = provision(Path(args.pki), args.node_id, kind)
    _print_credentials(credentials, "provisioned", Path(args.pki))
    return 0


def _cmd_rotate_node(args: argparse.Namespace) -> int:
    from fleet import security

    with _bad_values_are_usage_errors():
        credentials = security.rotate_node(Path(args.pki), args.node_id)
    _print_credentials(credentials, "new credentials for", Path(args.pki))
    return 0


def _cmd_revoke_node(args: argparse.Namespace) -> int:
    from fleet import security

    with _bad_values_are_usage_errors():
        security.revoke_node(Path(args.pki), args.node_id)
    print(f"revoked {args.node_id}: send the broker SIGHUP (kill -HUP) to apply it")
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from fleet import security

    with _bad_values_are_usage_errors():
        settings = security.BrokerSettings(
            data_dir=Path(args.data_dir).resolve(), bind=args.bind, port=args.port,
            certificate_port=None if args.no_certificate_listener else args.certificate_port,
            limits=security.BrokerLimits.for_fleet(args.fleet_size), run_as=args.user, group=args.group,
        )  # fmt: skip
        files = security.write_broker_config(Path(args.pki), Path(args.out), settings)
    print(f"wrote {files.config} and, beside it, the password, ACL, CRL and TLS files it names")
    return 0


def _security_parsers(fleet_sub: argparse._SubParsersAction) -> None:
    from fleet.security import DEFAULT_CERTIFICATE_PORT, DEFAULT_FLEET_SIZE, DEFAULT_PORT
    from fleet.security import DEFAULT_PREFIX as PREFIX

    init = fleet_sub.add_parser("init-pki", help="make the site's CA and the broker's TLS certificate")
    init.add_argument("directory", help="the PKI directory (holds the CA key: keep it safe)")
    init.add_argument("--host", action="append", help="a name or address the broker is reached at (repeat; "
                      "default localhost and 127.0.0.1)")  # fmt: skip
    init.add_argument("--prefix", default=PREFIX, help=f"MQTT topic prefix the ACL is for (default {PREFIX})")
    init.add_argument("--force", action="store_true", help="replace an existing PKI (voids every credential)")
    init.set_defaults(handler=_cmd_init_pki)

    prov = fleet_sub.add_parser("provision-node", help="credentials for a node (or a controller)")
    prov.add_argument("node_id", help="the node id (its broker user name and certificate CN)")
    prov.add_argument("--pki", required=True, help="the PKI directory")
    prov.add_argument("--certificate", action="store_true", help="a client certificate instead of a password")
    prov.add_argument("--controller", action="store_true", help="a controller: reads all nodes, writes desired/ack")
    prov.set_defaults(handler=_cmd_provision_node)

    changes = (
        ("rotate-node", _cmd_rotate_node, "new credentials; the old stop working once the broker reloads"),
        ("revoke-node", _cmd_revoke_node, "revoke a node's (or a controller's) credentials"),
    )
    for name, handler, text in changes:
        parser = fleet_sub.add_parser(name, help=text)
        parser.add_argument("node_id", help="the node id")
        parser.add_argument("--pki", required=True, help="the PKI directory")
        parser.set_defaults(handler=handler)

    conf = fleet_sub.add_parser("broker-config", help="write a locked-down mosquitto.conf and the files it names")
    conf.add_argument("--pki", required=True, help="the PKI directory")
    conf.add_argument("--out", required=True, help="the config file to write (its files are written beside it)")
    conf.add_argument("--bind", help="address to listen on (default every interface)")
    conf.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"password listener (default {DEFAULT_PORT})")
    conf.add_argument("--certificate-port", type=int, default=DEFAULT_CERTIFICATE_PORT,
                      help=f"client-certificate listener (default {DEFAULT_CERTIFICATE_PORT})")  # fmt: skip
    conf.add_argument("--no-certificate-listener", action="store_true", help="passwords only")
    conf.add_argument("--data-dir", default="/var/lib/mosquitto", help="persistence location")
    conf.add_argument("--fleet-size", type=int, default=DEFAULT_FLEET_SIZE, help="nodes the limits are sized for")
    conf.add_argument("--user", help="user the broker runs as (default: Mosquitto's, 'mosquitto')")
    conf.add_argument("--group", help="group of the broker's user: its key and password file become 0640 in it")
    conf.set_defaults(handler=_cmd_broker_config)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the controller (default ZIMAGE_FLEET_URL or http://127.0.0.1:8700)")
    parser.add_argument("--token", help="its api_token (default ZIMAGE_FLEET_TOKEN)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from fleet import demo  # here: images and tables, only this command needs them

    return demo.main(demo.DemoOptions(args.work or demo.default_work(), args.out, args.source, args.once))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the node and fleet subcommands."""
    node = sub.add_parser("node", help="run the fleet sidecar beside this node's agent")
    node.add_argument("--config", required=True, help="TOML file with the node's settings")
    node.add_argument("--device-profile", help="report this device profile instead of the detected device")
    node.set_defaults(handler=_cmd_node)

    demo = sub.add_parser("demo", help="a whole site on this machine: broker, controller, three nodes, a rollout")
    demo.add_argument("--source", help="model to quantize (default: the shapes model shipped in the package)")
    demo.add_argument("--work", type=Path, help="kept between runs: the demo key and the built release "
                      "(default: ~/.cache/zimage-edge/demo)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="where the images are written")
    demo.add_argument("--once", action="store_true", help="exit after the summary instead of serving")
    demo.set_defaults(handler=_cmd_demo)

    fleet = sub.add_parser("fleet", help="the fleet controller and its operators' commands")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    ctl = fleet_sub.add_parser("controller", help="run the controller")
    ctl.add_argument("--config", required=True, help="TOML file with the controller's settings")
    ctl.set_defaults(handler=_cmd_controller)

    pub = fleet_sub.add_parser("publish", help="verify and register artifacts as a release")
    pub.add_argument("artifacts", nargs="+", help="artifact directories (readable by the controller)")
    pub.add_argument("--release", required=True, help="release name")
    pub.add_argument("--allow-unsigned", action="store_true", help="publish artifacts without a manifest.sig")
    _client_flags(pub)
    pub.set_defaults(handler=_cmd_publish)

    nodes = fleet_sub.add_parser("nodes", help="the nodes and what they run")
    nodes.add_argument("--explain", metavar="RELEASE", help="which variant of RELEASE each node would get, and why")
    _client_flags(nodes)
    nodes.set_defaults(handler=_cmd_nodes)

    rel = fleet_sub.add_parser("releases", help="the releases and their variants")
    _client_flags(rel)
    rel.set_defaults(handler=_cmd_releases)

    ro = fleet_sub.add_parser("rollout", help="create and steer rollouts")
    ro_sub = ro.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = ro_sub.add_parser("create", help="roll RELEASE out in waves")
    create.add_argument("release")
    create.add_argument("--selector", help="k=v,... labels a node must have")
    create.add_argument("--waves", default="1,10%,50%,100%", help="cumulative wave sizes (default 1,10%%,50%%,100%%)")
    create.add_argument("--bake", default="2m", help="how long a wave must stay healthy (default 2m)")
    create.add_argument("--max-error-rate", type=float, help="gate: error rate above this fails the rollout")
    create.add_argument("--max-p95-ms", type=float, help="gate: p95 latency above this fails the rollout")
    create.add_argument("--max-unavailable", type=int, default=1, help="nodes of a wave swapping at once")
    create.add_argument("--node-timeout", default="10m", help="a node silent this long counts as failed")
    create.add_argument("--on-timeout", choices=["fail", "skip"], default="fail", help="what a timed-out node is")
    create.add_argument("--pin", help="node=variant,... overriding the planner")
    _client_flags(create)
    for action in ("status", "pause", "resume", "abort"):
        parser = ro_sub.add_parser(action, help=f"{action} a rollout")
        parser.add_argument("id", nargs="?" if action == "status" else None, help="rollout id")
        _client_flags(parser)
    ro.set_defaults(handler=_cmd_rollout)

    _security_parsers(fleet_sub)
