"""The fleet scale benchmark, run small: real Mosquitto, a real controller process, simulated nodes in
two processes. The full run (1,000 nodes, minutes) is ``benchmarks/fleet_scale.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet import bench_cli
from fleet.bench import (
    ScaleOptions,
    load_markdown,
    markdown,
    max_sustained,
    plot_load,
    run_load_sweep,
    run_scale,
    sustained,
)


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


async def test_two_replicas_on_postgresql_share_the_ingest_and_the_sweep_reports_it(
    tiny_model_dir, artifacts, tmp_path: Path
) -> None:
    release = [artifacts.get(tiny_model_dir, "bf16")]
    point = ScaleOptions(
        nodes=6, processes=2, interval_s=0.2, warmup_s=0.2, duration_s=1.0, drain_s=60.0,
        database="postgresql", replicas=2, rollout=False,
    )  # fmt: skip
    seen: list[dict] = []
    runs = await run_load_sweep([point], release, on_point=seen.append)

    assert seen == runs
    [run] = runs
    delivery = run["delivery"]
    assert delivery["stored"] == delivery["produced"] > point.nodes
    assert delivery["lost"] == 0
    assert delivery["simulator_errors"] == 0, delivery["first_errors"]
    # The shared subscription split the telemetry between the replicas; together they saw all of it.
    per_replica = delivery["received_per_replica"]
    assert len(per_replica) == 2
    assert min(per_replica) > 0
    assert sum(per_replica) >= delivery["produced"]
    telemetry = run["telemetry"]
    assert set(telemetry["cores"]) == {"controller-0", "controller-1", "broker", "postgresql", "simulator-0",
                                       "simulator-1"}  # fmt: skip
    assert telemetry["database_cores"] > 0
    assert 0 < telemetry["achieved_offered_per_s"] <= 1.05 * point.offered_per_s
    assert "rollout" not in run

    table = load_markdown(runs)
    assert "| PostgreSQL, 2 controller replicas | 6 |" in table
    assert "PostgreSQL, 2 controller replicas: " in table
    png = plot_load(runs, tmp_path / "plots" / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(setup: str, offered: float, stored: float, lost: int, p99_ms: float | None) -> dict:
    database, replicas = setup.split("/")
    return {
        "options": {"database": database, "replicas": int(replicas), "nodes": 10},
        "telemetry": {"achieved_offered_per_s": offered, "stored_per_s": stored},
        "delivery": {"lost": lost, "ack_latency_ms": {"steady": {"p99": p99_ms}}},
    }


def test_a_load_is_sustained_when_all_is_stored_in_time_and_nothing_lost() -> None:
    runs = [
        _run("sqlite/1", 500, 499, 0, 80.0),
        _run("sqlite/1", 1000, 995, 0, 1500.0),
        _run("sqlite/1", 2000, 1990, 0, 2500.0),  # kept up on average, but the lag grew past the bound
        _run("sqlite/1", 3000, 1400, 0, 9000.0),  # fell behind
        _run("postgresql/2", 1000, 1000, 1, 50.0),  # one sample lost
        _run("postgresql/2", 500, 300, 0, 50.0),  # stored too little
    ]
    assert [sustained(run) for run in runs] == [True, True, False, False, False, False]
    assert max_sustained(runs) == {"SQLite, 1 controller": 1000, "PostgreSQL, 2 controller replicas": None}


def test_bench_fleet_writes_json_markdown_and_a_plot(tiny_model_dir, artifacts, tmp_path: Path) -> None:
    release = [str(artifacts.get(tiny_model_dir, variant)) for variant in ("bf16", "int4-te8")]
    out = tmp_path / "results"
    args = ["--nodes", "4", "--processes", "1", "--duration", "1", "--warmup", "0.2", "--bake", "0.2",
            "--max-unavailable", "2", "--drain", "60", "--out", str(out), "--artifacts", *release]  # fmt: skip
    assert bench_cli.main(args) == 0
    results = json.loads((out / "fleet-scale.json").read_text())
    assert results["options"]["nodes"] == 4
    assert results["delivery"]["lost"] == 0
    assert results["rollout"]["status"] == "succeeded"
    steady = results["delivery"]["ack_latency_ms"]["steady"]
    assert len(steady["percentiles_ms"]) == 101
    assert steady["percentiles_ms"] == sorted(steady["percentiles_ms"])
    assert steady["percentiles_ms"][50] == steady["p50"]
    assert (out / "fleet-scale.md").read_text() == markdown(results)
    assert (out / "fleet-scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_fleet_refuses_a_bad_setup_before_starting_anything(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_cli.main(["--sweep", "--setups", "mysql/1", "--out", str(tmp_path / "results")])
    assert exited.value.code == 2
    assert "a setup is DATABASE/REPLICAS" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_sweep_in_parts_appends_its_points_to_the_runs_already_written(
    tiny_model_dir, artifacts, tmp_path: Path
) -> None:
    """A long sweep run in parts (``--append``): only the big points this time, after the earlier ones."""
    out = tmp_path / "results"
    out.mkdir()
    committed = Path(__file__).parents[2] / "benchmarks" / "results" / "fleet-load.json"
    earlier = json.loads(committed.read_text())["runs"][:2]
    (out / "fleet-load.json").write_text(json.dumps({"runs": earlier}))
    release = str(artifacts.get(tiny_model_dir, "int8"))
    args = ["--sweep", "--setups", "sqlite/1", "--intervals", "none", "--big-nodes", "3", "--big-setups", "sqlite/1",
            "--processes", "1", "--duration", "1", "--warmup", "0.2", "--drain", "60", "--out", str(out),
            "--artifacts", release, "--append"]  # fmt: skip
    assert bench_cli.main(args) == 0
    runs = json.loads((out / "fleet-load.json").read_text())["runs"]
    assert runs[:2] == earlier
    assert len(runs) == 3
    assert (runs[2]["options"]["nodes"], runs[2]["options"]["interval_s"]) == (3, 1.0)
    assert runs[2]["delivery"]["lost"] == 0
    assert (out / "fleet-load.md").read_text() == load_markdown(runs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--intervals", "none", "--big-nodes", "0"], "the sweep has no points"),
        (["--append"], "cannot read the runs of"),
    ],
)
def test_a_sweep_with_nothing_to_run_or_nothing_to_append_to_is_refused(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_cli.main(["--sweep", "--setups", "sqlite/1", "--out", str(tmp_path / "results"), *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
