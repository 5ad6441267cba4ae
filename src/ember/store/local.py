"""LocalStore: the source copies of checkpoints, `$EMBER_HOME/store/<name>/`, and the
catalogue that names them. Checkpoints here are never evicted."""

from __future__ import annotations

from pathlib import Path

from ember.env import ember_home
from ember.errors import CheckpointNotFoundError
from ember.store.catalog import Catalog, CheckpointRecord, check_name
from ember.store.checksum import digest
from ember.store.format import INDEX_FILE, read_index
from ember.store.scratch import discard, remove_orphans

STORE_DIR = "store"
CATALOG_FILE = "catalog.db"


def is_store_root(path: Path) -> bool:
    """Whether `path` is a LocalStore's directory of checkpoints (`<home>/store`)."""
    return path.name == STORE_DIR and (path.parent / CATALOG_FILE).is_file()


class LocalStore:
    """The store under `home` (default EMBER_HOME). Opening it removes what killed
    imports and removals left behind (see ember.store.scratch); partial downloads stay."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else ember_home()
        self.root = self.home / STORE_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.home / CATALOG_FILE)
        self.cleaned = remove_orphans(self.root)  # what killed processes left, removed now

    def path_for(self, name: str) -> Path:
        """Where a checkpoint of this name lives (or will live) in the store."""
        return self.root / check_name(name)

    def register(self, name: str, source: str = "") -> CheckpointRecord:
        """Record a checkpoint already published at path_for(name) in the catalogue."""
        path = self.path_for(name)
        index = read_index(path)
        return self.catalog.add(
            name, path, index.total_bytes, digest((path / INDEX_FILE).read_bytes()), source
        )

    def resolve(self, name_or_path: str | Path) -> Path:
        """A checkpoint directory from a store name or a path to a checkpoint."""
        as_path = Path(name_or_path).expanduser()
        if (as_path / INDEX_FILE).is_file():
            return as_path
        rec = self.catalog.find(str(name_or_path))
        if rec is not None:
            return Path(rec.path)
        raise CheckpointNotFoundError(
            f"{name_or_path!s} is neither a checkpoint in the store nor a checkpoint directory "
            "(see `ember store ls`)"
        )

    def remove(self, name: str) -> CheckpointRecord:
        rec = self.catalog.remove(name)
        discard(Path(rec.path))
        return rec

    def list(self) -> list[CheckpointRecord]:
        return self.catalog.all()

    def exists(self, name: str) -> bool:
        return self.catalog.find(name) is not None

    def require(self, name: str) -> CheckpointRecord:
        rec = self.catalog.find(name)
        if rec is None:
            raise CheckpointNotFoundError(f"no checkpoint named {name!r} in the store")
        return rec
