"""SqliteDb: every connection runs with synchronous=NORMAL, and the keeper connection
keeps the WAL in place between transactions (no checkpoint and delete per commit)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ember.db import SqliteDb

SCHEMA = "CREATE TABLE IF NOT EXISTS t (a INTEGER)"
NORMAL = 1  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL


def test_transactions_run_in_wal_with_synchronous_normal(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "x.db", SCHEMA)
    with db.tx() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == NORMAL
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO t VALUES (1)")
    db.close()


def test_commits_are_seen_by_another_connection(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "x.db", SCHEMA)
    with db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (7)")
    other = sqlite3.connect(tmp_path / "x.db")
    try:
        assert other.execute("SELECT a FROM t").fetchall() == [(7,)]
    finally:
        other.close()
    db.close()


def test_the_wal_stays_between_transactions(tmp_path: Path) -> None:
    wal = tmp_path / "x.db-wal"
    db = SqliteDb(tmp_path / "x.db", SCHEMA)
    with db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    assert wal.exists()  # the keeper is open: closing tx()'s connection did not checkpoint
    db.close()
    with db.tx() as conn:  # still usable after close, at the old cost
        conn.execute("INSERT INTO t VALUES (2)")
    assert not wal.exists()  # the last connection closed: SQLite checkpointed and removed it
    with db.tx() as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 2


def test_a_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "x.db", SCHEMA)
    try:
        with db.tx() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with db.tx() as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    db.close()
