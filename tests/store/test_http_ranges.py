"""RangeReader reads byte ranges straight into a buffer: exact bytes, kept-alive
connections, redirects, a server that ignores Range, a body cut short, credentials
from the URL, and proxies left to httpx."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ember.errors import RegistryError, RegistryUnavailableError
from ember.store.http_ranges import Check, RangeReader
from ember.store.http_source import HttpSource, make_client

pytestmark = pytest.mark.timeout(30)
DATA = bytes(range(256)) * 8192  # 2 MiB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        srv = self.server
        srv.auth.append(self.headers.get("Authorization", ""))
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        assert m is not None
        start, end = int(m[1]), int(m[2])
        ranged = srv.mode != "no-range"
        body = DATA[start : end + 1] if ranged else DATA
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "short":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = mode
        self.lock = threading.Lock()
        self.connections = 0
        self.auth: list[str] = []


@contextmanager
def _serve(mode: str = "ok") -> Iterator[tuple[_Server, str]]:
    server = _Server(mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _expect(start: int, length: int) -> Check:
    def check(status: int, headers: Mapping[str, str]) -> int:
        if status == 206:
            assert headers["content-range"] == f"bytes {start}-{start + length - 1}/{len(DATA)}"
            return 0
        assert status == 200
        return start

    return check


def _read(reader: RangeReader, url: str, start: int, length: int) -> bytes:
    out = bytearray(length)
    landed = sum(reader.read_into(url, start, memoryview(out), _expect(start, length)))
    assert landed == length
    return bytes(out)


def test_ranges_land_byte_exact_over_one_kept_connection() -> None:
    reader = RangeReader()
    with _serve() as (server, url):
        for start, length in ((0, 1), (12345, 300_000), (len(DATA) - 17, 17), (1 << 20, 1 << 20)):
            assert _read(reader, f"{url}/part.bin", start, length) == DATA[start : start + length]
        assert server.connections == 1
    reader.close()


def test_a_redirect_is_followed_and_a_server_ignoring_range_is_read_past() -> None:
    reader = RangeReader()
    try:
        with _serve() as (_, url):
            assert _read(reader, f"{url}/moved/part.bin", 1000, 5000) == DATA[1000:6000]
        with _serve("no-range") as (server, url):
            assert _read(reader, f"{url}/part.bin", 1 << 20, 4096) == DATA[1 << 20 : (1 << 20) + 4096]
            # the rest of that whole-file body is never read: the connection is not reused
            assert _read(reader, f"{url}/part.bin", 0, 10) == DATA[:10]
            assert server.connections == 2
    finally:
        reader.close()


def test_a_body_cut_short_is_a_transient_failure() -> None:
    reader = RangeReader()
    with _serve("short") as (_, url), pytest.raises(RegistryUnavailableError, match="ended early"):
        _read(reader, f"{url}/part.bin", 0, 100_000)
    reader.close()


def test_credentials_in_the_url_go_as_basic_auth() -> None:
    reader = RangeReader()
    with _serve() as (server, url):
        authed = url.replace("http://", "http://ember:s3cret@")
        assert _read(reader, f"{authed}/part.bin", 0, 64) == DATA[:64]
    reader.close()
    assert server.auth == ["Basic ZW1iZXI6czNjcmV0"]


def test_a_closed_port_is_a_transient_failure_and_bad_urls_are_refused() -> None:
    with _serve() as (_, url):
        pass  # the port is closed again
    reader = RangeReader()
    with pytest.raises(RegistryUnavailableError):
        _read(reader, f"{url}/part.bin", 0, 10)
    with pytest.raises(RegistryError, match="not an http"):
        _read(reader, "ftp://example.invalid/part.bin", 0, 10)


def test_a_source_behind_a_proxy_reads_through_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not RangeReader.usable("http://registry.internal/ckpt")
    source = HttpSource(make_client(1), "http://registry.internal/ckpt", RangeReader())
    assert source.ranges is None
    monkeypatch.delenv("http_proxy")
    assert RangeReader.usable("http://registry.internal/ckpt")
