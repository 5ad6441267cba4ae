"""Shared fixtures: every test gets its own EMBER_HOME."""

from __future__ import annotations

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
