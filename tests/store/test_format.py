"""Round trips through save_tensors / load_tensors, and malformed checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    UnsupportedDtypeError,
)
from ember.store import load_tensors, read_index, save_tensors, verify_checkpoint
from ember.store.format import ALIGNMENT, INDEX_FILE

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * dtype.itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    t = _sample(dtype, (3, 5))
    save_tensors({"x": t}, tmp_path / "ck")
    out = load_tensors(tmp_path / "ck", verify=True)["x"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_tied_tensors_stored_once_and_stay_tied(tmp_path: Path) -> None:
    emb = torch.randn(256, 64)
    save_tensors({"embed": emb, "lm_head": emb, "other": torch.randn(10)}, tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    assert index.tensors["embed"].offset == index.tensors["lm_head"].offset
    assert index.total_bytes < 2 * emb.numel() * 4
    out = load_tensors(tmp_path / "ck")
    assert out["embed"].data_ptr() == out["lm_head"].data_ptr()
    assert torch.equal(out["lm_head"], emb)


def test_non_contiguous_and_overlapping_views(tmp_path: Path) -> None:
    base = torch.randn(40, 30)
    tensors = {
        "t": torch.randn(7, 5).t(),  # transposed, alone
        "base": base,
        "rows": base[10:20],  # views sharing storage with base
        "cols": base[:, ::3],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_tensors(tensors, tmp_path / "ck")
    out = load_tensors(tmp_path / "ck")
    for name, t in tensors.items():
        assert out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_offsets_are_aligned_and_files_padded(tmp_path: Path) -> None:
    save_tensors({f"w{i}": torch.randn(i + 1) for i in range(20)}, tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    assert all(t.offset % ALIGNMENT == 0 for t in index.tensors.values())
    for p in index.partitions:
        assert (tmp_path / "ck" / p.file).stat().st_size % ALIGNMENT == 0


def test_partitions_split_and_load(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.randn(5000) for i in range(6)}
    save_tensors(tensors, tmp_path / "ck", partition_size=40_000)
    assert len(read_index(tmp_path / "ck").partitions) > 1
    out = load_tensors(tmp_path / "ck", verify=True, threads=3, chunk_bytes=1)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


def test_metadata_and_files_travel_with_the_checkpoint(tmp_path: Path) -> None:
    save_tensors(
        {"x": torch.ones(2)},
        tmp_path / "ck",
        metadata={"arch": "llama"},
        files={"model/config.json": b'{"a": 1}'},
    )
    assert read_index(tmp_path / "ck").metadata == {"arch": "llama"}
    assert json.loads((tmp_path / "ck/model/config.json").read_text()) == {"a": 1}


def test_existing_path_is_refused_unless_overwrite(tmp_path: Path) -> None:
    save_tensors({"x": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(CheckpointExistsError):
        save_tensors({"x": torch.zeros(2)}, tmp_path / "ck")
    save_tensors({"x": torch.zeros(2)}, tmp_path / "ck", overwrite=True)
    assert torch.equal(load_tensors(tmp_path / "ck")["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_quantized_dtype_is_refused_and_nothing_written(tmp_path: Path) -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(UnsupportedDtypeError):
        save_tensors({"q": q}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_tensors(tmp_path / "nope")


def _checkpoint(tmp_path: Path) -> Path:
    save_tensors({"a": torch.randn(3000), "b": torch.randn(100)}, tmp_path / "ck")
    return tmp_path / "ck"


def test_truncated_partition_is_caught_by_plain_load(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    part = ck / "part-00000.bin"
    part.write_bytes(part.read_bytes()[:-ALIGNMENT])
    with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
        load_tensors(ck)


def test_flipped_byte_fails_verify_and_names_the_file(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    part = ck / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
        verify_checkpoint(ck)
    with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
        load_tensors(ck, verify=True)


def _edit_index(ck: Path, edit: object) -> None:
    body = json.loads((ck / INDEX_FILE).read_text())
    edit(body)  # type: ignore[operator]
    (ck / INDEX_FILE).write_text(json.dumps(body))


def test_index_pointing_past_the_file_end(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    _edit_index(ck, lambda b: b["tensors"]["b"].update(offset=1 << 30))
    with pytest.raises(CorruptCheckpointError, match="outside"):
        load_tensors(ck)


def test_unknown_format_version(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    _edit_index(ck, lambda b: b.update(version=99))
    with pytest.raises(FormatVersionError, match="99"):
        load_tensors(ck)


def test_unknown_dtype_in_index(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    _edit_index(ck, lambda b: b["tensors"]["b"].update(dtype="float128"))
    with pytest.raises(UnsupportedDtypeError, match="float128"):
        load_tensors(ck)


def test_io_modes_agree(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    a = load_tensors(ck, io="buffered")
    b = load_tensors(ck, io="auto")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verify_catches_an_altered_model_file(tmp_path: Path) -> None:
    save_tensors({"x": torch.ones(2)}, tmp_path / "ck", files={"model/config.json": b"{}"})
    verify_checkpoint(tmp_path / "ck")
    (tmp_path / "ck/model/config.json").write_bytes(b'{"x": 1}')
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        verify_checkpoint(tmp_path / "ck")


def test_direct_io_reads_the_same_bytes(tmp_path: Path) -> None:
    from ember.store.loader import supports_direct_io

    ck = _checkpoint(tmp_path)
    if not supports_direct_io(ck / "part-00000.bin"):
        pytest.skip("this filesystem has no O_DIRECT (tmpfs)")
    a = load_tensors(ck, io="direct", threads=2)
    b = load_tensors(ck, io="buffered")
    assert all(torch.equal(a[k], b[k]) for k in a)
