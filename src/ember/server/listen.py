"""The listening socket of `ember serve`, made before anything else: a port in use
is a clear error at once, before any model is loaded or torch imported. uvicorn then
serves on this socket (runner.serve)."""

from __future__ import annotations

import errno
import socket

from ember.errors import InvalidRequestError, PortInUseError

BACKLOG = 2048  # uvicorn's default: connections that wait while the server starts


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; connections wait in its
    backlog until the server accepts them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # as uvicorn does: a restart may reuse the port while old connections linger
        # in TIME_WAIT; a port that another socket listens on is still refused
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is in use (another `ember serve`?): stop it, or pick "
                "another port with --port",
                param="port",
            ) from exc
        raise InvalidRequestError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", param="host"
        ) from exc
    return sock
