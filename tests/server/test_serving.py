"""Errors as the API renders them: the client reads the reason, never a path of the
server; the server's log keeps the whole text."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.cluster.state import Deployment
from ember.errors import CorruptCheckpointError
from ember.server.app import create_app
from ember.server.serving import error_body
from ember.store.local import LocalStore
from tests.cluster.conftest import make_controller, run

pytestmark = pytest.mark.timeout(120)


def test_error_body_sends_the_public_text_and_logs_the_whole(
    ember_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = ember_home / "store" / "m" / "part-00000.bin"
    exc = CorruptCheckpointError("checksum mismatch in part-00000.bin at bytes [0, 4096)", detail=str(where))
    with caplog.at_level(logging.WARNING, logger="ember.server.serving"):
        body = error_body(exc)
    assert body == {
        "error": {
            "message": "checksum mismatch in part-00000.bin at bytes [0, 4096)",
            "type": "checkpoint_error",
            "param": None,
            "code": 422,
        }
    }
    assert str(where) in caplog.text


def _corrupt_copy(src: Path, store: LocalStore, name: str) -> Path:
    """`src` in the store as `name`, its first partition with one byte flipped (a new
    file: the rest are hard links to the session's checkpoint, which stays good)."""
    dest = store.path_for(name)
    shutil.copytree(src, dest, copy_function=os.link)
    part = dest / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.unlink()
    part.write_bytes(bytes(data))
    store.register(name)
    return part


def test_a_corrupt_checkpoint_over_the_api_names_no_server_path(
    ember_home: Path, tiny_llama: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    part = _corrupt_copy(tiny_llama[0], LocalStore(ember_home), "bad")

    async def main() -> httpx.Response:
        controller = make_controller(ember_home)
        await controller.start()
        try:
            await controller.deploy(Deployment("bad", "bad", min_instances=0))
            app = create_app()
            app.state.ember.backend = controller
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
                body = {"model": "bad", "prompt": "hello", "max_tokens": 2}
                return await client.post("/v1/completions", json=body, timeout=60)
        finally:
            await controller.close()

    with caplog.at_level(logging.WARNING, logger="ember.server.serving"):
        resp = run(main)
    assert resp.status_code == 502, resp.text
    message = resp.json()["error"]["message"]
    assert message.startswith("checksum mismatch in part-00000.bin at bytes [0, ")
    assert "/" not in message and ember_home.name not in resp.text  # no fragment of the server's paths
    served = [r.getMessage() for r in caplog.records if r.name == "ember.server.serving"]
    assert any(str(part) in m for m in served), served  # the log says which file
