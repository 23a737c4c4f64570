"""The ``serve`` subcommand. Importing this module is torch-free."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zimage_edge.errors import UsageError


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings, load_settings
    from zimage_edge.request import describe_validation_error

    overrides = {"model": args.model, "host": args.host, "port": args.port}
    try:
        settings = load_settings(Path(args.config) if args.config else None, **overrides)
    except ValidationError as exc:
        raise UsageError(f"invalid configuration: {describe_validation_error(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the configuration: {exc}") from exc
    if args.check_config:
        shown = settings.model_dump(mode="json")
        for key in shown.get("api_keys", []):
            key["sha256"] = key["sha256"][:8] + "..."
        print(json.dumps(shown, indent=2))
        print("configuration OK" + ("" if settings.auth_enabled else " (no API keys: bound to loopback only)"))
        if args.explain:
            for name, field in AgentSettings.model_fields.items():
                print(f"  {name}: {field.description}")
        return 0
    from edge_agent.serve import run

    return run(settings)


def _cmd_hash_key(args: argparse.Namespace) -> int:
    from edge_agent.settings import ApiKey

    print(ApiKey.hash(args.key))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the generation service on this node")
    serve.add_argument("--model", help="artifact, diffusers directory or Hugging Face id (or ZIMAGE_MODEL)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8188; 0 picks a free one)")
    serve.add_argument("--config", help="TOML file with the settings (ZIMAGE_* variables override it)")
    serve.add_argument("--check-config", action="store_true", help="validate and print the settings, then exit")
    serve.add_argument("--explain", action="store_true", help="with --check-config: describe every setting")
    serve.set_defaults(handler=_cmd_serve)

    hk = sub.add_parser("hash-key", help="print the sha256 to put in api_keys for a client key")
    hk.add_argument("key", help="the client's key")
    hk.set_defaults(handler=_cmd_hash_key)
