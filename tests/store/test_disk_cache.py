"""DiskCache: fetch once, LRU eviction within the budget, entries being read stay."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ember.errors import StorageFullError
from ember.store import load_tensors
from ember.store.catalog import Catalog
from ember.store.disk_cache import DiskCache
from ember.store.registry import DirectoryRegistry
from ember.store.transfer import Progress
from tests.store.conftest import MIB, assert_same_tensors, write_checkpoint

pytestmark = pytest.mark.timeout(60)


class CountingRegistry(DirectoryRegistry):
    """A directory registry that counts fetches and can hold them at a barrier."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetches: list[str] = []
        self.lock = threading.Lock()

    def fetch(self, name: str, dest: Path, *, progress: Progress | None = None) -> Path:
        with self.lock:
            self.fetches.append(name)
        return super().fetch(name, dest, progress=progress)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def registry(tmp_path: Path) -> CountingRegistry:
    for i, name in enumerate(["a", "b", "c", "d"]):
        write_checkpoint(tmp_path / "reg" / name, mib=1, seed=i)
    return CountingRegistry(tmp_path / "reg")


def _cache(tmp_path: Path, budget: int, clock: Clock | None = None) -> DiskCache:
    catalog = Catalog(tmp_path / "catalog.db")
    return DiskCache(tmp_path / "node" / "disk", budget, catalog=catalog, node="n1", clock=clock or Clock())


def test_fetch_once_then_serve_from_disk(tmp_path: Path, registry: CountingRegistry) -> None:
    cache = _cache(tmp_path, 100 * MIB)
    assert cache.path("a") is None
    out = cache.fetch("a", registry)
    assert out == tmp_path / "node" / "disk" / "a" == cache.path("a")
    assert cache.fetch("a", registry) == out
    assert registry.fetches == ["a"]
    assert cache.names() == ["a"]
    assert_same_tensors(load_tensors(out), load_tensors(tmp_path / "reg" / "a"))
    [loc] = cache.catalog.locations("a")
    assert (loc.node, loc.tier, loc.size) == ("n1", "disk", registry.size("a"))


def test_least_recently_used_goes_first(tmp_path: Path, registry: CountingRegistry) -> None:
    size = registry.size("a")
    cache = _cache(tmp_path, 3 * size)
    for name in "abc":
        cache.fetch(name, registry)
    with cache.reading("a") as path:  # a read counts as a use: b is now the oldest
        assert path is not None
    cache.fetch("d", registry)
    assert cache.names() == ["a", "c", "d"]
    assert cache.used_bytes() <= 3 * size
    assert [loc.name for loc in cache.catalog.locations(tier="disk")] == ["a", "c", "d"]


def test_last_use_survives_a_restart(tmp_path: Path, registry: CountingRegistry) -> None:
    clock = Clock()
    size = registry.size("a")
    first = _cache(tmp_path, 2 * size, clock)
    first.fetch("a", registry)
    first.fetch("b", registry)
    first.fetch("a", registry)  # a hit: a is newer than b now
    again = _cache(tmp_path, 2 * size, clock)
    again.fetch("c", registry)
    assert again.names() == ["a", "c"]


def test_an_entry_being_read_is_not_evicted(tmp_path: Path, registry: CountingRegistry) -> None:
    size = registry.size("a")
    cache = _cache(tmp_path, 2 * size)
    cache.fetch("a", registry)
    cache.fetch("b", registry)
    with cache.reading("a") as path:
        assert path is not None
        cache.fetch("b", registry)  # b is newest: a would be the one to go
        assert not cache.evict("a")
        cache.fetch("c", registry)  # a is being read, so b goes
        assert (path / "index.json").is_file()
    assert cache.names() == ["a", "c"]
    assert cache.evict("a") and cache.names() == ["c"]
    with cache.reading("a") as gone:
        assert gone is None


def test_a_corrupt_entry_goes_even_while_read(tmp_path: Path, registry: CountingRegistry) -> None:
    """A copy that failed its checksums must not serve the next start, however many
    starts are still reading it: the next one refetches."""
    cache = _cache(tmp_path, 4 * registry.size("a"))
    cache.fetch("a", registry)
    with cache.reading("a") as path:
        assert path is not None
        index = (path / "index.json").open()  # a reader keeps what it opened
        assert not cache.evict("a")
        assert cache.evict("a", corrupt=True)
        assert index.read()
        index.close()
    assert cache.names() == []
    with cache.reading("a") as gone:
        assert gone is None


def test_bigger_than_the_budget_is_refused(tmp_path: Path, registry: CountingRegistry) -> None:
    cache = _cache(tmp_path, registry.size("a") - 1)
    with pytest.raises(StorageFullError, match="larger than the disk cache budget"):
        cache.fetch("a", registry)
    assert cache.names() == [] and registry.fetches == []


def test_concurrent_fetches_of_one_name_download_it_once(tmp_path: Path, registry: CountingRegistry) -> None:
    cache = _cache(tmp_path, 100 * MIB)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(cache.fetch("a", registry))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths == [cache.root / "a"] * 4
    assert registry.fetches == ["a"]
    assert_same_tensors(load_tensors(paths[0], verify=True), load_tensors(tmp_path / "reg" / "a"))
