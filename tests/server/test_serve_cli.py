"""`ember serve` and `ember chat` as a user runs them: a real process, the real model.

One server process per module, started on a fresh EMBER_HOME, so the first-run
import of SmolLM2 is part of what is tested. The SIGTERM test stops a second server of
its own (its store linked from the first's), so the tests run in any order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.serve_process import ServeProcess, free_port, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = start_server(tmp_path_factory.mktemp("serve-home"))
    try:
        yield server
    finally:
        stop_server(server)


def test_health_is_503_while_the_first_run_imports_then_200(served: ServeProcess) -> None:
    assert 503 in served.health_seen and served.health_seen[-1] == 200
    # while importing, the 503 says how far the import is
    assert any(re.fullmatch(r"importing the model, \d+% done", m) for m in served.health_messages)
    assert any("importing smollm2-135m-instruct" in line for line in served.log)


def test_openai_client_chats_with_the_default_model(served: ServeProcess) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    out = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in (out.choices[0].message.content or "")


def test_ember_chat_reads_stdin_and_exits_at_its_end(served: ServeProcess) -> None:
    env = {**os.environ, "EMBER_URL": served.url}
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "chat", "--temperature", "0"],  # greedy: always Paris
        input="What is the capital of France? Answer in one word.\n",
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_ember_chat_without_a_server_fails_clearly() -> None:
    env = {**os.environ, "EMBER_URL": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "chat"],
        input="hi\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "no Ember server" in done.stderr


@pytest.fixture
def own_server(served: ServeProcess, tmp_path: Path) -> Iterator[ServeProcess]:
    """A second server, for a test that stops it: a fresh EMBER_HOME whose store links
    the model the module's server imported (no second import)."""
    from ember.store.importer import DEFAULT_MODEL_NAME
    from ember.store.local import LocalStore

    name, store = DEFAULT_MODEL_NAME, LocalStore(tmp_path / "home")
    shutil.copytree(LocalStore(served.home).path_for(name), store.path_for(name), copy_function=os.link)
    store.register(name)
    server = start_server(store.home)
    try:
        yield server
    finally:
        stop_server(server)


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(own_server: ServeProcess) -> None:
    served = own_server
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(
        model="smollm2-135m-instruct", prompt="Count: 1, 2, 3,", max_tokens=40, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    first = next(chunks)
    served.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert served.proc.wait(timeout=120) == 0, "".join(served.log)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served.url}/health", timeout=2)
