"""Registry starts over HTTP: chunks downloaded into the DRAM pool in need order and
served as they arrive, the disk copy written behind, and the failures: a corrupt
chunk, a registry killed mid-download, a crash before the disk copy is published,
two starts of one model sharing one download."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ember.store.write_behind as write_behind
from ember.bench.registry_server import serve_registry
from ember.errors import RegistryError, RegistryUnavailableError
from ember.store import read_index, save_tensors, verify_checkpoint
from ember.store.http_source import HttpSource
from ember.store.node import NodeStore
from ember.store.registry import DirectorySource, HttpRegistry
from ember.store.registry_server import RegistryServer
from ember.store.registry_stream import plan_ranges
from ember.store.transfer import StreamSettings, copy_checkpoint, partial_dir
from tests.store.conftest import MIB, assert_same_tensors

pytestmark = pytest.mark.timeout(60)

CHUNK = 8 * MIB  # the index's checksum chunk
NAMES = (  # file order deliberately unlike a forward pass's
    "lm_head.weight",
    "model.layers.1.mlp.weight",
    "model.norm.weight",
    "model.layers.0.mlp.weight",
    "model.embed_tokens.weight",
)
FORWARD = NAMES[4], NAMES[3], NAMES[1]  # embeddings, layer 0, layer 1; then the head and norm
BOTH_PATHS = pytest.mark.parametrize("direct", [True, False], ids=["into-buffer", "httpx"])
ONE_AT_A_TIME = StreamSettings(connections=1, range_bytes=CHUNK, retries=2, backoff_s=0.0)

Piece = Callable[[str, int, bytes], bytes]  # (file, range start, piece) -> piece to deliver


def _layered(path: Path) -> dict[str, torch.Tensor]:
    """One checksum chunk per tensor, written in NAMES' order, and a config file."""
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(CHUNK // 4, generator=gen) for name in NAMES}
    save_tensors(tensors, path, files={"model/config.json": b"{}"})
    return tensors


class _Source(HttpSource):
    """An HttpSource that records each range asked for, may hold it at a gate, and may
    alter the bytes it delivers (into the buffer, or as httpx pieces)."""

    def __init__(self, base: HttpSource, registry: TestRegistry) -> None:
        super().__init__(base.client, base.location, base.ranges if registry.direct else None)
        self.registry = registry

    def _asked(self, start: int) -> None:
        reg = self.registry
        with reg.lock:
            reg.ranges.append(start)
            held = len(reg.ranges) > reg.free_ranges
        if held:
            assert reg.gate.wait(30), "the test never opened the gate"

    def read_range_into(self, rel: str, start: int, total: int, out: memoryview) -> Iterator[int]:
        if self.ranges is None:  # through httpx: read_range below records and alters
            yield from super().read_range_into(rel, start, total, out)
            return
        self._asked(start)
        at = 0
        for n in super().read_range_into(rel, start, total, out):
            landed = bytes(out[at : at + n])
            out[at : at + n] = self.registry.alter(rel, start, landed)
            at += n
            yield n

    def read_range(self, rel: str, start: int, length: int, total: int) -> Generator[bytes]:
        self._asked(start)
        for piece in super().read_range(rel, start, length, total):
            yield self.registry.alter(rel, start, piece)


class TestRegistry(HttpRegistry):
    """An HttpRegistry whose ranges are recorded (by start offset), and held at `gate`
    after the first `free_ranges` while it is clear. `direct`: ranges are read straight
    into the buffer (RangeReader), else through httpx."""

    __test__ = False

    def __init__(
        self,
        url: str,
        settings: StreamSettings = ONE_AT_A_TIME,
        free_ranges: int = 1 << 30,
        direct: bool = True,
    ) -> None:
        super().__init__(url, stream=settings, backoff_s=0.0)
        self.ranges: list[int] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.free_ranges = free_ranges
        self.direct = direct
        self.alter: Piece = lambda rel, start, piece: piece

    def _source(self, name: str) -> HttpSource:
        return _Source(super()._source(name), self)


@contextmanager
def _registry(root: Path, **kwargs: object) -> Iterator[TestRegistry]:
    with RegistryServer(root) as server, TestRegistry(server.url, **kwargs) as registry:  # type: ignore[arg-type]
        yield registry


def _offsets(path: Path) -> dict[int, str]:
    index = read_index(path)
    return {index.tensors[n].offset: n for n in NAMES}


def test_ranges_are_planned_in_need_order(tmp_path: Path) -> None:
    _layered(tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    by_offset = _offsets(tmp_path / "ck")
    ranges = plan_ranges(index, [0], CHUNK)
    assert [by_offset[r.first * CHUNK] for r in ranges][:3] == list(FORWARD)
    assert len(plan_ranges(index, [0], 5 * CHUNK)) == len(NAMES)  # no neighbours in need order
    gen = torch.Generator().manual_seed(0)
    in_order = {n: torch.randn(CHUNK // 4, generator=gen) for n in (*FORWARD, NAMES[2], NAMES[0])}
    save_tensors(in_order, tmp_path / "forward")  # written as a forward pass reads it
    joined = plan_ranges(read_index(tmp_path / "forward"), [0], 3 * CHUNK)
    assert [(r.first, r.end) for r in joined] == [(0, 3), (3, 5)]


def test_ranges_shrink_toward_the_end_so_none_finishes_with_the_last_byte(tmp_path: Path) -> None:
    """Ranges in flight share the link: each holds at most 1/(connections + 1) of the
    chunks left from its start, so the last byte does not wait on a long range that
    holds earlier layers. One connection keeps whole ranges."""
    layers = {f"model.layers.{i}.w": torch.zeros(2 * CHUNK // 4) for i in range(12)}  # 24 chunks
    save_tensors(layers, tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    assert [r.end - r.first for r in plan_ranges(index, [0], 4 * CHUNK)] == [4] * 6
    ranges = plan_ranges(index, [0], 4 * CHUNK, connections=3)
    assert [(r.first, r.end) for r in ranges][:2] == [(0, 4), (4, 8)]
    assert [r.end - r.first for r in ranges] == [4, 4, 4, 3, 2, 1, 1, 1, 1, 1, 1, 1]
    assert [k for r in ranges for k in range(r.first, r.end)] == list(range(24))  # each chunk once, in order
    left = 24
    for r in ranges:
        assert r.end - r.first <= max(1, left // 4)
        left -= r.end - r.first


@BOTH_PATHS
def test_a_start_serves_its_first_layers_while_later_ranges_are_held(tmp_path: Path, direct: bool) -> None:
    want = _layered(tmp_path / "reg" / "m")
    with _registry(tmp_path / "reg", free_ranges=2, direct=direct) as registry:
        node = NodeStore("n1", registry=registry)
        lease, path, report = node.acquire("m", stream=True)
        assert report.tier == "registry" and lease.loading is not None
        assert (path / "model" / "config.json").read_bytes() == b"{}"  # the engine's files, at once
        first = [lease.tensors[n] for n in FORWARD[:2]]
        lease.loading.wait_for(first)  # embeddings and layer 0 arrive although the rest is held
        for name in FORWARD[:2]:
            assert torch.equal(lease.tensors[name], want[name])
        assert not lease.loading.complete and node.disk.path("m") is None
        with pytest.raises(TimeoutError):
            lease.loading.wait(timeout=0.01)
        registry.gate.set()
        lease.loading.wait()
        assert_same_tensors(lease.tensors, want)
        by_offset = _offsets(tmp_path / "reg" / "m")
        assert [by_offset[s] for s in registry.ranges][:3] == list(FORWARD)
        assert node.settle("m") is None
        disk = node.root / "disk" / "m"
        verify_checkpoint(disk)
        for f in ("part-00000.bin", "index.json", "model/config.json"):
            assert (disk / f).read_bytes() == (tmp_path / "reg" / "m" / f).read_bytes()
        assert node.holds("m") == {"dram", "disk"}
        lease.release()


@BOTH_PATHS
def test_a_corrupt_chunk_is_fetched_again(tmp_path: Path, direct: bool) -> None:
    want = _layered(tmp_path / "reg" / "m")
    head = read_index(tmp_path / "reg" / "m").tensors["lm_head.weight"].offset
    with _registry(tmp_path / "reg", direct=direct) as registry:
        bad_once = {head}

        def flip_once(rel: str, start: int, piece: bytes) -> bytes:
            if start in bad_once:
                bad_once.discard(start)
                return bytes([piece[0] ^ 0xFF]) + piece[1:]
            return piece

        registry.alter = flip_once
        node = NodeStore("n1", registry=registry)
        with node.acquire("m")[0] as lease:
            assert_same_tensors(lease.tensors, want)
        assert registry.ranges.count(head) == 2
        assert node.settle("m") is None
        verify_checkpoint(node.root / "disk" / "m")


def test_a_chunk_corrupt_on_every_try_fails_the_load_and_leaves_nothing(tmp_path: Path) -> None:
    _layered(tmp_path / "reg" / "m")
    head = read_index(tmp_path / "reg" / "m").tensors["lm_head.weight"].offset
    with _registry(tmp_path / "reg") as registry:
        registry.alter = lambda rel, start, piece: b"\0" * len(piece) if start == head else piece
        node = NodeStore("n1", registry=registry)
        lease, _, _ = node.acquire("m", stream=True)
        assert lease.loading is not None
        with pytest.raises(RegistryError, match=r"checksum mismatch in part-00000.bin .* after 3 tries"):
            lease.loading.wait()
        lease.release()
        assert registry.ranges.count(head) == 3  # the first try and chunk_retries=2 more
        assert isinstance(node.settle("m"), RegistryError)
    assert "m" not in node.pool and node.holds("m") == set()
    assert not partial_dir(node.root / "disk" / "m").exists()  # wrong bytes: nothing to resume


@BOTH_PATHS
def test_a_registry_killed_mid_download_fails_the_load_cleanly(tmp_path: Path, direct: bool) -> None:
    want = _layered(tmp_path / "reg" / "m")
    with serve_registry(tmp_path / "reg") as url:
        registry = TestRegistry(url, free_ranges=1, direct=direct)
        node = NodeStore("n1", registry=registry)
        lease, _, _ = node.acquire("m", stream=True)
        assert lease.loading is not None
        lease.loading.wait_for([lease.tensors[FORWARD[0]]])
    # the registry's process is gone; the held ranges now meet a closed port
    registry.gate.set()
    with pytest.raises(RegistryUnavailableError):
        lease.loading.wait()
    lease.release()
    assert isinstance(node.settle("m"), RegistryUnavailableError)
    assert "m" not in node.pool and node.holds("m") == set()  # nothing published, nothing leased
    assert (partial_dir(node.root / "disk" / "m") / "index.json").is_file()  # resumable
    with serve_registry(tmp_path / "reg") as url, TestRegistry(url) as back:
        node.registry = back
        with node.acquire("m")[0] as again:
            assert_same_tensors(again.tensors, want)
        assert node.settle("m") is None
        # the chunk the first download verified came from its partial, not the wire
        assert 0 < len(back.ranges) < len(NAMES)
        assert set(back.ranges).isdisjoint(registry.ranges[:1])
    verify_checkpoint(node.root / "disk" / "m")
    registry.close()


def test_a_start_reads_the_verified_chunks_of_a_partial_and_downloads_the_rest(tmp_path: Path) -> None:
    want = _layered(tmp_path / "reg" / "m")
    index = read_index(tmp_path / "reg" / "m")
    node = NodeStore("n1")
    partial = partial_dir(node.root / "disk" / "m")
    partial.mkdir(parents=True)
    (partial / "index.json").write_text((tmp_path / "reg" / "m" / "index.json").read_text())
    part = index.partitions[0]
    data = bytearray((tmp_path / "reg" / "m" / part.file).read_bytes()[: 3 * CHUNK])
    data[CHUNK + 5] ^= 0xFF  # the second chunk on disk is damaged: it must come again
    (partial / part.file).write_bytes(bytes(data))
    with _registry(tmp_path / "reg") as registry:
        node.registry = registry
        with node.acquire("m", stream=True)[0] as lease:
            assert lease.loading is not None
            lease.loading.wait()
            assert_same_tensors(lease.tensors, want)
        assert node.settle("m") is None
        assert sorted(registry.ranges) == [k * CHUNK for k in range(1, len(NAMES)) if k != 2]
    verify_checkpoint(node.root / "disk" / "m")


class _Recording(DirectorySource):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ranges: list[int] = []

    def read_range(self, rel: str, start: int, length: int, total: int) -> Generator[bytes]:
        self.ranges.append(start)
        return super().read_range(rel, start, length, total)


def test_a_crash_before_the_disk_publish_leaves_a_resumable_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _layered(tmp_path / "reg" / "m")

    def crash(partial: Path, final: Path) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(write_behind, "publish_partial", crash)
    with _registry(tmp_path / "reg") as registry:
        node = NodeStore("n1", registry=registry)
        with node.acquire("m")[0] as lease:  # the DRAM copy serves regardless
            assert_same_tensors(lease.tensors, want)
        assert isinstance(node.settle("m"), OSError)
    final = node.root / "disk" / "m"
    assert node.disk.path("m") is None and not final.exists()
    assert partial_dir(final).is_dir()
    monkeypatch.undo()
    source = _Recording(tmp_path / "reg" / "m")
    copy_checkpoint(source, final)  # a fetch resumes it: every chunk is there already
    assert source.ranges == []
    verify_checkpoint(final)


def test_concurrent_starts_share_one_download(tmp_path: Path) -> None:
    want = _layered(tmp_path / "reg" / "m")
    settings = StreamSettings(connections=2, range_bytes=CHUNK, backoff_s=0.0)
    with _registry(tmp_path / "reg", settings=settings, free_ranges=0) as registry:
        node = NodeStore("n1", registry=registry)
        leases = []
        started = threading.Barrier(3)

        def start() -> None:
            started.wait()
            leases.append(node.acquire("m", stream=True)[0])

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        started.wait()
        for t in threads:
            t.join(30)
        assert len(leases) == 2 and leases[0].tensors["lm_head.weight"].data_ptr() == (
            leases[1].tensors["lm_head.weight"].data_ptr()
        )
        registry.gate.set()
        for lease in leases:
            assert lease.loading is not None
            lease.loading.wait()
            assert_same_tensors(lease.tensors, want)
            lease.release()
        assert sorted(registry.ranges) == sorted(_offsets(tmp_path / "reg" / "m"))  # each chunk once
        assert node.settle("m") is None
