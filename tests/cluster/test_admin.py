"""The control plane through HTTP and the CLI: `ember deploy/delete/status --json`
against a live server (the runner's app: two embedded nodes, tiny Llamas), and the
openai client served by a deployment scaled from zero."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from typer.testing import CliRunner

from ember.cli import app as cli
from ember.server.runner import build_app
from ember.server.settings import ServeSettings
from tests.cluster.conftest import ENGINE
from tests.server.conftest import _free_socket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # a server over two nodes
KEY = "admin-key"


def test_deploy_status_delete_and_a_request_to_a_scaled_from_zero_deployment(
    ember_home: Path, models: list[str]
) -> None:
    settings = ServeSettings(
        models=["tiny"], api_key=KEY, nodes=2, start_timeout_s=60, log_level="warning",
        kv_cache_bytes=ENGINE["kv_cache_bytes"], max_model_len=ENGINE["max_model_len"],
        max_num_seqs=ENGINE["max_num_seqs"], swap="off",
    )  # fmt: skip
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(build_app(settings), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    host, port = sock.getsockname()
    url = f"http://{host}:{port}"
    runner = CliRunner()

    def ember(*args: str, key: str | None = KEY) -> str:
        result = runner.invoke(cli, [*args, "--url", url], env={"EMBER_API_KEY": key} if key else {})
        assert result.exit_code == 0, result.output
        return result.output

    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and thread.is_alive(), "server not ready"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

        assert "deployed tiny2 as cold" in ember(
            "deploy", "tiny2", "--name", "cold", "--min-instances", "0", "--keep-alive", "60"
        )
        status = json.loads(ember("status", "--json"))
        assert set(status) == {"deployments", "nodes"}
        tiny, cold = status["deployments"]
        policy = {"min_instances", "max_instances", "target_concurrency", "keep_alive_s"}
        assert set(cold) == {"name", "model", "instances", "waiting_requests", "state", "reason", *policy}
        assert [(d["state"], d["reason"]) for d in (tiny, cold)] == [("ready", None)] * 2
        assert (cold["name"], cold["model"], cold["min_instances"]) == ("cold", "tiny2", 0)
        assert cold["waiting_requests"] == 0
        assert cold["instances"] == []
        [inst] = tiny["instances"]
        assert set(inst) == {"id", "node", "state", "in_flight"} and inst["state"] == "ready"
        assert [set(n) for n in status["nodes"]] == [{"id", "slots", "free_slots", "dram", "disk"}] * 2
        assert sum(n["free_slots"] for n in status["nodes"]) == 1

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "cold"}
        done = client.completions.create(model="cold", prompt="Hello", max_tokens=5, temperature=0)
        assert done.usage is not None and done.usage.completion_tokens == 5
        [cold_inst] = json.loads(ember("status", "--json"))["deployments"][1]["instances"]
        assert cold_inst["state"] == "ready" and cold_inst["node"] != inst["node"]
        assert "cold" in ember("status")  # the table for people

        def policies() -> list[dict[str, object]]:
            return [
                {k: d[k] for k in ("name", *policy)}
                for d in json.loads(ember("status", "--json"))["deployments"]
            ]

        deployed = policies()
        for flags, message in [
            (["--keep-alive", "nan"], "keep_alive_s must be a number of seconds from 0 to"),
            (["--max-instances", "5000"], "max_instances must be an integer from 1 to 1024, not 5000"),
            (["--name", ""], "invalid deployment name ''"),
        ]:  # Deployment's own messages; nothing changes (a NaN once left a half-made deployment)
            bad = runner.invoke(cli, ["deploy", "tiny2", *flags, "--url", url], env={"EMBER_API_KEY": KEY})
            assert bad.exit_code == 1 and message in bad.output, bad.output
        assert policies() == deployed

        refused = runner.invoke(cli, ["status", "--url", url], env={"EMBER_API_KEY": "wrong"})
        assert refused.exit_code == 1 and "API key" in refused.output

        metrics = httpx.get(f"{url}/metrics").text
        assert 'ember:cold_starts_total{model_name="cold",tier="registry"} 1.0' in metrics
        assert 'ember:scale_events_total{direction="up",model_name="cold"} 1.0' in metrics

        assert "deleted cold" in ember("delete", "cold")
        assert [d["name"] for d in json.loads(ember("status", "--json"))["deployments"]] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="cold", prompt="Hello", max_tokens=2)
        missing = runner.invoke(cli, ["delete", "cold", "--url", url], env={"EMBER_API_KEY": KEY})
        assert missing.exit_code == 1 and "no deployment named 'cold'" in missing.output
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
