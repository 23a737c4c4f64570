"""``benchmarks/gpu/run.py`` at tiny size on CPU: one command, one JSON file, every variant measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run.py"


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    argv = [sys.executable, str(SCRIPT), "--tiny", "--resolutions", "64", "--steps", "2", "--runs", "1"]
    env = {**os.environ, "ZIMAGE_CPU__THREADS": "1"}
    subprocess.run([*argv, "--out", str(out), "--workdir", str(tmp_path)], check=True, timeout=300, env=env)
    report = json.loads(out.read_text())
    assert report["tiny"] is True
    assert report["dtype"] == "float32"
    assert report["device"]["kind"] == "cpu"
    assert {"torch", "optimum-quanto"} <= set(report["software"])
    assert report["config"]["transformer"]["dim"] == 384
    by_name = {row["variant"]: row for row in report["variants"]}
    assert list(by_name) == ["bf16", "int8", "fp8", "int4"]
    for name, row in by_name.items():
        assert "error" not in row, row
        (cell,) = row["cells"]
        assert (cell["resolution"], cell["steps"], cell["runs"]) == (64, 2, 1)
        assert cell["latency_p50_s"] > 0
        assert cell["peak_bytes"] > 0
        assert cell["finite"]
        assert (row["quantized_weights"] > 0) == (name != "bf16")
    # Quantization error against the unquantized run grows as the weights get fewer bits.
    int8, int4 = (by_name[v]["cells"][0]["latent_rel_l2_vs_bf16"] for v in ("int8", "int4"))
    assert 0 < int8 < int4 < 0.2
    (load,) = report["cold_load"]
    assert load["variant"] == "int8"
    pre, naive = load["prequantized"], load["quantize_at_load"]
    assert "error" not in pre, pre
    assert "error" not in naive, naive
    assert pre["seconds"] > 0
    assert 0 < naive["load_bf16_seconds"] <= naive["seconds"]
    # Loading float weights and quantizing them holds the float copy first; the artifact never does.
    assert naive["device_peak_bytes"] > pre["device_peak_bytes"] > 0
    assert load["device_peak_ratio"] > 1
    assert not list(tmp_path.glob("gpu-bench-*"))  # the scratch checkpoints are gone
