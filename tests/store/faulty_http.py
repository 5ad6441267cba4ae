"""A tiny in-test HTTP server for misbehaviour nginx cannot produce: a body cut short
after its headers promised more, and answers that fail once and then succeed."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if m:
            start, end = int(m[1]), min(int(m[2]), len(data) - 1)
        body = data[start : end + 1]
        is_part = path.suffix == ".bin"
        with self.server.lock:
            first_time = self.path not in self.server.seen
            self.server.seen.add(self.path)
        if is_part and self.server.mode == "flaky" and first_time:
            self.send_error(503)
            return
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if is_part and self.server.mode == "short":
            body = body[: len(body) // 2]  # then close: the client sees a body ended early
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.mode = root, mode
        self.seen: set[str] = set()
        self.lock = threading.Lock()


@contextmanager
def faulty_server(root: Path, mode: str) -> Iterator[str]:
    """Serve `root` with misbehaviour `mode` ("short" or "flaky"); yields the base URL."""
    server = _Server(root, mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
