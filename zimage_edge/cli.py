"""The ``zimage-edge`` command: one parser, thin subcommands that call library functions.

The core's own subcommands are here; each other part (quantize, the agent, the fleet) registers its
own through the ``zimage_edge.commands`` entry point group, so the core imports none of them. Handlers
import the model stack only when they run, so torch-free commands never load it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from zimage_edge import __version__
from zimage_edge.errors import UsageError, ZimageEdgeError

Handler = Callable[[argparse.Namespace], int]
# Entry point group through which packages add subcommands: ``name = "module:register"``, where
# ``register(subparsers)`` adds its parsers.
COMMANDS_GROUP = "zimage_edge.commands"


def _cmd_toy_model(args: argparse.Namespace) -> int:
    if Path(args.out_dir).exists():
        raise UsageError(f"{args.out_dir} already exists")
    from zimage_edge.model.toy import save_toy_model

    out = save_toy_model(Path(args.out_dir), size=args.size, seed=args.seed)
    print(f"toy model ({args.size}, seed {args.seed}) written to {out}")
    print("note: a toy model has random weights and draws noise; it exercises the real code paths")
    return 0


def _cmd_train_shapes(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_edge.shapes.train import TrainConfig, held_out_captions, train_shapes

    config = TrainConfig(
        seed=args.seed,
        images_per_scene=args.images_per_scene,
        vae_steps=args.vae_steps,
        transformer_steps=args.transformer_steps,
        held_out=held_out_captions() if args.hold_out else (),
    )
    if Path(args.out_dir).exists():
        raise UsageError(f"{args.out_dir} already exists")
    bars: dict[str, tqdm] = {}

    def report(stage: str, step: int, steps: int, loss: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=steps, desc=f"train {stage}", unit="step", disable=args.quiet)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == steps:
            bar.close()

    summary = train_shapes(Path(args.out_dir), config, report)
    print(json.dumps(summary["adherence"]))
    print(f"trained in {summary['train_seconds']} s; written to {args.out_dir}")
    return 0


def _cmd_device(args: argparse.Namespace) -> int:
    from zimage_edge.device import detect_device, dtype_policy

    facts = detect_device()
    print(json.dumps({"device": facts.to_dict(), "policy": dtype_policy(facts).to_dict()}, indent=2))
    return 0


def _apply_thread_policy() -> None:
    """Size torch's thread pools to the CPU this process really has (``ZIMAGE_CPU__*`` override it)."""
    from pydantic import ValidationError

    from zimage_edge.cpu import CpuSettings, configure_threads

    try:
        decision = configure_threads(CpuSettings())
    except ValidationError as exc:
        raise UsageError(f"invalid ZIMAGE_CPU__* setting: {exc}") from exc
    logging.getLogger(__name__).info("cpu threads: %s", decision.reason)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-edge", description="Z-Image-Turbo on fleets of small GPU nodes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    toy = sub.add_parser("toy-model", help="write a random-weight Z-Image pipeline of the real architecture")
    toy.add_argument("out_dir", help="directory to create (must not exist)")
    toy.add_argument("--size", default="tiny", choices=["tiny", "medium"], help="model size (default tiny)")
    toy.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    toy.set_defaults(handler=_cmd_toy_model, uses_torch=True)

    shapes = sub.add_parser("train-shapes", help="train the small shapes model of the real architecture")
    shapes.add_argument("out_dir", help="directory to create (must not exist)")
    shapes.add_argument("--seed", type=int, default=0, help="seed of data and weights (default 0)")
    shapes.add_argument("--images-per-scene", type=int, default=60, help="training images per scene (default 60)")
    shapes.add_argument("--vae-steps", type=int, default=1000, help="VAE steps (default 1000)")
    shapes.add_argument("--transformer-steps", type=int, default=4000, help="transformer steps (default 4000)")
    shapes.add_argument(
        "--hold-out",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every 9th caption out of training and score it apart (default: on)",
    )
    shapes.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    shapes.set_defaults(handler=_cmd_train_shapes, uses_torch=True)

    device = sub.add_parser("device", help="show the detected device and the dtype policy for it")
    device.set_defaults(handler=_cmd_device)

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        register: Callable[[argparse._SubParsersAction], None] = entry.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handler: Handler = args.handler
    try:
        if getattr(args, "uses_torch", False):
            _apply_thread_policy()
        return handler(args)
    except ZimageEdgeError as exc:
        # The project's own errors carry a message for the user; anything else is a bug and keeps
        # its traceback. With -v the traceback of a user error is shown too.
        if args.verbose:
            logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"zimage-edge {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
