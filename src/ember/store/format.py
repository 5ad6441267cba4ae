"""The loading-optimised checkpoint format: constants, the index, and its validation.

A checkpoint is a directory:

    index.json          format version, partitions (size, chunk checksums), tensors
    part-00000.bin ...  raw tensor bytes; every blob starts at a 4 KiB-aligned offset
                        and every file is padded to a 4 KiB multiple (direct I/O)
    model/              config.json, tokenizer files, chat template

Tensors that share storage (tied embeddings) point into one blob, each with its own
element offset, shape and stride.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    UnsupportedDtypeError,
)

if TYPE_CHECKING:  # torch is imported where tensors are made, so reading an index stays light
    import torch

FORMAT_NAME = "ember-checkpoint"
FORMAT_VERSION = 1
ALIGNMENT = 4096  # bytes; direct I/O needs offsets, lengths and buffers aligned to this
CHUNK_SIZE = 8 << 20  # bytes covered by one checksum
PARTITION_SIZE = 1 << 30  # a new partition file starts once a file passes this size
INDEX_FILE = "index.json"
MODEL_DIR = "model"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def partition_name(i: int) -> str:
    return f"part-{i:05d}.bin"


_UNSUPPORTED_DTYPES = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")  # quantized
# Bytes per element of the dtypes checkpoints usually hold, so that validating an index
# (`ember store ls`, `verify`) needs no torch; rarer dtypes ask torch.
_ITEMSIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype is stored under, e.g. "bfloat16"."""
    name = str(dtype).removeprefix("torch.")
    if name in _UNSUPPORTED_DTYPES:
        raise UnsupportedDtypeError(f"dtype {dtype} (quantized) cannot be stored; dequantize it")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or name in _UNSUPPORTED_DTYPES:
        raise UnsupportedDtypeError(f"unsupported dtype {name!r} in checkpoint index")
    return dtype


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a stored dtype name."""
    return _ITEMSIZES.get(name) or dtype_from_name(name).itemsize


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: a blob of `nbytes` at `offset` in `partition`, viewed
    as `dtype` with `shape` and `stride` (in elements), starting `elem_offset`
    elements into the blob."""

    partition: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    elem_offset: int = 0


@dataclass(frozen=True)
class PartitionEntry:
    file: str
    size: int  # bytes on disk, a multiple of ALIGNMENT
    checksums: tuple[str, ...]  # xxh3-64 hex digest of each CHUNK_SIZE chunk


@dataclass(frozen=True)
class FileEntry:
    """A file stored beside the tensors (config, tokenizer), relative to the root."""

    size: int
    checksum: str  # xxh3-64 hex digest of the whole file


@dataclass(frozen=True)
class CheckpointIndex:
    partitions: tuple[PartitionEntry, ...]
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    chunk_size: int = CHUNK_SIZE
    alignment: int = ALIGNMENT
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    @property
    def stored_bytes(self) -> int:
        """Bytes of partitions and files together: what a copy of the checkpoint moves."""
        return self.total_bytes + sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        body = {
            "format": FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "chunk_size": self.chunk_size,
            "metadata": dict(self.metadata),
            "partitions": [asdict(p) for p in self.partitions],
            "files": {name: asdict(f) for name, f in self.files.items()},
            "tensors": {name: asdict(t) for name, t in self.tensors.items()},
        }
        return json.dumps(body, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "index") -> CheckpointIndex:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad_index(source, f"not valid JSON ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise _bad_index(source, "not an Ember checkpoint index")
        if body.get("version") != FORMAT_VERSION:
            raise FormatVersionError(
                f"{INDEX_FILE}: format version {body.get('version')!r} is not supported "
                f"(this Ember reads version {FORMAT_VERSION})",
                detail=_where(source),
            )
        try:
            partitions = tuple(
                PartitionEntry(p["file"], int(p["size"]), tuple(p["checksums"])) for p in body["partitions"]
            )
            tensors = {
                name: TensorEntry(
                    partition=int(t["partition"]),
                    offset=int(t["offset"]),
                    nbytes=int(t["nbytes"]),
                    dtype=str(t["dtype"]),
                    shape=tuple(int(s) for s in t["shape"]),
                    stride=tuple(int(s) for s in t["stride"]),
                    elem_offset=int(t.get("elem_offset", 0)),
                )
                for name, t in body["tensors"].items()
            }
            index = cls(
                partitions=partitions,
                tensors=tensors,
                metadata={str(k): str(v) for k, v in body.get("metadata", {}).items()},
                files={
                    str(k): FileEntry(int(f["size"]), str(f["checksum"]))
                    for k, f in body.get("files", {}).items()
                },
                chunk_size=int(body["chunk_size"]),
                alignment=int(body["alignment"]),
                version=int(body["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad_index(source, f"malformed ({exc!r})") from exc
        index.validate(source=source)
        return index

    def validate(self, *, source: str = "index") -> None:
        """Check every tensor lies inside its partition and every dtype is known."""
        for name, t in self.tensors.items():
            if not 0 <= t.partition < len(self.partitions):
                raise _bad_index(source, f"tensor {name!r} names a missing partition")
            part = self.partitions[t.partition]
            if t.offset % self.alignment or t.offset < 0 or t.offset + t.nbytes > part.size:
                raise _bad_index(
                    source,
                    f"tensor {name!r} at [{t.offset}, {t.offset + t.nbytes}) "
                    f"lies outside {part.file} ({part.size} bytes)",
                )
            itemsize = dtype_itemsize(t.dtype)
            if len(t.shape) != len(t.stride) or any(s < 0 for s in (*t.shape, *t.stride)):
                raise _bad_index(source, f"tensor {name!r} has a bad shape/stride")
            extent = (
                0 if 0 in t.shape else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True))
            )
            if (t.elem_offset + extent) * itemsize > t.nbytes and extent:
                raise _bad_index(source, f"tensor {name!r} reads past its blob")
        for rel in self.files:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise _bad_index(source, f"file entry {rel!r} escapes the checkpoint")
        for part in self.partitions:
            if part.size % self.alignment:
                raise _bad_index(source, f"{part.file} size is not aligned")
            expected = (part.size + self.chunk_size - 1) // self.chunk_size
            if len(part.checksums) != expected:
                raise _bad_index(source, f"{part.file} has the wrong checksum count")


def read_index(path: str | Path) -> CheckpointIndex:
    """Read and validate a checkpoint's index; errors name the path."""
    root = Path(path)
    index_path = root / INDEX_FILE
    if not root.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory {root.name!r}", detail=str(root))
    try:
        text = index_path.read_text()
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{root.name!r} has no {INDEX_FILE}: not an Ember checkpoint", detail=str(root)
        ) from exc
    return CheckpointIndex.from_json(text, source=str(index_path))


def _where(source: str) -> str | None:
    """The index's path or URL for the log; None for the in-memory default."""
    return None if source in ("index", INDEX_FILE) else source


def _bad_index(source: str, problem: str) -> CorruptCheckpointError:
    # The client reads "index.json: <problem>"; the path or URL is for the log.
    return CorruptCheckpointError(f"{INDEX_FILE}: {problem}", detail=_where(source))
