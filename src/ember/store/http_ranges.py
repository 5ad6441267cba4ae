"""RangeReader: byte ranges over HTTP(S) read straight into a caller's buffer.

httpx hands a body over as fresh `bytes` pieces, which the caller then copies into
its buffer: over loopback here that caps a download at ~0.5 GB/s of two cores.
`http.client`'s `readinto` lets the socket fill the buffer itself (one copy, in the
kernel): 2-3 GB/s on the same machine. A registry download into the DRAM pool is
that case, so it goes through here; everything else (the index, small files, the
disk-cache copy) keeps httpx.

Connections are kept alive and shared: a thread takes one for one request and gives
it back once the body is read to its end. A redirect (up to 5) is followed. What
the answer must be (status, Content-Range, sizes) is checked by the caller's
`check(status, headers)`; a dropped connection or a timeout is
RegistryUnavailableError, as with httpx. Not for proxies: `RangeReader.usable(url)`
says False where the environment names one for that host (httpx then serves).
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

from ember.errors import RegistryError, RegistryUnavailableError

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
MAX_REDIRECTS = 5
PIECE = 8 << 20  # at most this many bytes per readinto: the caller sees progress this often

Check = Callable[[int, Mapping[str, str]], int]  # (status, lower-cased headers) -> body bytes to skip


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int


class RangeReader:
    """Keep-alive connections to any number of origins, `idle_per_origin` kept idle each."""

    def __init__(self, idle_per_origin: int = 8) -> None:
        self.idle_per_origin = idle_per_origin
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    @staticmethod
    def usable(url: str) -> bool:
        """Whether a plain connection reaches `url` (no proxy set for its host)."""
        parts = urlsplit(url)
        proxies = urllib.request.getproxies()
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            return False
        return parts.scheme not in proxies or bool(urllib.request.proxy_bypass(parts.hostname))

    def read_into(self, url: str, start: int, out: memoryview, check: Check) -> Iterator[int]:
        """GET bytes [start, start + len(out)) of `url` into `out`, yielding how many
        more bytes landed (in order, from out[0]) as they arrive."""
        length = len(out)
        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        conn, resp = self._request(url, headers)
        done = False
        try:
            skip = check(resp.status, {k.lower(): v for k, v in resp.getheaders()})
            if skip:
                _discard(resp, skip, url)
            got = 0
            while got < length:
                n = _readinto(resp, out[got : got + min(PIECE, length - got)], url)
                got += n
                yield n
            done = resp.isclosed() or resp.length == 0
        finally:
            if done:
                self._give_back(conn)
            else:  # an error, a caller that stopped early, or a body longer than the range
                resp.close()
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- connections ------------------------------------------------------------------

    def _request(
        self, url: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            origin = _origin(url)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            sent = dict(headers)
            if parts.username is not None:
                secret = f"{parts.username}:{parts.password or ''}".encode()
                sent["Authorization"] = "Basic " + base64.b64encode(secret).decode()
            conn = self._take(origin)
            try:
                resp = _send(conn, target, sent)
            except (OSError, http.client.HTTPException):
                conn.close()  # a kept connection the server closed meanwhile: once more, fresh
                conn = self._connect(origin)
                try:
                    resp = _send(conn, target, sent)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    raise _unavailable(url, exc) from exc
            location = resp.getheader("location")
            if resp.status not in (301, 302, 303, 307, 308) or location is None:
                return conn, resp
            resp.read()
            self._give_back(conn)
            url = urljoin(url, location)
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects", detail=shown_url(url))

    def _take(self, origin: _Origin) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
        return self._connect(origin)

    def _connect(self, origin: _Origin) -> http.client.HTTPConnection:
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                origin.host, origin.port, timeout=CONNECT_TIMEOUT_S, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(origin.host, origin.port, timeout=CONNECT_TIMEOUT_S)
        return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        scheme = "https" if isinstance(conn, http.client.HTTPSConnection) else "http"
        origin = _Origin(scheme, conn.host, conn.port)
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.idle_per_origin:
                idle.append(conn)
                return
        conn.close()


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        raise RegistryError(f"not an http(s) URL: {shown_url(url)}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _Origin(parts.scheme, parts.hostname, port)


def _send(conn: http.client.HTTPConnection, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn.request("GET", target, headers=headers)
    resp = conn.getresponse()
    if conn.sock is not None:
        conn.sock.settimeout(READ_TIMEOUT_S)
    return resp


def _readinto(resp: http.client.HTTPResponse, view: memoryview, url: str) -> int:
    try:
        n = resp.readinto(view)
    except (OSError, http.client.HTTPException) as exc:
        raise _unavailable(url, exc) from exc
    if n == 0:
        raise RegistryUnavailableError("the body ended early", detail=shown_url(url))
    return n


def _discard(resp: http.client.HTTPResponse, skip: int, url: str) -> None:
    """Read and drop the body's first `skip` bytes (a server that ignored Range)."""
    scratch = memoryview(bytearray(min(skip, PIECE)))
    while skip:
        skip -= _readinto(resp, scratch[: min(skip, len(scratch))], url)


def _unavailable(url: str, exc: BaseException) -> RegistryUnavailableError:
    return RegistryUnavailableError(
        f"the registry transfer failed ({type(exc).__name__})", detail=f"{shown_url(url)}: {exc}"
    )


def shown_url(url: str) -> str:
    """`url` as a log may show it: without user, password or query (where tokens go)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
