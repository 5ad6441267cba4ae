"""The control plane's durable state, in SQLite at `$EMBER_HOME/cluster.db`.

deployments: name -> model and scaling policy; they survive restarts
instances:   every instance ever started, with its node and state; instances left
             live by an earlier process died with it and are marked dead on open
loads:       estimated vs actual start-up time of every load, by tier
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.cluster.messages import LIVE_STATES, InstanceState
from ember.db import SqliteDb
from ember.env import ember_home
from ember.errors import ClusterStateError, InvalidRequestError, ModelNotFoundError
from ember.store.catalog import check_name

DEFAULT_MIN_INSTANCES = 0
DEFAULT_MAX_INSTANCES = 4
DEFAULT_TARGET_CONCURRENCY = 16  # requests in flight per instance before another starts
DEFAULT_KEEP_ALIVE_S = 120.0  # an idle instance above min_instances goes after this long

# Bounds: a typo (or NaN, or 1e300) is refused with a clear error instead of reaching
# SQLite (which stores NaN as NULL and refuses ints past 2**63) or the autoscaler.
MAX_INSTANCES = 1024
MAX_TARGET_CONCURRENCY = 1_000_000
MAX_KEEP_ALIVE_S = 365 * 86400.0  # a year; an instance that should never go is min_instances
MAX_NAME_CHARS = 128
# Parts of letters, digits, '.', '_', '-', each starting with a letter or digit, joined
# by single '/' ("org/model"): no empty, "." or ".." part, so a name is a clean URL path.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
_NAME = re.compile(NAME_PATTERN)
log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    min_instances INTEGER NOT NULL,
    max_instances INTEGER NOT NULL,
    target_concurrency INTEGER NOT NULL,
    keep_alive_s REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    model TEXT NOT NULL,
    node TEXT NOT NULL,
    tier TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    estimated_s REAL NOT NULL,
    actual_s REAL NOT NULL,
    finished REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Deployment:
    """A model served under `name`, with its scaling policy (validated on creation:
    the admin API, `ember deploy` and the Python API all get these errors)."""

    name: str
    model: str
    min_instances: int = DEFAULT_MIN_INSTANCES
    max_instances: int = DEFAULT_MAX_INSTANCES
    target_concurrency: int = DEFAULT_TARGET_CONCURRENCY
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidRequestError("a deployment needs a model: a checkpoint's name", param="model")
        try:
            check_name(self.model)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"model: {exc.message}", param="model") from None
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_CHARS or not _NAME.match(self.name):
            raise InvalidRequestError(
                f"invalid deployment name {self.name!r}: 1-{MAX_NAME_CHARS} letters, digits, '.', '_', '-', "
                "starting with a letter or digit; '/' may join such parts (org/model)",
                param="name",
            )
        _check_int("min_instances", self.min_instances, 0, MAX_INSTANCES)
        _check_int("max_instances", self.max_instances, 1, MAX_INSTANCES)
        if self.min_instances > self.max_instances:
            raise InvalidRequestError(
                f"min_instances ({self.min_instances}) must be at most max_instances ({self.max_instances})",
                param="min_instances",
            )
        _check_int("target_concurrency", self.target_concurrency, 1, MAX_TARGET_CONCURRENCY)
        keep = self.keep_alive_s
        if (
            not isinstance(keep, int | float)
            or isinstance(keep, bool)
            or not math.isfinite(keep)
            or not 0 <= keep <= MAX_KEEP_ALIVE_S
        ):
            raise InvalidRequestError(
                f"keep_alive_s must be a number of seconds from 0 to {MAX_KEEP_ALIVE_S:.0f}, not {keep!r}",
                param="keep_alive_s",
            )


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequestError(
            f"{field} must be an integer from {low} to {high}, not {value!r}", param=field
        )


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    deployment: str
    node: str
    state: InstanceState
    started: float


@dataclass(frozen=True)
class LoadRecord:
    """One finished load: the start-up time placement expected, and what it took (s)."""

    instance: str
    model: str
    node: str
    tier: str
    nbytes: int
    estimated_s: float
    actual_s: float
    finished: float


class ClusterState:
    """SQLite state at `db_path` (default `$EMBER_HOME/cluster.db`). Opening it marks
    every instance an earlier process left live as dead: it died with that process."""

    def __init__(self, db_path: str | Path | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else ember_home() / "cluster.db"
        self._db = SqliteDb(self.db_path, _SCHEMA)
        with self._tx() as db:
            marks = ",".join("?" * len(LIVE_STATES))
            db.execute(f"UPDATE instances SET state = 'dead' WHERE state IN ({marks})", LIVE_STATES)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failure of SQLite itself (disk I/O error, database locked)
        rolls it back and raises ClusterStateError: the file is as it was."""
        try:
            with self._db.tx() as db:
                yield db
        except sqlite3.Error as exc:
            raise ClusterStateError(
                f"the cluster state database ({self.db_path}) failed: {exc}; nothing was changed",
                retry_after_s=1.0,
            ) from exc

    # -- deployments ------------------------------------------------------------------

    def put_deployment(self, dep: Deployment) -> Deployment:
        """Create or update (same name) a deployment."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "model = excluded.model, min_instances = excluded.min_instances, "
                "max_instances = excluded.max_instances, target_concurrency = excluded.target_concurrency, "
                "keep_alive_s = excluded.keep_alive_s",
                (*asdict(dep).values(), time.time()),
            )
        return dep

    def deployments(self) -> list[Deployment]:
        """The stored deployments, oldest first. A row an older Ember wrote outside
        today's bounds is left out (logged): `ember deploy` of its name replaces it."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT name, model, min_instances, max_instances, target_concurrency, keep_alive_s "
                "FROM deployments ORDER BY created, name"
            ).fetchall()
        out = []
        for row in rows:
            try:
                out.append(Deployment(*row))
            except InvalidRequestError as exc:
                log.error("stored deployment %r left out: %s", row[0], exc)
        return out

    def deployment(self, name: str) -> Deployment | None:
        return next((d for d in self.deployments() if d.name == name), None)

    def delete_deployment(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM deployments WHERE name = ?", (name,)).rowcount == 0:
                raise ModelNotFoundError(f"no deployment named {name!r}", param="name")

    # -- instances --------------------------------------------------------------------

    def add_instance(self, rec: InstanceRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", tuple(asdict(rec).values()))

    def set_instance_state(self, instance_id: str, state: InstanceState) -> None:
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ? WHERE id = ?", (state, instance_id))

    def instances(self, *, live_only: bool = True) -> list[InstanceRecord]:
        query = "SELECT id, deployment, node, state, started FROM instances"
        args: tuple[str, ...] = ()
        if live_only:
            query += f" WHERE state IN ({','.join('?' * len(LIVE_STATES))})"
            args = LIVE_STATES
        with self._tx() as db:
            rows = db.execute(query + " ORDER BY started, id", args).fetchall()
        return [InstanceRecord(*row) for row in rows]

    # -- loads ------------------------------------------------------------------------

    def add_load(self, rec: LoadRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO loads (instance, model, node, tier, nbytes, estimated_s, actual_s, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                tuple(asdict(rec).values()),
            )

    def loads(self, limit: int = 100) -> list[LoadRecord]:
        """The most recent loads, oldest first."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT instance, model, node, tier, nbytes, estimated_s, actual_s, finished FROM loads "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [LoadRecord(*row) for row in reversed(rows)]
