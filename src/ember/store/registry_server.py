"""RegistryServer: a directory of checkpoints served over HTTP, with byte ranges.

On a Ray cluster the head's store is the registry of every other machine: this
server lets their nodes fetch from it with HttpRegistry (parallel ranged reads,
verified against the index), no shared filesystem needed. GET and HEAD only; every
path sits under a random secret prefix, so only the holders of the URL (the node
agents the head started) can read; files outside the directory are never served.

`link_bps` puts the server behind a link of that many bytes a second, shared by all
its connections (benchmarks use it to give the registry a real network's speed over
loopback, where it would otherwise run at memory-copy speed): each piece of a body is
booked on the link and sent when the link would have carried it.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_PIECE = 256 << 10  # bytes booked on a throttled link at a time


class Link:
    """A link of `bps` bytes a second shared by every sender: `book(n)` reserves the
    link for n bytes after what is booked already and returns when they would have
    crossed it. `clock` and `sleep` are injectable."""

    def __init__(
        self,
        bps: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not bps > 0:
            raise ValueError(f"a link's rate must be positive, not {bps}")
        self.bps, self._clock, self._sleep = bps, clock, sleep
        self._lock = threading.Lock()
        self._free_at = 0.0

    def book(self, nbytes: int) -> None:
        with self._lock:
            now = self._clock()
            self._free_at = max(now, self._free_at) + nbytes / self.bps
            done = self._free_at
        if done > now:
            self._sleep(done - now)


class RegistryServer:
    """Serves `root` at `http://<host>:<port>/<secret>/` in a daemon thread; port 0
    picks a free one. `url` is the base an HttpRegistry opens."""

    def __init__(
        self, root: str | Path, host: str = "127.0.0.1", port: int = 0, link_bps: float | None = None
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.secret = secrets.token_urlsafe(16)
        link = Link(link_bps) if link_bps is not None else None
        attrs = {"root": self.root, "prefix": f"/{self.secret}/", "link": link}
        handler = type("_Handler", (_Handler,), attrs)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ember-registry", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/{self.secret}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> RegistryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    root: Path
    prefix: str
    link: Link | None
    protocol_version = "HTTP/1.1"  # keep-alive: the fetcher reuses its pooled connections
    disable_nagle_algorithm = True  # else each answer's headers wait ~40 ms on a delayed ACK

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per range request would drown the server's log

    def _serve(self, *, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._answer(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        if (header := self.headers.get("Range")) is not None:
            m = _RANGE.match(header.strip())
            if m is None or int(m[1]) >= size:
                self._answer(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            status = HTTPStatus.PARTIAL_CONTENT
        headers = {"Content-Length": str(end - start + 1), "Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._answer(status, headers)
        if body:
            with open(path, "rb") as f:
                self.wfile.flush()  # the headers first, then the bytes straight from the file
                self._send(f, start, end - start + 1)

    def _send(self, f: BinaryIO, offset: int, count: int) -> None:
        if self.link is None:
            self.connection.sendfile(f, offset, count)
            return
        for at in range(offset, offset + count, _PIECE):
            n = min(_PIECE, offset + count - at)
            self.link.book(n)
            self.connection.sendfile(f, at, n)

    def _resolve(self) -> Path | None:
        """The file a request names, if it is a file inside the root under the prefix."""
        raw = urlsplit(self.path).path
        if not raw.startswith(self.prefix):
            return None
        rel = unquote(raw[len(self.prefix) :])
        if any(part in ("", ".", "..") or part.startswith(".") for part in rel.split("/")):
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def _answer(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": "0", **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
