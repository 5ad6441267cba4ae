"""stream_tensors and LoadProgress: views at once, bytes behind them in need order,
waiters released chunk by chunk, a corrupt chunk failing every waiter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import ember.store.loader as loader
from ember.errors import CorruptCheckpointError
from ember.store import load_tensors, save_tensors
from ember.store.format import read_index
from ember.store.loader import in_need_order, need_rank, stream_tensors
from ember.store.read_plan import plan_reads
from tests.store.conftest import MIB, assert_same_tensors, write_checkpoint

pytestmark = pytest.mark.timeout(60)

CHUNK = 8 * MIB  # the index's checksum chunk: the loader reads whole ones
NAMES = (  # file order deliberately unlike a forward pass's
    "lm_head.weight",
    "model.layers.1.mlp.weight",
    "model.norm.weight",
    "model.layers.0.mlp.weight",
    "model.embed_tokens.weight",
)


def _layered(path: Path) -> dict[str, torch.Tensor]:
    """One checksum chunk per tensor, written in NAMES' order."""
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(CHUNK // 4, generator=gen) for name in NAMES}
    save_tensors(tensors, path)
    return tensors


def test_need_rank_follows_a_forward_pass() -> None:
    ranks = [need_rank(n) for n in ("model.embed_tokens.weight", "model.layers.0.q", "model.layers.12.q")]
    assert ranks == [0, 1, 13]
    assert need_rank("model.decoder.layers.3.fc1.weight") == 4  # OPT
    assert need_rank("lm_head.weight") > 13 and need_rank("model.norm.weight") > 13


def test_chunks_are_read_in_need_order(tmp_path: Path) -> None:
    _layered(tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    bases, jobs = plan_reads(index, CHUNK)
    by_offset = {index.tensors[n].offset: n for n in NAMES}
    order = [by_offset[j.buf_offset] for j in in_need_order(index, bases, jobs)]
    assert order[:3] == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.weight",
        "model.layers.1.mlp.weight",
    ]
    assert set(order[3:]) == {"lm_head.weight", "model.norm.weight"}


def test_tied_weights_stored_once_come_first_for_the_embedding(tmp_path: Path) -> None:
    """SmolLM2's head is its embedding, stored once under both names: the bytes are
    needed first (as the embedding), not last (as the head)."""
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(2 * CHUNK // 4, generator=gen)  # two chunks
    layers = {f"model.layers.{i}.mlp.weight": torch.randn(CHUNK // 4, generator=gen) for i in range(2)}
    save_tensors({"model.embed_tokens.weight": embed, "lm_head.weight": embed, **layers}, tmp_path / "ck")
    index = read_index(tmp_path / "ck")
    assert index.tensors["lm_head.weight"].offset == index.tensors["model.embed_tokens.weight"].offset
    bases, jobs = plan_reads(index, CHUNK)
    order = [j.buf_offset for j in in_need_order(index, bases, jobs)]
    layer_offsets = [index.tensors[n].offset for n in layers]
    assert sorted(order[:2]) == [0, CHUNK] and order[2:] == layer_offsets


def test_streamed_tensors_equal_a_plain_load(tmp_path: Path) -> None:
    want = write_checkpoint(tmp_path / "ck", mib=20)
    tensors, progress = stream_tensors(tmp_path / "ck", chunk_bytes=CHUNK)
    progress.wait()
    assert progress.complete and progress.error is None
    assert progress.seconds is not None and progress.seconds >= 0
    assert_same_tensors(tensors, want)
    assert_same_tensors(tensors, load_tensors(tmp_path / "ck"))
    assert tensors["embed"].data_ptr() == tensors["lm_head"].data_ptr()  # tied storage stays tied


def test_a_waiter_is_released_when_its_chunk_arrives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = _layered(tmp_path / "ck")
    gate = threading.Event()
    read_chunk = loader.read_chunk
    reads = 0

    def held_after_two(fd: int, view: memoryview, offset: int, source: Path) -> None:
        nonlocal reads
        reads += 1
        if reads > 2:  # embeddings and layer 0 come through; the rest waits for the gate
            gate.wait(30)
        read_chunk(fd, view, offset, source)

    monkeypatch.setattr(loader, "read_chunk", held_after_two)
    tensors, progress = stream_tensors(tmp_path / "ck", threads=1, chunk_bytes=CHUNK)
    progress.wait_for([tensors["model.embed_tokens.weight"], tensors["model.layers.0.mlp.weight"]])
    assert torch.equal(tensors["model.layers.0.mlp.weight"], want["model.layers.0.mlp.weight"])
    assert not progress.complete

    done = threading.Event()

    def wait_for_head() -> None:
        progress.wait_for([tensors["lm_head.weight"]])
        done.set()

    waiter = threading.Thread(target=wait_for_head)
    waiter.start()
    assert not done.wait(0.2)  # its bytes cannot have arrived: the read is held
    with pytest.raises(TimeoutError):
        progress.wait(timeout=0.01)
    gate.set()
    waiter.join(30)
    assert done.is_set()
    progress.wait()
    assert_same_tensors(tensors, want)


def test_a_corrupt_chunk_fails_every_waiter_and_callback(tmp_path: Path) -> None:
    _layered(tmp_path / "ck")
    part = tmp_path / "ck" / "part-00000.bin"
    index = read_index(tmp_path / "ck")
    data = bytearray(part.read_bytes())
    data[index.tensors["lm_head.weight"].offset + 10] ^= 0xFF
    part.write_bytes(bytes(data))
    seen: list[BaseException | None] = []
    tensors, progress = stream_tensors(tmp_path / "ck", chunk_bytes=CHUNK)
    progress.add_done_callback(lambda p: seen.append(p.error))
    with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
        progress.wait()
    with pytest.raises(CorruptCheckpointError):
        progress.wait_for([tensors["model.embed_tokens.weight"]])  # the whole copy is bad
    assert not progress.complete
    assert len(seen) == 1 and isinstance(seen[0], CorruptCheckpointError)
    late: list[BaseException | None] = []
    progress.add_done_callback(lambda p: late.append(p.error))  # after the end: runs at once
    assert late == seen
