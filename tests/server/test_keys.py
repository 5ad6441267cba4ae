"""The API key and the admin key: with an admin key, every /admin route takes it and only
it, and it opens no inference route; without one, the API key opens everything as
before. Keys come from flags, the environment or files (`ps` shows no file's key), and
`ember deploy/delete/status` send the admin key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import ember.cli.cluster as cluster_cli
from ember.cli import app as cli_app
from ember.errors import InvalidRequestError
from ember.server.admin import add_admin_routes
from ember.server.app import create_app
from ember.server.settings import load_settings
from tests.server.test_admin import RecordingAdmin

pytestmark = pytest.mark.timeout(30)

USER, ADMIN = "user-key", "admin-key"


class Backend(RecordingAdmin):
    """Admin calls recorded; no models, no gauges."""

    def models(self) -> list[Any]:
        return []

    def gauges(self) -> dict[str, Any]:
        return {}


Call = tuple[str, str, str | None]  # method, path, the key sent (None: no header)


def statuses(api_key: str | None, admin_key: str | None, calls: list[Call]) -> list[int]:
    """The status of each call against an app with these keys."""
    app = create_app(api_key=api_key, admin_key=admin_key)
    add_admin_routes(app)
    app.state.ember.backend = Backend()

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
            out = []
            for method, path, key in calls:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                body = {"model": "m"} if method == "POST" else None
                out.append((await client.request(method, path, json=body, headers=headers)).status_code)
            return out

    return asyncio.run(main())


ADMIN_ROUTES = [("GET", "/admin/status"), ("POST", "/admin/deployments"), ("DELETE", "/admin/deployments/m")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_with_an_admin_key_the_admin_routes_take_it_and_only_it(method: str, path: str) -> None:
    none, user, wrong, admin = statuses(USER, ADMIN, [(method, path, k) for k in (None, USER, "x", ADMIN)])
    assert (none, user, wrong) == (401, 401, 401)
    assert admin in (200, 201)


def test_the_admin_key_opens_no_inference_route_and_the_open_routes_stay_open() -> None:
    calls = [("GET", "/v1/models", ADMIN), ("GET", "/v1/models", USER), ("GET", "/health", None)]
    calls.append(("GET", "/metrics", None))
    admin_on_models, user_on_models, health, metrics = statuses(USER, ADMIN, calls)
    assert admin_on_models == 401
    assert user_on_models == 200
    assert health != 401 and metrics == 200


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_without_an_admin_key_the_api_key_opens_the_admin_routes_as_before(method: str, path: str) -> None:
    none, user = statuses(USER, None, [(method, path, None), (method, path, USER)])
    assert none == 401 and user in (200, 201)


def test_an_admin_key_alone_leaves_inference_open() -> None:
    """No API key: inference needs none, as before; the admin routes need the admin key."""
    status, models = statuses(None, ADMIN, [("GET", "/admin/status", None), ("GET", "/v1/models", None)])
    assert status == 401 and models == 200


def test_keys_come_from_flags_the_environment_or_files(tmp_path: Path) -> None:
    api_file, admin_file = tmp_path / "api", tmp_path / "admin"
    api_file.write_text("from-file\n")
    admin_file.write_text("  root  \nignored second line\n")
    assert load_settings(None, {"admin_key": "flag"}, {}).keys() == (None, "flag")
    assert load_settings(None, {}, {"EMBER_ADMIN_KEY": "env"}).keys() == (None, "env")
    environ = {"EMBER_API_KEY_FILE": str(api_file)}
    assert load_settings(None, {"admin_key_file": str(admin_file)}, environ).keys() == ("from-file", "root")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"api_key": "k", "api_key_file": "{api}"}, "give api_key or api_key_file, not both"),
        ({"admin_key_file": "{missing}"}, "cannot read admin_key_file"),
        ({"admin_key_file": "{empty}"}, "is empty: its first line is the key"),
    ],
)
def test_a_key_file_that_cannot_give_a_key_is_refused_before_anything_starts(
    tmp_path: Path, flags: dict[str, str], message: str
) -> None:
    (tmp_path / "api").write_text("k\n")
    (tmp_path / "empty").write_text("\n")
    paths = {"api": tmp_path / "api", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    flags = {k: v.format(**paths) for k, v in flags.items()}
    with pytest.raises(InvalidRequestError, match=message):
        load_settings(None, flags, {})


@pytest.mark.parametrize(
    ("args", "environ", "sent"),
    [
        (["--admin-key", "flag"], {"EMBER_ADMIN_KEY": "env", "EMBER_API_KEY": "api"}, "flag"),
        ([], {"EMBER_ADMIN_KEY": "env", "EMBER_API_KEY": "api"}, "env"),
        ([], {"EMBER_API_KEY": "api"}, "api"),
        ([], {}, None),
    ],
)
def test_the_cli_sends_the_admin_key_from_its_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, args: list[str], environ: dict[str, str], sent: str | None
) -> None:
    seen: list[str | None] = []

    def request(method: str, url: str, *, headers: dict[str, str], **_: Any) -> httpx.Response:
        seen.append(headers.get("Authorization"))
        body = {"deployments": [], "nodes": []} if method == "GET" else {"model": "m", "name": "m"}
        return httpx.Response(200, json=body)

    monkeypatch.setattr(cluster_cli.httpx, "request", request)
    for variable in ("EMBER_ADMIN_KEY", "EMBER_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    runner = CliRunner()
    for command in (["status"], ["deploy", "m"], ["delete", "m"]):
        result = runner.invoke(cli_app, [*command, *args], env=environ)
        assert result.exit_code == 0, result.output
    expected = None if sent is None else f"Bearer {sent}"
    assert seen == [expected] * 3
