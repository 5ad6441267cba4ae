"""Scratch directories beside the checkpoints, and what a killed process leaves of them.

They are hidden entries in the directory of the checkpoint they are for:

    .NAME.tmp-ID/        a directory being written (`temporary_dir`: an import, a
    .NAME.tmp-ID.lock    deployment's model files); its writer holds an flock on the
                         lock file for the directory's whole life
    .NAME.trash-ID/      a directory renamed away to be deleted (`discard`)
    .NAME.partial/       a download to resume (ember.store.transfer): kept by design;
                         `.NAME.lock` is held while one is under way

A temporary directory whose lock nobody holds, and trash, are orphans: the process
that made them died (an import killed part-way, say). Opening a LocalStore, a
DiskCache or writing a deployment's model files removes the orphans of that
directory; `ember store ls` shows what is reclaimable under EMBER_HOME and
`ember store gc` removes it, `--partial` the idle partial downloads too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ember.store.transfer import file_lock

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<id>[0-9a-f]+)(?P<old>\.old)?$")
_TEMP_LOCK = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<id>[0-9a-f]+)\.lock$")
# Trash, and the trash names of Ember before this module (the same meaning).
_TRASH = re.compile(r"^\..+\.(?:trash-[0-9a-f]+|removed|discard-[0-9a-f]+|evicted-[0-9a-f]+|old-[0-9a-f]+)$")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial$")
# A temporary directory with no lock file was made by an Ember before these locks; it
# may still be written by such a process, so it is an orphan only once untouched this long.
UNLOCKED_GRACE_S = 3600.0

Kind = Literal["orphan", "partial"]


@dataclass(frozen=True)
class Scratch:
    """One reclaimable entry: an orphan, or a partial download nobody is fetching."""

    path: Path
    kind: Kind
    size: int  # bytes of its files


@contextlib.contextmanager
def temporary_dir(final: Path) -> Iterator[Path]:
    """A new `.NAME.tmp-ID` beside `final`, owned by this process (its lock held) until
    the block ends; removed then unless the block renamed it away."""
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    lock = _lock_of(tmp)
    # The lock is taken before the directory exists and let go after it is gone, so a
    # cleaner that finds the directory finds it locked while this process lives.
    with file_lock(lock):
        try:
            tmp.mkdir()
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.unlink(missing_ok=True)


def old_copy(tmp: Path) -> Path:
    """Where an overwrite puts the directory it replaces: `tmp`'s lock covers it too."""
    return tmp.with_name(f"{tmp.name}.old")


def trash_for(path: Path) -> Path:
    """A new name beside `path` to rename it to before deleting it."""
    return path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:12]}")


def discard(path: Path) -> None:
    """Take a directory away in one rename, then delete it; an interrupted delete
    leaves trash that the next clean removes."""
    trash = trash_for(path)
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def find(root: Path, *, now: Callable[[], float] = time.time) -> list[Scratch]:
    """The reclaimable entries of directory `root`, sorted by path: orphans, and partial
    downloads no copy is writing. A live process's temporary directory is not one."""
    try:
        names = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = root / name
        kind = _kind(path, now())
        if kind is not None:
            out.append(Scratch(path, kind, _size(path)))
    return out


def remove(entries: list[Scratch], *, partial: bool = False) -> list[Scratch]:
    """Delete the orphans among `entries` (and the partial downloads, with `partial`),
    each under its lock, so a process that took it meanwhile keeps it. Returns those
    removed."""
    done = []
    for entry in entries:
        if entry.kind == "partial" and not partial:
            continue
        if _remove_one(entry):
            done.append(entry)
    return done


def remove_orphans(root: Path) -> list[Scratch]:
    """Delete the orphans of directory `root` (never partial downloads); returns them."""
    return remove(find(root))


def scratch_roots(home: Path) -> list[Path]:
    """The directories under EMBER_HOME where scratch entries are made: the store, each
    node's store and disk cache, and the cluster's copies of model files."""
    nodes = sorted(p for p in (home / "nodes").glob("*") if p.is_dir())
    return [
        home / "store",
        *(n / "store" for n in nodes),
        *(n / "disk" for n in nodes),
        home / "cluster" / "models",
    ]


def _kind(path: Path, now: float) -> Kind | None:
    name = path.name
    if (m := _TEMP.match(name)) and path.is_dir():
        lock = path.with_name(f".{m['name']}.tmp-{m['id']}.lock")
        if lock.exists():
            return "orphan" if _free(lock) else None
        return "orphan" if now - _last_change(path) > UNLOCKED_GRACE_S else None
    if (m := _TEMP_LOCK.match(name)) and not path.with_name(name.removesuffix(".lock")).exists():
        return "orphan" if _free(path) else None  # its directory was gone before the lock
    if _TRASH.match(name) and path.is_dir():
        return "orphan"
    if (m := _PARTIAL.match(name)) and path.is_dir():
        return "partial" if _free(path.with_name(f".{m['name']}.lock")) else None
    return None


def _free(lock: Path) -> bool:
    """Whether no process holds `lock` (taken and let go at once; never created)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing it lets go of the lock
    return True


def _remove_one(entry: Scratch) -> bool:
    path, name = entry.path, entry.path.name
    if (m := _TEMP.match(name)) or (m := _TEMP_LOCK.match(name)):
        lock = path.with_name(f".{m['name']}.tmp-{m['id']}.lock")
    elif (m := _PARTIAL.match(name)) is not None:
        lock = path.with_name(f".{m['name']}.lock")  # the copy's: a new fetch waits for us
    else:  # trash: nobody will use it again
        shutil.rmtree(path, ignore_errors=True)
        return True
    with file_lock(lock, blocking=False) as taken:
        if not taken:
            return False
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        if lock.name != f".{m['name']}.lock":  # a temporary's own lock goes with it
            lock.unlink(missing_ok=True)
    return True


def _lock_of(tmp: Path) -> Path:
    return tmp.with_name(f"{tmp.name}.lock")


def _last_change(path: Path) -> float:
    """The newest modification time of a directory and the files directly in it."""
    newest = path.stat().st_mtime
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        for e in entries:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return newest


def _size(path: Path) -> int:
    """Bytes of the files under `path` (a file: its own), links not followed."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total
