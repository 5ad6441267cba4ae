"""The catalogue of checkpoints under EMBER_HOME, in SQLite (safe across processes).

checkpoints: name -> store path, size, index digest, where it came from
locations:   which node holds which checkpoint in which tier (dram, disk)
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ember.db import SqliteDb
from ember.errors import CheckpointExistsError, CheckpointNotFoundError, InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locations (
    name TEXT NOT NULL,
    node TEXT NOT NULL,
    tier TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (name, node, tier)
);
"""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)",
            param="name",
        )
    return name


@dataclass(frozen=True)
class CheckpointRecord:
    name: str
    path: str
    size: int
    digest: str
    source: str
    created: float


@dataclass(frozen=True)
class Location:
    name: str
    node: str
    tier: str
    size: int
    last_used: float


class Catalog:
    """SQLite catalogue at `db_path`. Each call opens a short transaction, so several
    processes can share one file (WAL journal, busy timeout)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self._db = SqliteDb(self.db_path, _SCHEMA)
        self._tx = self._db.tx

    def add(self, name: str, path: Path, size: int, digest: str, source: str = "") -> CheckpointRecord:
        check_name(name)
        rec = CheckpointRecord(name, str(path), size, digest, source, time.time())
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.name, rec.path, rec.size, rec.digest, rec.source, rec.created),
                )
            except sqlite3.IntegrityError as exc:
                raise CheckpointExistsError(f"a checkpoint named {name!r} is already stored") from exc
        return rec

    def get(self, name: str) -> CheckpointRecord:
        with self._tx() as db:
            row = db.execute("SELECT * FROM checkpoints WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise CheckpointNotFoundError(f"no checkpoint named {name!r} in the store")
        return CheckpointRecord(*row)

    def find(self, name: str) -> CheckpointRecord | None:
        try:
            return self.get(name)
        except CheckpointNotFoundError:
            return None

    def all(self) -> list[CheckpointRecord]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM checkpoints ORDER BY name").fetchall()
        return [CheckpointRecord(*r) for r in rows]

    def remove(self, name: str) -> CheckpointRecord:
        rec = self.get(name)
        with self._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE name = ?", (name,))
        return rec

    def set_location(
        self, name: str, node: str, tier: str, size: int, *, last_used: float | None = None
    ) -> None:
        """Record that `node` holds `name` in `tier` (last used now, or at `last_used`)."""
        when = time.time() if last_used is None else last_used
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO locations VALUES (?, ?, ?, ?, ?)",
                (name, node, tier, size, when),
            )

    def touch_location(self, name: str, node: str, tier: str, *, last_used: float | None = None) -> None:
        """Move a location's last use to now (or `last_used`); no-op if it is not recorded."""
        when = time.time() if last_used is None else last_used
        with self._tx() as db:
            db.execute(
                "UPDATE locations SET last_used = ? WHERE name = ? AND node = ? AND tier = ?",
                (when, name, node, tier),
            )

    def drop_location(self, name: str, node: str, tier: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM locations WHERE name = ? AND node = ? AND tier = ?", (name, node, tier))

    def locations(
        self, name: str | None = None, *, node: str | None = None, tier: str | None = None
    ) -> list[Location]:
        """Recorded locations, optionally only those of one checkpoint, node and/or tier."""
        where, args = [], []
        for column, value in (("name", name), ("node", node), ("tier", tier)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM locations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._tx() as db:
            rows = db.execute(sql + " ORDER BY name, node, tier", args).fetchall()
        return [Location(*r) for r in rows]
