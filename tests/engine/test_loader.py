"""load_tokenizer's per-process cache: a restart on the same files reuses the parsed
tokenizer; any change to the directory's files parses it again."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.engine import loader
from ember.engine.loader import clear_tokenizer_cache, load_tokenizer
from tests.store.tiny_models import tiny_tokenizer


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_tokenizer_cache()
    yield
    clear_tokenizer_cache()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    tiny_tokenizer().save_pretrained(path)
    return path


def test_a_second_load_returns_the_cached_tokenizer(model_dir: Path) -> None:
    first = load_tokenizer(model_dir)
    assert first is not None
    assert load_tokenizer(model_dir) is first
    assert first.decode(first.encode("w1 w2", add_special_tokens=False)) == "w1 w2"


def test_a_changed_file_is_parsed_again(model_dir: Path) -> None:
    first = load_tokenizer(model_dir)
    config = model_dir / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"</s>"', '"<unk>"'))  # another eos token
    second = load_tokenizer(model_dir)
    assert second is not first
    assert second.eos_token == "<unk>" and first.eos_token == "</s>"


def test_a_touched_or_added_file_is_parsed_again(model_dir: Path) -> None:
    first = load_tokenizer(model_dir)
    st = (model_dir / "tokenizer.json").stat()
    os.utime(model_dir / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    second = load_tokenizer(model_dir)
    assert second is not first
    (model_dir / "added.txt").write_text("x")
    assert load_tokenizer(model_dir) is not second


def test_another_directory_with_equal_files_gets_its_own(model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    tiny_tokenizer().save_pretrained(other)
    assert load_tokenizer(model_dir) is not load_tokenizer(other)


def test_cache_false_always_parses(model_dir: Path) -> None:
    first = load_tokenizer(model_dir)
    assert load_tokenizer(model_dir, cache=False) is not first
    assert load_tokenizer(model_dir) is first


def test_the_cache_keeps_the_most_recent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "TOKENIZER_CACHE_SIZE", 2)
    dirs = []
    for i in range(3):
        dirs.append(tmp_path / f"m{i}")
        tiny_tokenizer().save_pretrained(dirs[-1])
    toks = [load_tokenizer(d) for d in dirs]
    assert load_tokenizer(dirs[2]) is toks[2]
    assert load_tokenizer(dirs[0]) is not toks[0]  # the oldest was dropped


def test_no_tokenizer_files_or_no_directory_gives_none(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert load_tokenizer(tmp_path / "empty") is None
    assert load_tokenizer(tmp_path / "missing") is None


def test_concurrent_loads_of_the_same_files_parse_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    callers = 3
    arrived = threading.Semaphore(0)
    parses: list[Path] = []
    real = loader._parse_tokenizer

    class Recording(dict):  # type: ignore[type-arg]
        def setdefault(self, key: Any, default: Any = None) -> Any:
            arrived.release()  # this caller is about to parse or wait for the parse
            return super().setdefault(key, default)

    def parse_when_all_arrived(path: Path) -> Any:
        parses.append(path)
        for _ in range(callers):
            assert arrived.acquire(timeout=30)
        return real(path)

    monkeypatch.setattr(loader, "_parsing", Recording())
    monkeypatch.setattr(loader, "_parse_tokenizer", parse_when_all_arrived)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(load_tokenizer(model_dir))) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(parses) == 1
    assert len(got) == callers and all(g is got[0] for g in got) and got[0] is not None
