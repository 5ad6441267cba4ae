"""RegistryServer: a directory of checkpoints over HTTP that HttpRegistry fetches
from with parallel ranged reads; nothing outside the directory or the secret prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.errors import CheckpointNotFoundError, RegistryError
from ember.store import load_tensors
from ember.store.registry import DirectoryRegistry, HttpRegistry
from ember.store.registry_server import Link, RegistryServer
from tests.store.conftest import assert_same_tensors, write_checkpoint

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegistryServer]:
    (tmp_path / "secret.txt").write_text("not for the nodes")
    with RegistryServer(tmp_path / "store") as srv:
        yield srv


def test_a_node_fetches_a_checkpoint_in_ranges_and_gets_the_same_tensors(
    server: RegistryServer, tmp_path: Path
) -> None:
    want = write_checkpoint(server.root / "m", mib=3, seed=3, partition_mib=1)
    with HttpRegistry(server.url, range_bytes=256 << 10) as registry:
        assert registry.exists("m") and not registry.exists("other")
        assert registry.size("m") > 3 << 20
        dest = registry.fetch("m", tmp_path / "copy")
        with pytest.raises(CheckpointNotFoundError):
            registry.fetch("other", tmp_path / "none")
    assert_same_tensors(load_tensors(dest), want)


def test_a_range_is_answered_with_exactly_those_bytes(server: RegistryServer) -> None:
    server.root.mkdir(parents=True)
    (server.root / "f.bin").write_bytes(bytes(range(256)))
    got = httpx.get(f"{server.url}/f.bin", headers={"Range": "bytes=10-19"})
    assert got.status_code == 206 and got.content == bytes(range(10, 20))
    assert got.headers["content-range"] == "bytes 10-19/256"
    assert httpx.get(f"{server.url}/f.bin", headers={"Range": "bytes=300-"}).status_code == 416


def test_nothing_outside_the_directory_or_without_the_secret_is_served(server: RegistryServer) -> None:
    server.root.mkdir(parents=True)
    (server.root / "f.bin").write_bytes(b"x")
    base = server.url.rsplit("/", 1)[0]
    assert httpx.get(f"{base}/wrong-secret/f.bin").status_code == 404
    assert httpx.get(f"{server.url}/%2E%2E/secret.txt").status_code == 404
    assert httpx.get(f"{server.url}/f.bin").content == b"x"


def test_model_files_are_read_alone_and_checked_without_fetching_the_weights(
    server: RegistryServer, tmp_path: Path
) -> None:
    write_checkpoint(server.root / "m", seed=3)
    with HttpRegistry(server.url) as http:
        registries = [http, DirectoryRegistry(server.root)]
        for registry in registries:
            assert registry.read_files("m", prefix="model/") == {"model/config.json": b'{"seed": 3}'}
            assert registry.read_files("m", prefix="tokenizer/") == {}
        (server.root / "m" / "model" / "config.json").write_bytes(b'{"seed": 4}')  # same size
        for registry in registries:
            with pytest.raises(RegistryError, match="checksum mismatch"):
                registry.read_files("m", prefix="model/")
            with pytest.raises(CheckpointNotFoundError):
                registry.read_files("other")


def test_a_store_served_to_the_nodes_calls_itself_the_store_when_a_checkpoint_is_missing(
    server: RegistryServer,
) -> None:
    """Ray mode serves the head's store when no --registry is given: a missing model is
    "not in the store", as embedded, with no URL of the server's in the message."""
    missing = CheckpointNotFoundError
    with HttpRegistry(server.url, described="the store") as store, pytest.raises(missing) as caught:
        store.size("ghost")
    assert caught.value.public.startswith("checkpoint 'ghost' is not in the store")
    assert "http" not in caught.value.public
    with HttpRegistry(server.url) as registry, pytest.raises(missing, match="not in the registry"):
        registry.size("ghost")


def test_a_link_books_each_send_after_the_last_and_waits_until_its_bytes_crossed() -> None:
    now, slept = [10.0], []
    link = Link(100.0, clock=lambda: now[0], sleep=slept.append)
    link.book(50)  # 0.5 s on an idle link
    link.book(100)  # after the first: done 1.5 s from now
    now[0] = 20.0  # the link went idle meanwhile: no backlog carried over
    link.book(10)
    assert slept == pytest.approx([0.5, 1.5, 0.1])
    with pytest.raises(ValueError, match="positive"):
        Link(0)


def test_a_server_behind_a_link_serves_the_same_bytes_in_pieces(tmp_path: Path) -> None:
    want = write_checkpoint(tmp_path / "store" / "m", mib=2, seed=4, partition_mib=1)
    with (
        RegistryServer(tmp_path / "store", link_bps=1e9) as server,
        HttpRegistry(server.url, range_bytes=768 << 10) as registry,  # ranges of 3 link pieces
    ):
        dest = registry.fetch("m", tmp_path / "copy")
    assert_same_tensors(load_tensors(dest), want)
