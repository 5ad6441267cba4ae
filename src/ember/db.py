"""SQLite under EMBER_HOME, safe for several processes: WAL journal, busy timeout,
one short IMMEDIATE transaction per call.

Two settings keep a commit off the disk's flush path (a cold start writes three or
four rows on the request's path; each cost 10-40 ms on a busy disk, now ~0.1 ms):

- `synchronous=NORMAL` on every connection. In WAL mode a commit then appends to the
  WAL without an fsync; the WAL is synced at each checkpoint. The database stays
  consistent in every case, and a committed transaction survives a crash of any
  process; only an OS crash or power loss can roll back the last few commits. That
  is acceptable here: the catalogue and the cluster state describe files and
  processes that an OS crash loses anyway (instances die with it, a DRAM row is
  dropped on the next open, a half-fetched copy is never published).
- One idle connection held open per SqliteDb (the keeper). SQLite checkpoints the
  WAL and deletes it when the last connection to a file closes, with fsyncs, and the
  next writer recreates it; every `tx()` opens and closes its own connection, so
  without the keeper each one paid that.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PRAGMAS = ("PRAGMA busy_timeout=30000", "PRAGMA synchronous=NORMAL")


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
        # Opened after the schema: reading sqlite_master makes it hold the file (and
        # its WAL) open; it never runs a transaction, so it blocks no one.
        self._keeper: sqlite3.Connection | None = self._connect()
        self._keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        for pragma in PRAGMAS:
            db.execute(pragma)
        return db

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
        """One IMMEDIATE transaction: committed when the block ends, rolled back when it
        raises or the commit itself fails (disk I/O error, database locked), so a
        failed call leaves the file as it was."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                self._commit(db)
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                        db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection) -> None:
        # A method of its own: the tests make it fail as a full or failing disk would.
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the keeper connection (`tx()` still works, at the old cost)."""
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
