"""nginx serving a benchmark's registry directory on 127.0.0.1, where nginx is
installed (scripts/install.sh provides it): the registry tier measured against a
static server written in C, so its figure is not bound by a Python server.

`serve_with_nginx(root, scratch)` yields the base URL, or None without nginx.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)  # nginx offers no readiness signal: poll its port
    return False


@contextmanager
def serve_with_nginx(root: Path, scratch: Path) -> Iterator[str | None]:
    """nginx serving `root` (its pid, logs and temp files under `scratch`); yields its
    base URL, or None where nginx is not installed or does not start."""
    binary = nginx_binary()
    if binary is None:
        yield None
        return
    scratch.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the free port can be taken between probe and bind: retry
        port = _free_port()
        conf = scratch / "nginx.conf"
        user = "user root root;" if os.geteuid() == 0 else ""
        conf.write_text(_CONF.format(user=user, tmp=scratch, port=port, root=root.resolve()))
        proc = subprocess.Popen(
            [binary, "-p", str(scratch), "-c", str(conf), "-e", str(scratch / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if _listening(proc, port):
                yield f"http://127.0.0.1:{port}"
                return
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    yield None
