"""``zimage-edge demo``, the project's main job, run as a user runs it: a real broker, controller, three
agents with their nodes, a rollout of the shapes model's release, one image per agent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from fleet.demo import DEMO_NODES, RELEASE_VARIANTS
from zimage_edge.shapes.data import parse_caption
from zimage_edge.shapes.metric import read_image

# Building the release (three quantized artifacts) and starting a site of seven processes on two shared
# cores takes a few minutes the first time; a hang must still end the test.
DEMO_TIMEOUT_S = 900
# What the planner picks for each demo device over the release (Z-Image-Turbo's real sizes).
EXPECTED = {"jetson-orin-nano-8gb": "int4-te8", "t4-16gb": "int8-te8", "a10-24gb": "int8"}


def _demo(work: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "zimage_edge.cli", "demo", "--work", str(work), "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _leftovers(work: Path) -> list[str]:
    """Processes still running that the demo started (their command lines name its work directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(work) in cmdline and proc.pid != os.getpid():
            found.append(cmdline)
    return found


def _rows(output: str) -> dict[str, str]:
    return {node.name: next(line for line in output.splitlines() if f" {node.name} " in line and "│" in line)
            for node in DEMO_NODES}  # fmt: skip


def test_the_demo_rolls_a_release_out_to_three_devices_and_draws_on_each(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    first = _demo(work, out, "--once")
    output, _ = first.communicate(timeout=DEMO_TIMEOUT_S)
    assert first.returncode == 0, output
    for variant in RELEASE_VARIANTS:
        assert f"release: building {variant}" in output
    assert "published" in output
    assert "succeeded" in output
    rows = _rows(output)
    for node in DEMO_NODES:
        # node, device, variant (planner), serving, latency, asked, the image shows, as asked, file
        cells = [cell.strip() for cell in rows[node.name].split("│")[1:-1]]
        assert cells[:2] == [node.name, node.profile]
        # The planner's choice for the device, and the agent serving it after the swap.
        assert cells[2] == cells[3] == EXPECTED[node.profile]
        assert re.fullmatch(r"\d+ ms", cells[4])
        assert cells[5] == node.prompt
        image = np.asarray(Image.open(out / f"{node.name}.png").convert("RGB"))
        assert image.shape == (64, 64, 3)
        seen, asked = read_image(image), parse_caption(node.prompt)
        assert asked is not None
        # The summary reports what the pixels of the written image show.
        assert cells[6] == f"a {seen.color or '?'} {seen.shape or '?'} on a {seen.background} background"
        matched = (seen.color, seen.shape, seen.background) == (asked.color, asked.shape, asked.background)
        assert cells[7] == ("yes" if matched else "no")
        assert cells[8] == f"{node.name}.png"
    assert f"images in {out.resolve()}" in output
    assert re.search(r"controller status page: http://127\.0\.0\.1:\d+/", output)
    assert _leftovers(work) == []

    # A second run reuses the release; without --once it serves until interrupted, then stops it all.
    built = {v: (work / "artifacts" / "shapes" / v / "manifest.json").stat().st_mtime_ns for v in RELEASE_VARIANTS}
    second = _demo(work, out)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert second.stdout is not None
        for line in second.stdout:
            lines.append(line)
            if line.startswith("serving"):
                serving.set()

    reader = threading.Thread(target=read, name="demo-output", daemon=True)
    reader.start()
    assert serving.wait(DEMO_TIMEOUT_S), "".join(lines)
    site = [p for p in _leftovers(work) if "zimage_edge.cli" in p and " demo " not in p]
    assert len(site) == 1 + 2 * len(DEMO_NODES)  # controller, agents, nodes (the broker is not a Python child)
    second.send_signal(signal.SIGINT)
    assert second.wait(DEMO_TIMEOUT_S) == 130
    reader.join(10)
    assert second.stdout is not None
    second.stdout.close()
    output = "".join(lines)
    for variant in RELEASE_VARIANTS:
        assert f"release: {variant} already built" in output
    assert built == {v: (work / "artifacts" / "shapes" / v / "manifest.json").stat().st_mtime_ns
                     for v in RELEASE_VARIANTS}  # fmt: skip
    deadline = time.monotonic() + 30
    while (left := _leftovers(work)) and time.monotonic() < deadline:
        threading.Event().wait(0.1)  # processes exiting after their parent reaped them: poll with a deadline
    assert left == [], left


@pytest.mark.parametrize("bad", [["--source", "/nonexistent/model"]])
def test_the_demo_refuses_a_source_it_cannot_build_and_leaves_nothing_running(tmp_path: Path, bad: list[str]) -> None:
    work = tmp_path / "work"
    proc = _demo(work, tmp_path / "out", "--once", *bad)
    output, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    assert proc.returncode == 1, output
    assert "demo failed" in output
    assert "quantize" in output
    assert not (work / "artifacts").exists() or not any((work / "artifacts").rglob("manifest.json"))
    assert _leftovers(work) == []
