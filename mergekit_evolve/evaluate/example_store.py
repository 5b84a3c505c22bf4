"""Per-example results, keyed by config digest: a config is never scored twice on one example.

Kept as SQLite in the run folder (``examples.db``), so a resumed run, a later and larger
evaluation, and the report all reuse what earlier trials computed. Several worker processes
may share the file (WAL mode, waits on locks).

``ScoreCache`` keeps whole-split scores of fixed models (the sources) under keys that name
everything the score depends on, in one JSON file that the stages of a staged run share.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any


class ExampleStore:
    def __init__(self, path: Path | None = None, reads: Path | None = None):
        """``reads``: another store's file (a resumed run's, before this process holds its lock), opened
        read-only: ``get`` finds its rows too, but nothing is ever written to it."""
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path else ":memory:", timeout=60, check_same_thread=False, uri=True)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
            # no fsync a commit: a killed process still keeps every commit; power loss may lose
            # the last few examples, which are then simply scored again
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS examples (digest TEXT, task TEXT, doc_id INTEGER, metrics TEXT, "
            "PRIMARY KEY (digest, task, doc_id))"
        )
        self._db.commit()
        self._tables = ["examples"]
        if reads is not None and reads.exists():
            self._db.execute("ATTACH DATABASE ? AS earlier", (reads.resolve().as_uri() + "?mode=ro",))
            self._tables.append("earlier.examples")

    def get(self, digest: str, task: str, ids: list[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for table in self._tables:
                    rows = self._db.execute(
                        f"SELECT doc_id, metrics FROM {table} WHERE digest = ? AND task = ? "
                        f"AND doc_id IN ({','.join('?' * len(chunk))})",
                        (digest, task, *chunk),
                    ).fetchall()
                    out.update({doc_id: json.loads(metrics) for doc_id, metrics in rows})
        return out

    def put(self, digest: str, rows_by_task: dict[str, dict[int, dict[str, Any]]]) -> None:
        """Store one config's new rows of several tasks in one commit."""
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?)",
                [
                    (digest, task, doc_id, json.dumps(metrics))
                    for task, rows in rows_by_task.items()
                    for doc_id, metrics in rows.items()
                ],
            )
            self._db.commit()

    def absorb(self, other: ExampleStore) -> None:
        """Keep what ``other`` (say, the in-memory store of the checks before a run folder existed) computed."""
        with other._lock:
            rows = other._db.execute("SELECT digest, task, doc_id, metrics FROM examples").fetchall()
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?)", rows)
            self._db.commit()

    def count(self, digest: str | None = None) -> int:
        with self._lock:
            if digest is None:
                return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM examples WHERE digest = ?", (digest,)).fetchone()[0]

    def close(self) -> None:
        """Close the file: SQLite then folds the WAL back into it and removes the -wal/-shm files."""
        with self._lock:
            self._db.close()


class ScoreCache:
    """Whole-split scores by key, in ``path`` (a JSON object) or, without one, in memory.

    Written only by the run's main process (the sources' checks and the report), each write
    whole and renamed into place, so a killed run leaves the previous file."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._values: dict[str, float] = json.loads(path.read_text()) if path and path.exists() else {}

    def get(self, key: str) -> float | None:
        return self._values.get(key)

    def put(self, values: dict[str, float]) -> None:
        self._values.update(values)
        if self.path is not None:
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(self._values, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(partial, self.path)
