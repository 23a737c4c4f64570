"""The node's on-disk outbox: what it must tell the controller survives broker outages and restarts.

paho's own queue lives in memory and is unbounded, so a node that must not lose telemetry keeps its
own: every message gets the node's next 64-bit ``seq`` and a row in SQLite (WAL, one transaction per
batch) before it is published; a row goes only when the controller's acknowledgement watermark
(retained ``nodes/<node>/ack {"seq": n}``) passes it. Re-sending after a reconnect may deliver a
message twice; the controller stores ``(node, seq)`` once. The outbox is bounded in rows and bytes:
on overflow the oldest *telemetry* rows are dropped and counted, never rollout events (``events``),
which are few and are what an operator needs to see why a rollout did what it did.
Torch-free, blocking (SQLite): callers on an event loop run it in a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Bounds for a node that stays cut off: a day of telemetry at one message every 10 s is 8,640 rows of
# ~1 KB; 50,000 rows / 64 MiB holds several days without filling a small node's disk.
DEFAULT_MAX_ROWS = 50_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
Build = Callable[[int], bytes]  # seq -> the payload that carries it

# Kinds that are never dropped to make room.
KEPT_KINDS = frozenset({"events"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (seq INTEGER PRIMARY KEY);
"""


@dataclass(frozen=True)
class Pending:
    seq: int
    kind: str  # the topic kind it goes to: "telemetry", "events"
    payload: bytes


class Outbox:
    """Rows waiting for the controller's acknowledgement, oldest first. Thread-safe."""

    def __init__(self, path: Path, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.dropped = 0  # telemetry rows dropped to stay within the bounds, since this process started
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only a power loss may lose the last batch.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _next_seq(self) -> int:
        # Kept in meta, not max(seq)+1: rows are deleted once acknowledged, and seq must never repeat.
        row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        return int(row[0]) if row else 1

    def add(self, items: list[tuple[str, Build]]) -> list[int]:
        """Store messages in one transaction: each ``(kind, build)`` gets the next seq, and ``build(seq)``
        makes its payload (payloads carry their own seq). Returns the seq numbers."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                first = self._next_seq()
                rows = [(first + i, kind, build(first + i)) for i, (kind, build) in enumerate(items)]
                self._db.executemany("INSERT INTO outbox (seq, kind, payload) VALUES (?, ?, ?)", rows)
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (first + len(items),),
                )
                self._enforce_bounds()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [row[0] for row in rows]

    def _enforce_bounds(self) -> None:
        rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        while rows > self.max_rows or size > self.max_bytes:
            oldest = self._db.execute(
                f"SELECT seq, LENGTH(payload) FROM outbox WHERE kind NOT IN ({','.join('?' * len(KEPT_KINDS))}) "
                "ORDER BY seq LIMIT 1",
                tuple(KEPT_KINDS),
            ).fetchone()
            if oldest is None:
                return  # only kept kinds remain: they stay, over the bound
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (oldest[0],))
            self._db.execute("INSERT INTO dropped (seq) VALUES (?)", (oldest[0],))
            self.dropped += 1
            rows, size = rows - 1, size - oldest[1]

    def announce_drops(self, build: Callable[[int, int, int], bytes]) -> list[int]:
        """Turn the seqs dropped since the last call into events (one per contiguous range), in one
        transaction: ``build(seq, first, last)`` makes each event. Returns the events' seqs."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seqs = [int(row[0]) for row in self._db.execute("SELECT seq FROM dropped ORDER BY seq")]
                ranges: list[tuple[int, int]] = []
                for seq in seqs:
                    if ranges and seq == ranges[-1][1] + 1:
                        ranges[-1] = (ranges[-1][0], seq)
                    else:
                        ranges.append((seq, seq))
                first_seq = self._next_seq()
                rows = [(first_seq + i, "events", build(first_seq + i, a, b)) for i, (a, b) in enumerate(ranges)]
                self._db.executemany("INSERT INTO outbox (seq, kind, payload) VALUES (?, ?, ?)", rows)
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (first_seq + len(rows),),
                )
                self._db.execute("DELETE FROM dropped")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [row[0] for row in rows]

    def pending(self, limit: int = 500, after: int = 0) -> list[Pending]:
        """The oldest unacknowledged rows (with a seq above ``after``: those not yet sent)."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT seq, kind, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            )
            return [Pending(int(s), str(k), bytes(p)) for s, k, p in cursor]

    def acknowledge(self, upto: int) -> int:
        """The controller has everything up to ``upto``: forget those rows; returns how many went."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM outbox WHERE seq <= ?", (upto,))
            return int(cursor.rowcount)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
