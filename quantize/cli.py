"""Subcommands of the ``zimage-edge`` command that make, plan and check artifacts.

Importing this module is torch-free: handlers import the model stack only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quantize.calibration import QUALITY_GATE_SIDE
from quantize.variants import VARIANTS, QType
from zimage_edge.errors import UsageError


def parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise UsageError(f"size {text!r} must look like 1024x1024")
    return int(width), int(height)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from quantize.variants import QType, QualityThresholds, get_variant

    try:
        variant = get_variant(args.variant)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.text_encoder is not None:
        variant = variant.with_text_encoder(None if args.text_encoder == "none" else QType(args.text_encoder))
    t = variant.thresholds
    thresholds = QualityThresholds(
        min_psnr_db=t.min_psnr_db if args.min_psnr is None else args.min_psnr,
        min_ssim=t.min_ssim if args.min_ssim is None else args.min_ssim,
        max_latent_rel_l2=t.max_latent_rel_l2 if args.max_latent_rel_l2 is None else args.max_latent_rel_l2,
        max_adherence_drop=t.max_adherence_drop if args.max_adherence_drop is None else args.max_adherence_drop,
    )
    variant = replace(variant, thresholds=thresholds)
    if args.no_quality and not args.force:
        raise UsageError("--no-quality needs --force: the artifact would carry no measured quality")
    if Path(args.out).exists():
        raise UsageError(f"{args.out} already exists")
    from quantize.quality import QualitySpec
    from zimage_edge.shapes.data import trained_size

    native = trained_size(args.source)
    side = native or QUALITY_GATE_SIDE
    width, height = parse_size(args.quality_size) if args.quality_size else (side, side)

    from tqdm import tqdm

    from quantize.build import BuildOptions, build_artifact
    from quantize.signing import load_private_key

    sign_key = load_private_key(Path(args.sign_key)) if args.sign_key else None
    seeds = tuple(int(s) for s in args.quality_seeds.split(","))
    options = BuildOptions(
        quality=None if args.no_quality else QualitySpec(seeds=seeds, width=width, height=height),
        force=args.force,
        sign_key=sign_key,
        max_shard_bytes=args.max_shard_mb * 2**20,
    )
    bars: dict[str, tqdm] = {}

    def progress(component: str, done: int, total: int) -> None:
        bar = bars.get(component)
        if bar is None:
            bar = bars[component] = tqdm(total=total, desc=component, unit="block", disable=args.quiet)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    manifest = build_artifact(args.source, variant, Path(args.out), options, progress=progress)
    for name, info in manifest.components.items():
        ratio = info.bytes / info.bf16_bytes if info.bf16_bytes else 0.0
        print(f"{name:13s} {info.qtype or 'bf16':16s} {info.bytes / 2**20:10.1f} MiB  ({ratio:.3f} x bf16)")
    quality = manifest.quality
    if quality.psnr_db_min is not None:
        print(
            f"quality {quality.status}: PSNR min {quality.psnr_db_min:.2f} dB, SSIM min {quality.ssim_min:.4f}, "
            f"latent rel. L2 max {quality.latent_rel_l2_max:.4f}"
        )
    else:
        print(f"quality {quality.status}: {quality.reason}")
    print(f"artifact {manifest.variant_name} written to {args.out}" + (" (signed)" if sign_key else ""))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quantize.planner import Workload, plan
    from quantize.profiles import PROFILES, get_profile, profile_from_facts

    calibration, measured_profile = _calibration(args.calibration) if args.calibration else (None, None)
    if measured_profile is not None and not (args.detect or args.device):
        profiles = [measured_profile]
    elif args.detect:
        from zimage_edge.device import detect_device

        profiles = [profile_from_facts(detect_device())]
    elif args.device:
        try:
            profiles = [get_profile(args.device)]
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        profiles = list(PROFILES.values())
    if calibration is not None and measured_profile is not None and profiles[0].name != measured_profile.name:
        raise UsageError(
            f"{args.calibration} was measured as profile {measured_profile.name!r}, not {profiles[0].name!r}: "
            "a calibration applies to the device it was measured on"
        )
    width, height = parse_size(args.resolution)
    try:
        workload = Workload(width=width, height=height, batch=args.batch, cfg=args.cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # Tables stay readable when piped (rich would fall back to 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 120)
    results = [plan(profile, workload, calibration=calibration) for profile in profiles]
    if args.json:
        print(json.dumps([_plan_json(p) for p in results], indent=2))
        return 0
    if len(results) == 1:
        _print_plan_detail(console, results[0])
    else:
        _print_plan_summary(console, results)
    return 0


def _calibration(path: str) -> tuple[Any, Any]:
    """The memory calibration in a ``bench device`` results file, and the profile it was measured as."""
    from quantize.bench_results import read_results
    from quantize.calibration import calibration_from_results
    from quantize.profiles import PROFILES, profile_from_facts
    from zimage_edge.device import DeviceFacts

    try:
        results = read_results(Path(path))
        calibration = calibration_from_results(results, source=Path(path).name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    profile = PROFILES.get(results.profile) or profile_from_facts(DeviceFacts.from_dict(results.device))
    return calibration, profile


def _print_plan_detail(console: Any, result: Any) -> None:
    from rich.table import Table

    from quantize.planner import gib

    w = result.workload
    table = Table(title=f"{result.profile.description}: {w.width}x{w.height}, batch {w.batch}, {result.dtype}")
    for column in ("variant", "placement", "device need", "budget", "host need", "verdict"):
        table.add_column(column)
    for row in result.rows:
        style = "bold green" if row is result.choice else ("" if row.fits else "dim")
        table.add_row(
            row.variant, str(row.placement), gib(row.device_bytes), gib(row.budget_bytes),
            gib(row.host_bytes), row.reason, style=style,
        )  # fmt: skip
    console.print(table)
    console.print(result.explain())


def _print_plan_summary(console: Any, results: list[Any]) -> None:
    from rich.table import Table

    from quantize.planner import gib

    w = results[0].workload
    table = Table(title=f"best fit per device profile: {w.width}x{w.height}, batch {w.batch}")
    table.add_column("profile", no_wrap=True)
    for column in ("dtype", "variant", "placement", "device need", "budget"):
        table.add_column(column)
    for result in results:
        c = result.choice
        if c is None:
            table.add_row(result.profile.name, result.dtype, "nothing fits", "", "", "", style="red")
        else:
            table.add_row(
                result.profile.name, result.dtype, c.variant, str(c.placement), gib(c.device_bytes), gib(c.budget_bytes)
            )
    console.print(table)
    console.print("details for one device: zimage-edge plan --device PROFILE")


def _plan_json(result) -> dict:
    from dataclasses import asdict

    choice = result.choice
    return {
        "profile": result.profile.name,
        "dtype": result.dtype,
        "choice": {"variant": choice.variant, "placement": str(choice.placement)} if choice else None,
        "explanation": result.explain(),
        "calibration": asdict(result.calibration) if result.calibration else None,
        "rows": [
            {
                "variant": r.variant,
                "placement": str(r.placement),
                "device_bytes": r.device_bytes,
                "host_bytes": r.host_bytes,
                "budget_bytes": r.budget_bytes,
                "fits": r.fits,
                "reason": r.reason,
            }
            for r in result.rows
        ],
    }


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from quantize.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(Path(args.out_dir))
    print(f"private key {private} (keep it secret), public key {public}, key id {key_id(load_public_key(public))}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from quantize.manifest import verify_artifact
    from quantize.signing import load_public_keys

    manifest, key = verify_artifact(Path(args.artifact), load_public_keys(args.trusted_key))
    signed = f", signature by key {key}" if key else ""
    print(f"{args.artifact}: {len(manifest.files)} files verified{signed}; variant {manifest.variant_name}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the quantize, plan, keys and verify subcommands."""
    qz = sub.add_parser("quantize", help="make an INT8/FP8/INT4 artifact from a checkpoint")
    qz.add_argument("--source", required=True, help="diffusers directory or Hugging Face id (cached)")
    qz.add_argument("--variant", required=True, choices=list(VARIANTS), help="recipe from the variant table")
    qz.add_argument("--out", required=True, help="artifact directory to create")
    qz.add_argument("--text-encoder", choices=["none", *map(str, QType)], help="override the text encoder qtype")
    qz.add_argument("--sign-key", help="ed25519 private key (PEM) to sign the manifest with")
    qz.add_argument("--force", action="store_true", help="keep a variant that misses its quality thresholds")
    qz.add_argument("--no-quality", action="store_true", help="skip the quality gate (needs --force)")
    qz.add_argument(
        "--quality-size",
        default=None,
        help=f"resolution of the quality gate (default {QUALITY_GATE_SIDE}x{QUALITY_GATE_SIDE}; a shapes model's own)",
    )
    qz.add_argument("--quality-seeds", default="0", help="comma-separated seeds of the quality gate (default 0)")
    qz.add_argument("--min-psnr", type=float, help="override the variant's minimum PSNR (dB)")
    qz.add_argument("--min-ssim", type=float, help="override the variant's minimum SSIM")
    qz.add_argument("--max-latent-rel-l2", type=float, help="override the variant's maximum latent distance")
    qz.add_argument(
        "--max-adherence-drop", type=float, help="override how much color accuracy a shapes model may lose (0.03)"
    )
    qz.add_argument("--max-shard-mb", type=int, default=1024, help="largest weight file in MiB (default 1024)")
    qz.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    qz.set_defaults(handler=_cmd_quantize, uses_torch=True)

    pl = sub.add_parser("plan", help="which variant and placement fits a device, and why")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--device", help="a device profile name (default: every profile)")
    where.add_argument("--detect", action="store_true", help="plan for this node's detected device")
    pl.add_argument("--resolution", default="1024x1024", help="WxH (default 1024x1024)")
    pl.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    pl.add_argument("--cfg", action="store_true", help="classifier-free guidance (doubles the transformer batch)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument(
        "--calibration",
        help="results of `zimage-edge bench device` on the device: calibrate the memory model with them "
        "(plans for the profile they were measured as unless --device or --detect is given)",
    )
    pl.set_defaults(handler=_cmd_plan)

    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kg = keys_sub.add_parser("generate", help="create an ed25519 key pair")
    kg.add_argument("out_dir", help="directory for zimage-edge.key and zimage-edge.pub")
    kg.set_defaults(handler=_cmd_keys_generate)

    ver = sub.add_parser("verify", help="check an artifact's hashes (and signature)")
    ver.add_argument("artifact", help="artifact directory")
    ver.add_argument("--trusted-key", action="append", help="public key (PEM) that must have signed it")
    ver.set_defaults(handler=_cmd_verify)
