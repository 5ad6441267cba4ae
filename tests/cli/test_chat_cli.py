"""`ember chat --embedded`: the model runs in the process; stdin lines are turns."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.store.local import LocalStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tiny_in_store(tiny_llama: tuple[Path, Any]) -> str:
    store = LocalStore()
    shutil.copytree(tiny_llama[0], store.path_for("tiny"))
    store.register("tiny")
    return "tiny"


def test_embedded_chat_forgets_old_turns_to_keep_going(tiny_in_store: str) -> None:
    # The tiny model's context is 256 tokens and its random answers fill it, so the
    # second and third turns only fit once the oldest turns are forgotten.
    result = CliRunner().invoke(
        app, ["chat", tiny_in_store, "--embedded"], input="hello\n\nhow are you?\nbye\n"
    )
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_embedded_chat_refuses_one_too_long_line_and_goes_on(tiny_in_store: str) -> None:
    result = CliRunner().invoke(
        app, ["chat", tiny_in_store, "--embedded"], input="word " * 400 + "\nshort question\n"
    )
    assert result.exit_code == 0, result.output
    assert "error: the conversation is" in result.output


def test_embedded_chat_with_an_unknown_model_fails_clearly() -> None:
    result = CliRunner().invoke(app, ["chat", "nope", "--embedded"], input="hi\n")
    assert result.exit_code == 1
    assert "nope" in result.output
