"""What every benchmark shares: memory readings of its own process and writing its results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from quantize.peak_memory import peak_rss, rss_now

RESULTS = Path(__file__).parent / "results"
__all__ = ["RESULTS", "agent_process", "peak_rss", "rss_now", "run_fresh", "write_results"]


def run_fresh(script: str, *args: str, check: bool = True) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter (its own memory peak) and parse the JSON of its last line.

    A failed child raises with ``check``, else comes back as ``{"error", "stderr"}``.
    """
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=check)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def write_results(out: Path, name: str, data: dict[str, Any], text: str | None = None) -> Path:
    """``out/name.json`` and, with a text, ``out/name.md`` (also printed); returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    if text is not None:
        print(text)
        (out / f"{name}.md").write_text(text)
    return path


@contextlib.asynccontextmanager
async def agent_process(model: str, env: Mapping[str, str], start_timeout_s: float = 120) -> AsyncIterator[str]:
    """A ``zimage-edge serve`` process on a free loopback port with ``env``; yields its base URL once
    ready (the model loads after the port opens), and stops it with SIGTERM afterwards."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zimage_edge.cli", "serve", "--model", model, "--port", "0",
        stdout=asyncio.subprocess.PIPE, env=dict(env),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), start_timeout_s)).decode().strip()
        base = line.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + start_timeout_s
            while time.monotonic() < deadline:
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
