"""The load benchmark: its JSON through the CLI, and the pieces that keep it honest
(eviction, page touching, raw reads, random checkpoints of the asked size)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ember.bench.load import run_load_bench
from ember.bench.page_cache import evict_page_cache, touch_pages, warm_page_cache
from ember.bench.random_llama import LADDER, make_random_llama, parse_size, plan_llama
from ember.bench.raw_read import RawRead, prepared_buffer, raw_read
from ember.cli import app
from ember.errors import InvalidRequestError
from ember.store import load_tensors, read_index
from ember.store.io_profile import preferred_cold_mode
from ember.store.loader import resident_fraction, supports_direct_io

MiB = 1 << 20


@pytest.mark.timeout(120)
def test_cli_tiny_run_gives_every_figure_as_json() -> None:
    result = CliRunner().invoke(app, ["bench", "load", "--random-llama", "8MB", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["repeats"] == 1 and 7e6 < report["tensor_bytes"] < 9e6
    by_method = {(r["method"], r["cache"]): r for r in report["results"]}
    for key in [
        ("raw buffered t1 c4M", "cold"),
        ("raw buffered t4 c64M", "warm"),
        ("ember auto", "cold"),
        ("ember auto", "warm"),
        ("ember buffered", "cold"),
        ("safetensors load_file", "cold"),
        ("safetensors load_file", "warm"),
        ("torch.load", "cold"),
        ("torch.load", "warm"),
        ("dram pool hit", "dram"),
    ]:
        r = by_method[key]
        assert len(r["samples_s"]) == 1 and r["median_s"] > 0 and r["gbps"] > 0, key
    assert len({r["method"] for r in report["results"] if r["group"].startswith("raw")}) in (9, 18)
    assert [t["target"] for t in report["targets"]] == [0.9, 1.0, 0.8]
    assert all(isinstance(t["met"], bool) and t["ratio"] > 0 for t in report["targets"])
    assert report["ember_cold_mode"] in ("direct", "buffered")


def test_cli_needs_exactly_one_checkpoint() -> None:
    result = CliRunner().invoke(app, ["bench", "load"])
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    bad = CliRunner().invoke(app, ["bench", "load", "--random-llama", "lots"])
    assert bad.exit_code == 1 and "cannot read size" in bad.stderr


def test_run_records_the_faster_cold_mode(tmp_path: Path) -> None:
    ckpt = make_random_llama(tmp_path / "ck", 2 * MiB, dtype="float32")
    grid = [RawRead("buffered", 2, 4 * MiB)]
    report = run_load_bench(ckpt, repeats=2, grid=grid)
    assert all(len(r.samples_s) == 2 for r in report.results)
    assert preferred_cold_mode(ckpt) == report.ember_cold_mode
    assert not any(p.name.startswith(".ember-bench-") for p in tmp_path.iterdir())  # scratch files removed


def test_evict_then_warm_page_cache(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(4 * MiB))
    warm_page_cache([f])
    if resident_fraction(f) < 0.9:
        pytest.skip("mincore reports nothing resident on this filesystem")
    evict_page_cache([f])
    assert resident_fraction(f) < 0.1
    warm_page_cache([f])
    assert resident_fraction(f) > 0.9


def test_touch_pages_reads_each_page_of_each_storage_once() -> None:
    buf = torch.ones(3 * 4096 + 5, dtype=torch.uint8)
    views = [buf[:10], buf[4096:], buf.view(torch.uint8)]
    assert touch_pages(views) == 4 + 1  # bytes 0, 4096, 8192, 12288, and the last byte
    assert touch_pages([torch.zeros(0)]) == 0


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_raw_read_fills_the_buffer_with_the_files(tmp_path: Path, mode: str) -> None:
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    files[0].write_bytes(os.urandom(3 * 4096))
    files[1].write_bytes(os.urandom(5 * 4096))
    if mode == "direct" and not supports_direct_io(files[0]):
        pytest.skip("no direct I/O on this filesystem")
    buf = prepared_buffer(8 * 4096)
    assert raw_read(files, buf, RawRead(mode, 2, 4096)) == 8 * 4096  # type: ignore[arg-type]
    assert bytes(buf.numpy()) == files[0].read_bytes() + files[1].read_bytes()


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("20MB") == 20 * 10**6
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("4096") == 4096
    for bad in ("", "GB", "-1GB", "2XB"):
        with pytest.raises(InvalidRequestError):
            parse_size(bad)


def test_random_llama_has_realistic_shapes_and_the_asked_size(tmp_path: Path) -> None:
    shape, layers = plan_llama(2 * 10**9, 2)  # 2 GB of bfloat16: a TinyLlama-shaped model
    assert shape == LADDER[3]
    assert abs(shape.fixed_params() + layers * shape.layer_params() - 10**9) < shape.layer_params()

    ckpt = make_random_llama(tmp_path / "ck", 6 * 10**6, dtype="bfloat16")
    index = read_index(ckpt)
    assert 4.5e6 < index.total_bytes < 7.5e6
    config = json.loads((ckpt / "model" / "config.json").read_text())
    tensors = load_tensors(ckpt)
    n = config["num_hidden_layers"]
    assert len(tensors) == 9 * n + 3 and tensors["model.norm.weight"].dtype == torch.bfloat16
    assert tensors[f"model.layers.{n - 1}.mlp.down_proj.weight"].shape == (
        config["hidden_size"],
        config["intermediate_size"],
    )
    with pytest.raises(InvalidRequestError):
        make_random_llama(tmp_path / "bad", 10**6, dtype="int8")


def test_dram_pool_hit_uses_the_pool_when_it_exists(tmp_path: Path) -> None:
    ckpt = make_random_llama(tmp_path / "ck", 2 * MiB, dtype="float32")
    report = run_load_bench(ckpt, repeats=1, grid=[RawRead("buffered", 1, 4 * MiB)])
    assert report.dram_pool == "DramPool"
    hit = report.find("dram pool hit", "dram")
    assert hit is not None and hit.gbps > 0


def test_random_llama_can_carry_a_tokenizer_of_another_vocabulary(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {}}')
    ckpt = make_random_llama(
        tmp_path / "ck", 6 * 10**6, vocab=1000, files={"model/tokenizer.json": tokenizer}
    )
    assert (ckpt / "model" / "tokenizer.json").read_text() == '{"model": {}}'
    config = json.loads((ckpt / "model" / "config.json").read_text())
    assert config["vocab_size"] == 1000
    assert load_tensors(ckpt)["model.embed_tokens.weight"].shape[0] == 1000
