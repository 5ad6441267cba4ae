"""The control plane's durable state, in SQLite at `$EMBER_HOME/cluster.db`.

deployments: name -> model and scaling policy; they survive restarts
instances:   every instance ever started, with its node and state; instances left
             live by an earlier process died with it and are marked dead on open
loads:       estimated vs actual start-up time of every load, by tier
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.cluster.messages import LIVE_STATES, InstanceState
from ember.db import SqliteDb
from ember.env import ember_home
from ember.errors import InvalidRequestError, ModelNotFoundError

DEFAULT_MIN_INSTANCES = 0
DEFAULT_MAX_INSTANCES = 4
DEFAULT_TARGET_CONCURRENCY = 16  # requests in flight per instance before another starts
DEFAULT_KEEP_ALIVE_S = 120.0  # an idle instance above min_instances goes after this long

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

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
    """A model served under `name`, with its scaling policy (validated on creation)."""

    name: str
    model: str
    min_instances: int = DEFAULT_MIN_INSTANCES
    max_instances: int = DEFAULT_MAX_INSTANCES
    target_concurrency: int = DEFAULT_TARGET_CONCURRENCY
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidRequestError(
                f"invalid deployment name {self.name!r}: letters, digits, '.', '_', '-'", param="name"
            )
        if not self.model:
            raise InvalidRequestError("a deployment needs a model", param="model")
        if self.min_instances < 0:
            raise InvalidRequestError("min_instances must be >= 0", param="min_instances")
        if self.max_instances < max(1, self.min_instances):
            raise InvalidRequestError(
                f"max_instances must be >= 1 and >= min_instances ({self.min_instances})",
                param="max_instances",
            )
        if self.target_concurrency < 1:
            raise InvalidRequestError("target_concurrency must be >= 1", param="target_concurrency")
        if self.keep_alive_s < 0:
            raise InvalidRequestError("keep_alive_s must be >= 0", param="keep_alive_s")


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
        self._tx = self._db.tx
        with self._tx() as db:
            marks = ",".join("?" * len(LIVE_STATES))
            db.execute(f"UPDATE instances SET state = 'dead' WHERE state IN ({marks})", LIVE_STATES)

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
        with self._tx() as db:
            rows = db.execute(
                "SELECT name, model, min_instances, max_instances, target_concurrency, keep_alive_s "
                "FROM deployments ORDER BY created, name"
            ).fetchall()
        return [Deployment(*row) for row in rows]

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
