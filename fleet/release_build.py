"""Quantized artifacts of a model, made by ``zimage-edge quantize`` in a child process.

The fleet's own processes stay torch-free; the demo and the fleet benchmark need a release of real
artifacts, so they run the quantize command as an operator would. ``quantize`` writes an artifact to a
temporary path and renames it once verified: a target is complete or absent.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fleet.postgres import die_with_parent

# The shapes model shipped in the package: a trained 64x64 model of Z-Image-Turbo's architecture.
SHAPES_MODEL = Path(__file__).resolve().parents[1] / "zimage_edge" / "shapes" / "pretrained"
# int4 at the shapes model's 64x64 misses the generic PSNR gate (~20-23 dB against 25) while its prompt
# adherence holds (benchmarks/results/shapes-quality.md): such artifacts are kept with --force.
FORCED_ON_SHAPES = frozenset({"int4", "int4-te8", "int4-te4"})


class BuildError(Exception):
    """``zimage-edge quantize`` failed; its own output, above, says why."""


async def quantize_artifact(source: str | Path, variant: str, target: Path, sign_key: Path | None = None) -> Path:
    """``target``, the ``variant`` artifact of ``source`` (signed with ``sign_key`` if given)."""
    force = ["--force"] if Path(source) == SHAPES_MODEL and variant in FORCED_ON_SHAPES else []
    sign = ["--sign-key", str(sign_key)] if sign_key is not None else []
    command = ["quantize", "--source", str(source), "--variant", variant, "--out", str(target), "--quiet",
               *sign, *force]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*die_with_parent("TERM"), sys.executable, "-m", "zimage_edge.cli",
                                                *command)  # fmt: skip
    if await proc.wait() != 0:
        raise BuildError(f"zimage-edge quantize --variant {variant} of {source} failed (status {proc.returncode})")
    return target


async def quantize_release(source: str | Path, variants: tuple[str, ...], out: Path) -> list[Path]:
    """Unsigned artifacts of ``variants`` under ``out``, one after another (each uses every core)."""
    return [await quantize_artifact(source, variant, out / variant) for variant in variants]
