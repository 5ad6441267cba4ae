"""A GGUF file read once: its metadata (the vocabulary and merges included), its tensor
table, and each tensor dequantised to float32 by the `gguf` package's dequantiser.

The header is parsed here with `struct` over a memory map: the `gguf` package's own
reader builds a numpy view per field part and takes seconds on a 49k-token vocabulary;
this takes a fraction of one. Tensor data is never copied until it is dequantised.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import InvalidRequestError, UnsupportedFeatureError

_VERSIONS = (2, 3)  # v1 counted in 32 bits and is no longer written by anyone
_DEFAULT_ALIGNMENT = 32  # the data section's alignment when general.alignment is absent
_STRING, _ARRAY = 8, 9
_CHUNK_VALUES = 1 << 16  # values dequantised per call
# metadata value type -> struct code; the two variable-length types are handled apart
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GgufTensor:
    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # in torch order (the last dimension varies fastest)
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # from the start of the file
    nbytes: int  # bytes in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GgufFile:
    """A parsed GGUF file. `metadata` maps llama.cpp's keys to values (arrays as lists);
    `tensors` are in file order. The file stays mapped while the object lives."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: list[GgufTensor], mm: mmap.mmap):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self._mm = mm

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def header_bytes(self) -> int:
        """Bytes before the first tensor: what parsing the file read."""
        return min((t.offset for t in self.tensors), default=len(self._mm))

    def dequantize(self, tensor: GgufTensor, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The tensor as a float32 array of `tensor.shape`, a copy owned by the caller.
        `progress(n)` is called as each n more float32 bytes are ready."""
        from gguf import GGMLQuantizationType, quants

        raw = np.frombuffer(self._mm, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)
        qtype = GGMLQuantizationType(tensor.ggml_type)
        cols = tensor.shape[-1] if tensor.shape else 1
        rows = raw.reshape(-1, tensor.nbytes // max(1, tensor.numel // cols))  # [rows, bytes per row]
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        kind = getattr(quants, qtype.name, None)  # the package's class for a block format
        # gguf.quants.dequantize works 16 rows at a time; blocks of ~64K values fit the
        # cache as well and cost a tenth of the Python calls (the same arithmetic).
        step = max(1, _CHUNK_VALUES // cols)
        try:
            if kind is not None and hasattr(kind, "dequantize_rows"):
                kind.init_grid()
                convert: Callable[[np.ndarray], np.ndarray] = kind.dequantize_rows
            else:  # F32, F16: plain values
                convert = partial(quants.dequantize, qtype=qtype)
            for start in range(0, rows.shape[0], step):
                part = rows[start : start + step]
                out[start : start + step] = convert(part)
                if progress is not None:
                    progress(part.shape[0] * cols * 4)
        except NotImplementedError as exc:
            raise UnsupportedFeatureError(
                f"{self.path}: tensor {tensor.name} is stored as {qtype.name}, which cannot be dequantised"
            ) from exc
        return out.reshape(tensor.shape)


def read_gguf_file(path: Path) -> GgufFile:
    """Parse `path`'s header and tensor table. Raises InvalidRequestError for a file that
    is not GGUF or is cut short, UnsupportedFeatureError for a version or tensor type
    this reader does not know."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise InvalidRequestError(f"cannot read GGUF file {path}: {exc}") from exc
    try:
        metadata, tensors = _Parser(mm).parse()
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        mm.close()
        raise InvalidRequestError(f"cannot read GGUF file {path}: cut short or malformed ({exc})") from exc
    except UnsupportedFeatureError as exc:
        mm.close()
        raise UnsupportedFeatureError(f"cannot import {path}: {exc.message}") from exc
    except BaseException:
        mm.close()
        raise
    for t in tensors:
        if t.offset + t.nbytes > len(mm):
            mm.close()
            raise InvalidRequestError(f"cannot read GGUF file {path}: tensor {t.name} runs past its end")
    return GgufFile(path, metadata, tensors, mm)


class _Parser:
    """Walks the header: magic, version, counts, key/value pairs, tensor infos."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def parse(self) -> tuple[dict[str, Any], list[GgufTensor]]:
        if self.buf[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        self.pos = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version not in _VERSIONS:
            raise UnsupportedFeatureError(f"GGUF version {version} is not supported (only 2 and 3)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            metadata[key] = self._value(vtype)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self.pos // alignment) * alignment
        tensors = [
            GgufTensor(name, shape, gtype, data_start + rel, _nbytes(name, gtype, shape))
            for name, shape, gtype, rel in infos
        ]
        return metadata, tensors

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + n
        if self.pos > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        return self.buf[start : self.pos].decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack("<" + _SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _SCALARS:
            arr = np.frombuffer(self.buf, dtype="<" + _SCALARS[etype], count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        if etype == _STRING:
            return [self._string() for _ in range(count)]
        return [self._value(etype) for _ in range(count)]  # arrays of arrays: rare and small

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        gtype, rel_offset = self._unpack("<IQ")
        return name, tuple(int(d) for d in reversed(dims)), int(gtype), int(rel_offset)


def _nbytes(name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise UnsupportedFeatureError(f"tensor {name} has ggml type {ggml_type}, which is not known") from exc
    numel = 1
    for d in shape:
        numel *= d
    if shape and shape[-1] % block:
        raise ValueError(f"tensor {name}: a row of {shape[-1]} is not a whole number of {qtype.name} blocks")
    return numel // block * size
