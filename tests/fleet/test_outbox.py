"""The node's outbox: nothing lost across restarts, acknowledged rows go, bounds drop old telemetry only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.outbox import Outbox


def _telemetry(seq: int) -> bytes:
    return json.dumps({"seq": seq, "cpu": 0.5}).encode()


def test_rows_survive_a_restart_and_seq_never_repeats(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert box.add([("telemetry", _telemetry), ("events", _telemetry)]) == [1, 2]
    box.close()
    again = Outbox(tmp_path / "outbox.db")  # a node restart
    assert [(p.seq, p.kind, json.loads(p.payload)["seq"]) for p in again.pending()] == [
        (1, "telemetry", 1),
        (2, "events", 2),
    ]
    assert again.acknowledge(2) == 2
    assert len(again) == 0
    assert again.add([("telemetry", _telemetry)]) == [3]  # not 1: acknowledged numbers are not reused


def test_acknowledge_removes_up_to_the_watermark(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.add([("telemetry", _telemetry)] * 10)
    assert box.acknowledge(4) == 4
    assert [p.seq for p in box.pending()] == [5, 6, 7, 8, 9, 10]
    assert box.acknowledge(4) == 0  # a stale (retained, repeated) ack changes nothing


def test_overflow_drops_the_oldest_telemetry_never_events(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_rows=5)
    box.add([("events", _telemetry), ("telemetry", _telemetry), ("telemetry", _telemetry)])
    box.add([("telemetry", _telemetry)] * 4)
    kinds = [(p.seq, p.kind) for p in box.pending()]
    assert kinds == [(1, "events"), (4, "telemetry"), (5, "telemetry"), (6, "telemetry"), (7, "telemetry")]
    assert box.dropped == 2
    box.add([("events", _telemetry)] * 6)  # events are never dropped, even over the bound
    assert sum(1 for p in box.pending() if p.kind == "events") == 7
    assert all(p.kind == "events" for p in box.pending())


def test_the_byte_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_bytes=100)
    box.add([("telemetry", lambda seq: b"x" * 40)] * 4)
    assert [p.seq for p in box.pending()] == [3, 4]
    assert box.dropped == 2


def test_a_failed_batch_stores_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")

    def broken(seq: int) -> bytes:
        raise ValueError("cannot encode")

    with pytest.raises(ValueError, match="cannot encode"):
        box.add([("telemetry", _telemetry), ("telemetry", broken)])
    assert len(box) == 0
    assert box.add([("telemetry", _telemetry)]) == [1]


def test_dropped_seqs_are_announced_once_as_ranges(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_rows=3)
    box.add([("telemetry", _telemetry)] * 6)  # 1..3 dropped
    announced: list[tuple[int, int, int]] = []

    def event(seq: int, first: int, last: int) -> bytes:
        announced.append((seq, first, last))
        return json.dumps({"seq": seq, "dropped": [first, last]}).encode()

    assert box.announce_drops(event) == [7]
    assert announced == [(7, 1, 3)]
    assert box.announce_drops(event) == []  # said once
    assert [p.kind for p in box.pending()][-1] == "events"
