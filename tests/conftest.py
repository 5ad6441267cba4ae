"""Shared fixtures: every test gets its own EMBER_HOME; the real model is imported
once per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def ember_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "ember-home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    monkeypatch.delenv("EMBER_REGISTRY", raising=False)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    yield home


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SmolLM2-135M-Instruct (GGUF, dequantised to float32) imported once per session
    into its own EMBER_HOME; yields the checkpoint directory. Treat it as read-only.
    Takes ~25 s: use it only from tests marked slow."""
    from ember.errors import MissingDependencyError
    from ember.store.importer import DEFAULT_MODEL_NAME, default_model_source, import_checkpoint
    from ember.store.local import LocalStore

    try:
        src = default_model_source()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    home = tmp_path_factory.mktemp("smollm2-home")
    try:
        result = import_checkpoint(src, DEFAULT_MODEL_NAME, store=LocalStore(home))
        yield result.path
    finally:
        shutil.rmtree(home, ignore_errors=True)
