"""The node's audit log: one SQLite row per received instance, at ``<spool>/audit.sqlite``.

The log is also the node's work list: an instance's ``state`` says what is left to do with it
(``received`` -> checked -> ``queued`` -> ``sending`` -> ``forwarded``; or ``held`` -> ``queued``
after a release, or ``discarded``). Every change is one transaction (``with self.tx():``), in WAL
mode with ``synchronous=FULL``, so a row that says an instance was received survives a crash of
the process or of the machine, and a restart resumes from the states.

``status`` is the check's answer for the instance's series: ``ok``, ``review``, ``mismatch``,
``rejected`` (a lung series the gate refused), ``passed`` (not a lung V/Q series: not checked) or
``report`` (the node's own structured report); ``received`` until the series is checked.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDIT_NAME = "audit.sqlite"

#: Lifecycle states (``state`` column).
RECEIVED, QUEUED, SENDING, FORWARDED, HELD, DISCARDED = (
    "received", "queued", "sending", "forwarded", "held", "discarded",
)  # fmt: skip
TERMINAL = (FORWARDED, HELD, DISCARDED)

COLUMNS: tuple[tuple[str, str], ...] = (
    ("sop_instance_uid", "TEXT PRIMARY KEY"),
    ("series_instance_uid", "TEXT NOT NULL"),
    ("study_instance_uid", "TEXT"),
    ("patient_id", "TEXT"),
    ("sop_class_uid", "TEXT"),
    ("calling_ae", "TEXT"),
    ("received_at", "TEXT NOT NULL"),
    ("declared", "TEXT"),
    ("predicted", "TEXT"),
    ("prob_perfusion", "REAL"),
    ("status", "TEXT NOT NULL"),
    ("review", "INTEGER NOT NULL DEFAULT 0"),
    ("state", "TEXT NOT NULL"),
    ("checked_at", "TEXT"),
    ("forwarded_at", "TEXT"),
    ("held_reason", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("deliveries", "INTEGER NOT NULL DEFAULT 0"),
    ("last_error", "TEXT"),
    ("report_for", "TEXT"),
    ("released_by", "TEXT"),
    ("released_at", "TEXT"),
    ("release_action", "TEXT"),
    ("file", "TEXT"),
)
"""``deliveries``: C-STOREs of this instance the PACS acknowledged (1 when all went well; a copy
found on the PACS by C-FIND after a crash counts, without a second send). ``report_for``: on the
node's SR, the series it reports on. ``file``: the spool file, relative to the spool."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS instances (
  {", ".join(f"{name} {kind}" for name, kind in COLUMNS)}
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  at TEXT NOT NULL,
  series_instance_uid TEXT,
  action TEXT NOT NULL,
  who TEXT,
  detail TEXT
);
"""


def now_iso() -> str:
    """UTC now, ISO 8601 with microseconds (sorts as text, parses with fromisoformat)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Audit:
    """The audit database, shared by the node's threads (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self.tx():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed as a whole, or rolled back on any error."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, tuple(args)).fetchall()]

    # ---------------------------------------------------------------- receiving
    def get(self, sop_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
        return rows[0] if rows else None

    def add_received(self, row: Mapping[str, Any]) -> bool:
        """Record a received instance (state ``received``); False when the SOP instance is known
        already (a re-send: the first copy stands, nothing is forwarded twice)."""
        values = {"status": RECEIVED, "state": RECEIVED, "received_at": now_iso(), **row}
        names = list(values)
        with self.tx() as db:
            cur = db.execute(
                f"INSERT OR IGNORE INTO instances ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)})",
                [values[n] for n in names],
            )
            return cur.rowcount == 1

    def event(self, db: sqlite3.Connection, series: str | None, action: str, who: str | None,
              detail: str | None = None) -> None:  # fmt: skip
        db.execute(
            "INSERT INTO events (at, series_instance_uid, action, who, detail) VALUES (?,?,?,?,?)",
            (now_iso(), series, action, who, detail),
        )

    # ---------------------------------------------------------------- series
    def pending_series(self) -> list[dict[str, Any]]:
        """Series with instances not yet checked, with their latest receive time."""
        return self.query(
            "SELECT series_instance_uid AS series, MAX(received_at) AS last, COUNT(*) AS n "
            "FROM instances WHERE state = ? GROUP BY series_instance_uid",
            (RECEIVED,),
        )

    def series_rows(self, series: str, state: str | None = None) -> list[dict[str, Any]]:
        if state is None:
            return self.query(
                "SELECT * FROM instances WHERE series_instance_uid = ? ORDER BY received_at",
                (series,),
            )
        return self.query(
            "SELECT * FROM instances WHERE series_instance_uid = ? AND state = ? "
            "ORDER BY received_at",
            (series, state),
        )

    def series_decision(self, series: str) -> dict[str, Any] | None:
        """The check already taken for this series (an instance that arrives after its series
        was checked gets the same decision), or None."""
        rows = self.query(
            "SELECT declared, predicted, prob_perfusion, status, review, held_reason, state "
            "FROM instances WHERE series_instance_uid = ? AND status != ? "
            "ORDER BY checked_at LIMIT 1",
            (series, RECEIVED),
        )
        return rows[0] if rows else None

    # ---------------------------------------------------------------- forwarding
    def by_state(self, state: str, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM instances WHERE state = ? ORDER BY received_at"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, (state,))

    def counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM instances GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}
