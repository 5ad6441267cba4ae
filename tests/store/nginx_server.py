"""A real nginx serving a registry directory on 127.0.0.1, for the registry tests.

scripts/install.sh installs nginx where it can (root and apt-get); without it these
tests skip. Runs in the foreground (`daemon off`) with its own prefix, pid, logs and
temp paths under a tmp dir.
Misbehaviour nginx can produce is configured here:
  /e500/...          every request answers 500
  /p500/<ck>/*.bin   partitions answer 500 (the index is served)
The access log records method, path, status, body bytes sent and the Range header.
/ember-status is nginx's stub_status (not logged): how many requests are in flight.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

_CONF = """
{user}
daemon off;
master_process on;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    log_format ember '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {tmp}/access.log ember;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
        location = /ember-status {{ stub_status; access_log off; }}
        location /e500/ {{ return 500; }}
        location ~ ^/p500/.*\\.bin$ {{ return 500; }}
    }}
}}
"""


@dataclass(frozen=True)
class LogLine:
    method: str
    path: str
    status: int
    nbytes: int
    range: str


def nginx_binary() -> str:
    """The nginx executable; skips the test when there is none, or when it lacks the
    stub_status module that settled_log() needs."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nginx is not installed (scripts/install.sh installs it as root with apt-get; CI has it)")
    built = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=30).stderr
    if "http_stub_status_module" not in built:
        pytest.skip(f"{found} is built without the stub_status module these tests read")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NginxServer:
    """nginx serving `root`; `url` is its base URL. Use as a context manager."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.tmp = root, tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NginxServer:
        binary = nginx_binary()
        for _ in range(5):  # the free port can be taken between probe and bind: retry
            self.port = _free_port()
            conf = self.tmp / "nginx.conf"
            user = "user root root;" if os.geteuid() == 0 else ""
            conf.write_text(_CONF.format(user=user, tmp=self.tmp, port=self.port, root=self.root))
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.tmp / 'error.log').read_text(errors='replace')}")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def in_flight(self) -> int:
        """Requests nginx is reading or answering, not counting this status request."""
        with urllib.request.urlopen(f"{self.url}/ember-status", timeout=10) as resp:
            text = resp.read().decode()
        match = re.search(r"Reading: (\d+) Writing: (\d+)", text)
        assert match is not None, f"unexpected stub_status answer: {text!r}"
        return int(match[1]) + int(match[2]) - 1

    def settled_log(self, timeout_s: float = 10.0) -> list[LogLine]:
        """Every request so far, once nginx has finished each one it has received:
        nginx writes a request's line when it finalises it, just after the last byte
        went out (or it noticed the client had gone), so a client can be done first."""
        deadline = time.monotonic() + timeout_s
        while (busy := self.in_flight()) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx still has {busy} request(s) in flight after {timeout_s} s")
            time.sleep(0.01)  # nginx offers no notification: poll its counters
        return self.log()

    def log(self) -> list[LogLine]:
        """Every request so far, in order."""
        path = self.tmp / "access.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            method, uri, status, nbytes, rng = line.split(" ", 4)
            out.append(LogLine(method, uri, int(status), int(nbytes), rng.strip('"')))
        return out
