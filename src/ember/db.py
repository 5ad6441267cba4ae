"""SQLite under EMBER_HOME, safe for several processes: WAL journal, busy timeout,
one short IMMEDIATE transaction per call."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SqliteDb:
    """A database file with a schema; `tx()` is one transaction on a fresh connection."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._use_wal()
        with self.tx() as db:
            # Not executescript: it COMMITs first, ending tx()'s transaction early.
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _use_wal(self) -> None:
        """Switch the file to WAL once (it persists in the file). Changing the journal
        mode does not wait on SQLite's busy handler, so processes creating the file at
        once retry here instead of failing with 'database is locked'."""
        deadline = time.monotonic() + 30.0
        while True:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()
