"""copy_checkpoint: what a resume trusts from a partial copy, and what it refetches."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from ember.errors import CheckpointExistsError
from ember.store import load_tensors, read_index
from ember.store.registry import DirectorySource
from ember.store.transfer import copy_checkpoint, partial_dir
from tests.store.conftest import MIB, assert_same_tensors, write_checkpoint

pytestmark = pytest.mark.timeout(60)


class RecordingSource(DirectorySource):
    """A directory source that records every range it is asked for."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ranges: list[tuple[str, int, int]] = []

    def read_range(self, rel: str, start: int, length: int, total: int) -> Generator[bytes]:
        self.ranges.append((rel, start, length))
        return super().read_range(rel, start, length, total)


class Stop(Exception):
    pass


def _interrupt(src: Path, dest: Path, after_bytes: int) -> None:
    def stop(done: int, total: int) -> None:
        if done >= after_bytes:
            raise Stop

    with pytest.raises(Stop):
        copy_checkpoint(DirectorySource(src), dest, progress=stop, threads=1, range_bytes=8 * MIB)


def test_a_damaged_chunk_in_the_partial_copy_is_fetched_again(tmp_path: Path) -> None:
    want = write_checkpoint(tmp_path / "src", mib=24)
    dest = tmp_path / "out" / "ck"
    _interrupt(tmp_path / "src", dest, 16 * MIB)  # chunks 0 and 1 of part-00000 are kept
    with open(partial_dir(dest) / "part-00000.bin", "r+b") as f:
        f.seek(9 * MIB)  # inside chunk 1
        f.write(b"\x00garbage")
    source = RecordingSource(tmp_path / "src")
    copy_checkpoint(source, dest, threads=1, range_bytes=8 * MIB)
    starts = sorted(start for rel, start, _ in source.ranges if rel == "part-00000.bin")
    assert 0 not in starts and 8 * MIB in starts  # chunk 0 was trusted, chunk 1 refetched
    assert_same_tensors(load_tensors(dest, verify=True), want)


def test_a_partial_copy_of_another_version_is_discarded(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "old", mib=16, seed=1)
    want = write_checkpoint(tmp_path / "new", mib=16, seed=2)
    dest = tmp_path / "out" / "ck"
    _interrupt(tmp_path / "old", dest, 8 * MIB)
    source = RecordingSource(tmp_path / "new")
    copy_checkpoint(source, dest)
    fetched = sum(length for _, _, length in source.ranges)
    assert fetched == read_index(dest).total_bytes
    assert_same_tensors(load_tensors(dest, verify=True), want)


def test_an_existing_destination_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "src")
    copy_checkpoint(DirectorySource(tmp_path / "src"), tmp_path / "out")
    with pytest.raises(CheckpointExistsError):
        copy_checkpoint(DirectorySource(tmp_path / "src"), tmp_path / "out")
