"""The no-op benchmarking model through the real HTTP app, and the agent benchmarks run small."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edge_agent import bench_cli
from edge_agent.bench import (
    LoadConfig,
    OverheadConfig,
    load_benchmark,
    overhead_benchmark,
    write_load,
    write_overhead,
)
from edge_agent.noop import NOOP_VARIANT, NoopSourceError, noop_side
from edge_agent.settings import ApiKey
from tests.agent.conftest import SMALL, decode_image
from zimage_edge.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY = "bench-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_noop_model_serves_images_through_the_whole_path(start_agent) -> None:
    client = await start_agent(model="noop:64", api_keys=[ApiKey(name="bench", sha256=ApiKey.hash(KEY))])
    assert (await client.post("/v1/generate", json=SMALL)).status == 401  # auth is on the path

    response = await client.post("/v1/generate", json={**SMALL, "width": 96, "seed": 7}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["model"] == NOOP_VARIANT
    assert body["images"][0]["seed"] == 7
    image = decode_image(body["images"][0]["b64"])
    assert (image.format, image.size) == ("PNG", (96, 64))

    response = await client.post("/v1/generate", json={**SMALL, "n": 2}, headers=AUTH)
    assert len((await response.json())["images"]) == 2  # every image of a request comes back

    response = await client.post(
        "/v1/generate", json={**SMALL, "output_format": "jpeg"}, headers={**AUTH, "Accept": "image/jpeg"}
    )
    assert response.content_type == "image/jpeg"
    assert decode_image(await response.read()).format == "JPEG"


async def test_models_marks_the_noop_model(start_agent) -> None:
    client = await start_agent(model="noop:128")
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["id"] == NOOP_VARIANT
    assert entry["benchmark_only"] is True
    assert "no-op" in entry["note"]
    assert entry["sizes"]["default"] == {"width": 128, "height": 128}
    body = await (await client.post("/v1/generate", json={"prompt": "anything"})).json()
    assert decode_image(body["images"][0]["b64"]).size == (128, 128)  # its own side by default


async def test_a_real_model_is_not_marked(start_agent) -> None:
    client = await start_agent()
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["benchmark_only"] is False
    assert "note" not in entry


async def test_noop_stream_reports_every_step(start_agent) -> None:
    client = await start_agent(model="noop")
    text = await (await client.post("/v1/generate", json={**SMALL, "stream": True, "steps": 3})).text()
    progress = [line for line in text.splitlines() if line.startswith('data: {"step"')]
    assert len(progress) == 3
    assert "event: result" in text


def test_noop_sources() -> None:
    assert noop_side("noop") == 64
    assert noop_side("noop:256") == 256
    assert noop_side("/models/noop") is None
    assert noop_side("noopy") is None
    for bad in ("noop:65", "noop:x", "noop:0", "noop:4096"):
        with pytest.raises(NoopSourceError):
            noop_side(bad)


async def test_overhead_benchmark_small(tmp_path: Path) -> None:
    config = OverheadConfig(requests=30, warmup=5, concurrency=(1, 3))
    report = await overhead_benchmark(config)
    s = report["sequential"]
    assert s["requests"] == 30
    assert s["p99_ms"] >= s["p50_ms"] > 0
    assert s["requests_per_sec"] > 0
    assert report["target_met"] == (s["p50_ms"] <= report["target_p50_ms"])
    assert [row["concurrency"] for row in report["concurrency"]] == [1, 3]
    for row in report["concurrency"] + report["floor"]["concurrency"]:
        assert row["p99_ms"] >= row["p50_ms"] > 0
        assert row["requests_per_sec"] > 0
    assert report["floor"]["sequential"]["p50_ms"] > 0
    assert report["agent_cpus"] != report["client_cpus"] or not report["pinned_apart"]
    assert report["answer_bytes"] > 0

    paths = write_overhead(tmp_path, report)
    assert [p.name for p in paths] == ["agent-overhead.json", "agent-overhead.md", "agent-overhead.png"]
    assert json.loads(paths[0].read_text()) == report
    assert f"{s['p50_ms']:.3f}" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(PNG_MAGIC)


def test_load_benchmark_small(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = LoadConfig(model=str(tiny_model_dir), concurrency=(1, 2), requests=4, direct_requests=4, steps=1)
    report = load_benchmark(config)
    assert report["direct"]["p99_ms"] >= report["direct"]["p50_ms"] > 0
    assert [row["concurrency"] for row in report["concurrency"]] == [1, 2]
    for row in report["concurrency"]:
        assert row["requests"] == 4
        assert row["p99_ms"] >= row["p50_ms"] > 0
        assert row["images_per_sec"] > 0
    assert report["concurrency"][0]["gain_vs_first"] == 1.0
    assert set(report["overhead_vs_direct"]) == {"p50_ms", "p99_ms", "mean_ms"}
    paths = write_load(tmp_path, report)
    assert "| concurrency | images/s |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(PNG_MAGIC)


def test_bench_agent_registers_on_a_bench_group() -> None:
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["agent", "--concurrency", "1,2,4", "--requests", "30", "--overhead-only"])
    assert args.handler.__name__ == "_cmd_agent"
    assert (args.requests, args.overhead_only, args.out) == (30, True, str(bench_cli.DEFAULT_OUT))
    assert bench_cli.parse_levels(args.concurrency) == (1, 2, 4)
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(UsageError):
            bench_cli.parse_levels(bad)
