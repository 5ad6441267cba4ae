"""NodeStore: acquire from the nearest tier, DRAM hits without I/O, the catalogue."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

import ember.store.node as node_module
from ember.errors import CheckpointNotFoundError, CorruptCheckpointError
from ember.store import verify_checkpoint
from ember.store.local import LocalStore
from ember.store.node import NodeStore, _copy_to_device
from ember.store.registry import DirectoryRegistry, HttpRegistry
from tests.store.conftest import MIB, assert_same_tensors, write_checkpoint
from tests.store.nginx_server import NginxServer

pytestmark = pytest.mark.timeout(60)


def _stored(name: str, *, mib: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    local = LocalStore()
    tensors = write_checkpoint(local.path_for(name), mib=mib, seed=seed)
    local.register(name)
    return tensors


def _tiers(node: NodeStore, name: str) -> set[str]:
    return {loc.tier for loc in node.catalog.locations(name, node=node.node_id)}


def test_store_then_dram_hit_without_io(monkeypatch: pytest.MonkeyPatch) -> None:
    want = _stored("m")
    node = NodeStore("n1")
    lease, path, report = node.acquire("m")
    assert (report.name, report.tier) == ("m", "store")
    assert path == LocalStore().path_for("m")
    assert report.nbytes > MIB and report.seconds >= 0
    assert_same_tensors(lease.tensors, want)
    assert node.holds("m") == {"dram", "store"} and _tiers(node, "m") == {"dram"}
    first_ptr = lease.tensors["big"].data_ptr()
    lease.release()

    shutil.rmtree(path)  # the files are gone: only the DRAM copy can serve the next acquire

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a DRAM hit must not read the checkpoint")

    monkeypatch.setattr(node_module, "load_tensors", no_load)
    with node.acquire("m")[0] as again:
        assert again.tensors["big"].data_ptr() == first_ptr
        assert again.tensors["embed"].data_ptr() == again.tensors["lm_head"].data_ptr()
        assert_same_tensors(again.tensors, want)
    assert node.acquire("m")[2].tier == "dram"


def test_registry_to_disk_to_dram(tmp_path: Path) -> None:
    want = write_checkpoint(tmp_path / "reg" / "r", mib=2)
    node = NodeStore("n1", registry=DirectoryRegistry(tmp_path / "reg"))
    seen: list[tuple[int, int]] = []
    lease, path, report = node.acquire("r", progress=lambda d, t: seen.append((d, t)))
    assert report.tier == "registry" and seen[-1][0] == seen[-1][1]
    assert path.name == "r" and (path / "model" / "config.json").read_bytes() == b'{"seed": 0}'
    assert_same_tensors(lease.tensors, want)
    assert node.settle("r") is None  # the disk copy, written behind the download
    assert node.holds("r") == {"dram", "disk"} == _tiers(node, "r")
    lease.release()
    assert node.evict("r") and node.holds("r") == {"disk"} == _tiers(node, "r")
    with node.acquire("r")[0] as again:
        assert_same_tensors(again.tensors, want)
    assert node.acquire("r")[2].tier == "dram"
    other = NodeStore("n2", registry=DirectoryRegistry(tmp_path / "reg"))
    assert other.holds("r") == set()


def test_dram_budget_evicts_the_least_recently_used() -> None:
    _stored("a", seed=1)
    _stored("b", seed=2)
    node = NodeStore("n1", dram_budget=6 * MIB)  # one checkpoint (about 4 MiB) fits, not two
    held, _, _ = node.acquire("a")
    node.acquire("b")[0].release()  # over budget while a is held: b goes once released
    assert node.holds("a") == {"dram", "store"} and node.holds("b") == {"store"}
    held.release()
    node.acquire("b")[0].release()
    assert node.holds("a") == {"store"} and _tiers(node, "a") == set()
    assert _tiers(node, "b") == {"dram"}


def test_concurrent_acquires_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _stored("m")
    loads: list[Path] = []
    real = node_module.load_tensors

    def counting(path: Path, **kwargs: object) -> dict[str, torch.Tensor]:
        loads.append(path)
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node_module, "load_tensors", counting)
    node = NodeStore("n1")
    ptrs: list[int] = []

    def acquire() -> None:
        with node.acquire("m")[0] as lease:
            ptrs.append(lease.tensors["big"].data_ptr())

    threads = [threading.Thread(target=acquire) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(set(ptrs)) == 1 and len(ptrs) == 4


def test_missing_everywhere(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no registry is configured"):
        NodeStore("n1").acquire("ghost")
    node = NodeStore("n1", registry=DirectoryRegistry(tmp_path / "reg"))
    with pytest.raises(CheckpointNotFoundError, match="'ghost' is not in the registry"):
        node.acquire("ghost")
    assert node.holds("ghost") == set() and node.disk.names() == []


def test_corrupt_store_copy_is_caught_on_the_way_to_dram() -> None:
    _stored("m")
    with open(LocalStore().path_for("m") / "part-00000.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    node = NodeStore("n1")
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        node.acquire("m")
    assert node.holds("m") == {"store"}


def test_fetch_through_nginx(nginx: NginxServer, tmp_path: Path) -> None:
    want = write_checkpoint(nginx.root / "reg" / "web", mib=2)
    with HttpRegistry(f"{nginx.url}/reg") as registry:
        node = NodeStore("n1", registry=registry)
        with node.acquire("web")[0] as lease:
            assert_same_tensors(lease.tensors, want)
        assert node.settle("web") is None
    assert node.holds("web") == {"dram", "disk"}
    verify_checkpoint(node.root / "disk" / "web")


def test_device_copy_keeps_tied_tensors_tied() -> None:
    _stored("m")
    node = NodeStore("n1")
    lease, _, _ = node.acquire("m")
    host_ptr = lease.tensors["embed"].data_ptr()
    copied = _copy_to_device(lease, torch.device("cpu"))
    assert lease.released and node.pool.refs("m") == 0 and "m" in node.pool
    assert copied.tensors["embed"].data_ptr() == copied.tensors["lm_head"].data_ptr() != host_ptr
    assert torch.equal(copied.tensors["lm_head"], node.acquire("m")[0].tensors["lm_head"])


def test_checkpoint_bigger_than_dram_lives_only_while_leased() -> None:
    want = _stored("m")
    node = NodeStore("n1", dram_budget=MIB)
    with node.acquire("m")[0] as lease:
        assert_same_tensors(lease.tensors, want)
        assert node.holds("m") == {"dram", "store"}
    assert node.holds("m") == {"store"} and _tiers(node, "m") == set()


def test_a_restarted_node_forgets_its_old_dram_rows() -> None:
    _stored("m")
    NodeStore("n1").acquire("m")
    restarted = NodeStore("n1")
    assert restarted.holds("m") == {"store"} and _tiers(restarted, "m") == set()


def test_a_load_into_dram_parses_the_index_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ember.store.format as format_module
    import ember.store.loader as loader_module

    want = _stored("m")
    calls: list[Path] = []
    real = format_module.read_index

    def counting(path: str | Path) -> format_module.CheckpointIndex:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(node_module, "read_index", counting)
    monkeypatch.setattr(loader_module, "read_index", counting)
    node = NodeStore("n1")
    with node.acquire("m")[0] as lease:
        assert_same_tensors(lease.tensors, want)
    assert calls == [LocalStore().path_for("m")]


def test_a_streaming_acquire_returns_before_its_bytes_and_records_dram_after(
    tmp_path: Path, held_reads: threading.Event
) -> None:
    want = write_checkpoint(tmp_path / "reg" / "r", mib=20)
    node = NodeStore("n1", registry=DirectoryRegistry(tmp_path / "reg"))
    node.acquire("r")[0].release()  # registry -> DRAM, and disk behind it
    assert node.settle("r") is None and node.evict("r")
    held_reads.clear()
    lease, _, report = node.acquire("r", stream=True)
    assert report.tier == "disk" and report.loading is lease.loading is not None
    assert _tiers(node, "r") == {"disk"}  # not in DRAM until every byte is in
    held_reads.set()
    lease.loading.wait()
    assert_same_tensors(lease.tensors, want)
    assert _tiers(node, "r") == {"dram", "disk"}  # recorded once every byte was in
    with node.acquire("r")[0] as hit:  # a later acquire: a plain DRAM hit
        assert hit.loading is None and hit.tensors["big"].data_ptr() == lease.tensors["big"].data_ptr()
    lease.release()


def test_a_corrupt_streamed_copy_leaves_the_pool_and_the_disk_cache(
    tmp_path: Path, held_reads: threading.Event
) -> None:
    want = write_checkpoint(tmp_path / "reg" / "r", mib=20)
    node = NodeStore("n1", registry=DirectoryRegistry(tmp_path / "reg"))
    node.acquire("r")[0].release()
    assert node.settle("r") is None and node.evict("r")
    part = node.root / "disk" / "r" / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[-100] ^= 0xFF
    part.write_bytes(bytes(data))
    held_reads.clear()
    lease, _, _ = node.acquire("r", stream=True)
    assert lease.loading is not None
    held_reads.set()
    with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
        lease.loading.wait()
    assert "r" not in node.pool
    assert _tiers(node, "r") == set() and node.holds("r") == set()  # the bad copy left the disk cache
    lease.release()
    with node.acquire("r")[0] as again:  # so the next acquire fetches a good one
        assert_same_tensors(again.tensors, want)
