"""One progress over a whole import, whatever its stages.

An import reports `progress(stage, done, total)`: `stage` says in words what it is
doing now, `done` / `total` count the whole import (every stage) in one unit, so a
single bar (or "N% done") moves steadily from start to finish. Each stage is given
its share up front, from the bytes it handles times what a byte costs in that stage
(measured on SmolLM2's import), so the share is close to its share of the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# stage, done, total (done and total over the whole import; total 0: not known yet)
ImportProgress = Callable[[str, int, int], None]

PARSE = "reading the GGUF file"
READ = "reading the source"
TOKENIZER = "converting the tokenizer"
DEQUANTISE = "dequantising the weights"
CONVERT = "converting the dtype"
WRITE = "writing the checkpoint"
SYNC = "syncing to disk"
VERIFY = "verifying checksums"
DONE = "done"

# Cost of a stage per byte it handles, relative to writing a byte of the checkpoint.
# GGUF stages count the file's header bytes (vocabulary and merges); the rest count
# checkpoint bytes. From SmolLM2's import on 2 busy cores (1.8 MB header, 538 MB of
# float32): parse 0.4 s, dequantise 3.5 s, then waiting for the tokenizer thread
# 2.5 s, write 0.9 s, sync 0.7 s, verify 0.3 s.
_PER_BYTE = {
    PARSE: 130.0,
    TOKENIZER: 840.0,
    READ: 0.5,
    DEQUANTISE: 3.9,
    CONVERT: 0.5,
    WRITE: 1.0,
    SYNC: 0.8,
    VERIFY: 0.35,
}
_PUBLISH = (WRITE, SYNC, VERIFY)


def no_progress(stage: str, done: int, total: int) -> None:
    pass


class ImportTracker:
    """Maps each stage's own (done, total) onto the whole import's.

    `plan` once the sizes are known (a reader knows them after opening its source),
    then `update(stage, done, total)` as each stage moves; stages must come in the
    planned order. Before `plan` a stage is reported with total 0 (a spinner)."""

    def __init__(self, report: ImportProgress = no_progress, *, convert: bool = False) -> None:
        self.report = report
        self.convert = convert
        self._start: dict[str, float] = {}  # stage -> units done before it
        self._cost: dict[str, float] = {}
        self._total = 0.0
        self._done = 0.0

    def plan(self, read: Sequence[tuple[str, int]], checkpoint_bytes: int) -> None:
        """`read`: the reader's stages with the bytes each handles; then the publish
        stages (dtype conversion if asked, write, sync, verify) over `checkpoint_bytes`."""
        stages = [*read, *([(CONVERT, checkpoint_bytes)] if self.convert else [])]
        stages += [(s, checkpoint_bytes) for s in _PUBLISH]
        self._start, self._cost, at = {}, {}, 0.0
        for stage, nbytes in stages:
            self._start[stage] = at
            self._cost[stage] = max(1.0, nbytes * _PER_BYTE[stage])
            at += self._cost[stage]
        self._total = at

    def update(self, stage: str, done: int = 0, total: int = 1) -> None:
        """Stage `stage` is `done` / `total` of the way through."""
        if stage not in self._start:
            self.report(stage, 0, 0)
            return
        share = min(1.0, done / total) if total > 0 else 0.0
        self._done = max(self._done, self._start[stage] + self._cost[stage] * share)
        self.report(stage, round(self._done), round(self._total))

    def finish(self) -> None:
        total = max(1, round(self._total))
        self.report(DONE, total, total)

    def bytes_callback(self, stage: str) -> Callable[[int, int], None]:
        """A (done, total) callback for one stage."""
        return lambda done, total: self.update(stage, done, total)


def percent(done: int, total: int) -> int | None:
    """Whole percent done, or None while the total is not known."""
    return min(100, done * 100 // total) if total > 0 else None
