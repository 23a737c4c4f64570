"""The fleet scale benchmark, run small: real Mosquitto, a real controller process, simulated nodes in
two processes. The full run (1,000 nodes, minutes) is ``benchmarks/fleet_scale.py``."""

from __future__ import annotations

from pathlib import Path

from fleet.bench import ScaleOptions, markdown, run_scale


async def test_the_scale_benchmark_measures_a_small_fleet_end_to_end(tiny_model_dir, artifacts, tmp_path: Path) -> None:
    release = [artifacts.get(tiny_model_dir, variant) for variant in ("bf16", "int8-te8", "int4-te8")]
    options = ScaleOptions(
        nodes=9, processes=2, interval_s=0.2, warmup_s=0.2, duration_s=1.0, bake_s=0.2, max_unavailable=3,
        rollout_timeout_s=120.0, drain_s=60.0,
    )  # fmt: skip
    results = await run_scale(options, release, tmp_path / "work")

    delivery = results["delivery"]
    assert delivery["produced"] > options.nodes  # several samples per node
    assert delivery["stored"] == delivery["produced"]
    assert delivery["lost"] == 0
    assert delivery["unacked_at_stop"] == 0  # every node saw the ack of everything it produced
    assert delivery["received_by_controller"] >= delivery["produced"]
    assert delivery["simulator_errors"] == 0, delivery["first_errors"]
    telemetry = results["telemetry"]
    assert telemetry["stored_per_s"] > 0
    assert telemetry["controller_cores"] > 0
    assert telemetry["controller_rss_mib"]["peak"] > 0
    rollout = results["rollout"]
    assert rollout["status"] == "succeeded"
    assert rollout["nodes"] == options.nodes
    # Profiles are dealt round robin: three Orin Nanos, three T4s, three A10s, each on its best fit.
    assert rollout["variants"] == {"int4-te8": 3, "int8-te8": 3, "bf16": 3}
    # 10% of 9 nodes is the one node of the first wave: three distinct waves (1, 5, 9 nodes).
    assert rollout["wave_bounds"] == [1, 5, 9]
    assert len(rollout["wave_ends_s"]) == 3
    assert rollout["wave_ends_s"] == sorted(rollout["wave_ends_s"])
    table = markdown(results)
    assert f"| produced / stored / lost | {delivery['produced']} / {delivery['produced']} / **0** |" in table
