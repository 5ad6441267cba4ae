"""What interrupted imports, removals and downloads leave beside the checkpoints: an
orphan goes at the next open of the store, a live process's directory and a partial
download stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ember.store.disk_cache import DiskCache
from ember.store.local import LocalStore
from ember.store.scratch import (
    UNLOCKED_GRACE_S,
    discard,
    find,
    remove,
    scratch_roots,
    temporary_dir,
)
from ember.store.transfer import file_lock, partial_dir

pytestmark = pytest.mark.timeout(60)
MB = 1 << 20


def _fill(directory: Path, nbytes: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "part-00000.bin").write_bytes(bytes(nbytes))
    return directory


def _left_by_a_killed_import(root: Path, name: str, nbytes: int) -> Path:
    """A temporary directory and its lock file as temporary_dir makes them, the lock
    no longer held: what the kernel leaves of a process killed mid-import."""
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.with_name(f"{tmp.name}.lock").touch()
    return _fill(tmp, nbytes)


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def test_an_orphan_goes_at_the_next_open_and_a_partial_download_stays(ember_home: Path) -> None:
    root = LocalStore(ember_home).root
    orphan = _left_by_a_killed_import(root, "m", MB)
    trash = _fill(root / ".old.trash-0123456789ab", MB)
    partial = _fill(partial_dir(root / "pulled"), 2 * MB)
    assert {e.path: (e.kind, e.size) for e in find(root)} == {
        orphan: ("orphan", MB),
        trash: ("orphan", MB),
        partial: ("partial", 2 * MB),
    }
    store = LocalStore(ember_home)
    assert sorted(e.path.name for e in store.cleaned) == sorted([orphan.name, trash.name])
    assert _hidden(root) == [partial.name]  # the lock files went with their directories


def test_a_live_writers_directory_is_never_removed(ember_home: Path) -> None:
    root = LocalStore(ember_home).root
    with temporary_dir(root / "m") as tmp:
        _fill(tmp, MB)
        assert find(root) == [] and LocalStore(ember_home).cleaned == []
        assert tmp.is_dir()
    assert _hidden(root) == []  # the writer takes its own away


def test_a_partial_download_under_way_is_neither_listed_nor_removed(ember_home: Path) -> None:
    root = LocalStore(ember_home).root
    idle = _fill(partial_dir(root / "a"), MB)
    busy = _fill(partial_dir(root / "b"), MB)
    with file_lock(root / ".b.lock"):  # what copy_checkpoint holds while it fetches
        assert [e.path for e in find(root)] == [idle]
        assert [e.path for e in remove(find(root), partial=True)] == [idle]
    assert busy.is_dir() and not idle.exists()


def test_a_directory_without_a_lock_waits_out_a_grace_period(ember_home: Path) -> None:
    # An Ember from before the locks made it: it may still be writing it.
    root = LocalStore(ember_home).root
    tmp = _fill(root / ".m.tmp-0123456789ab", MB)
    assert find(root) == []
    past = tmp.stat().st_mtime - UNLOCKED_GRACE_S - 1
    for p in (tmp, tmp / "part-00000.bin"):
        os.utime(p, (past, past))
    assert [e.path for e in LocalStore(ember_home).cleaned] == [tmp]


def test_a_disk_cache_open_removes_half_done_evictions(tmp_path: Path) -> None:
    root = tmp_path / "nodes" / "n" / "disk"
    evicted = _fill(root / ".m.evicted-0123abcd", MB)  # the name before scratch's
    _fill(partial_dir(root / "big"), MB)
    DiskCache(root, 10 * MB)
    assert not evicted.exists() and partial_dir(root / "big").is_dir()


def test_discard_leaves_nothing_and_the_roots_cover_every_node(ember_home: Path) -> None:
    store = LocalStore(ember_home)
    discard(_fill(store.root / "gone", MB))
    assert os.listdir(store.root) == []
    LocalStore(ember_home / "nodes" / "node0")
    assert scratch_roots(ember_home) == [
        ember_home / "store",
        ember_home / "nodes" / "node0" / "store",
        ember_home / "nodes" / "node0" / "disk",
        ember_home / "cluster" / "models",
    ]


_HOLD = """
import sys
from pathlib import Path
from ember.store.scratch import temporary_dir
with temporary_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part-00000.bin").write_bytes(bytes(1 << 20))
    print(tmp, flush=True)
    sys.stdin.read()  # held open until the test kills this process
"""


@pytest.mark.slow
def test_another_process_holding_an_import_keeps_it_until_killed(ember_home: Path) -> None:
    root = LocalStore(ember_home).root
    command = [sys.executable, "-c", _HOLD, str(root / "m")]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.parent == root and tmp.is_dir()
        assert LocalStore(ember_home).cleaned == [] and tmp.is_dir()  # its owner lives
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert tmp.is_dir()  # a kill runs no clean-up of its own
        assert [e.path for e in LocalStore(ember_home).cleaned] == [tmp]
        assert _hidden(root) == []
    finally:
        proc.kill()
        proc.wait(timeout=30)
