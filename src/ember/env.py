"""Every environment variable Ember reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path

EMBER_HOME = "EMBER_HOME"  # root of everything Ember stores (default ~/.ember)
EMBER_REGISTRY = "EMBER_REGISTRY"  # remote registry: a directory or an http(s) URL
EMBER_URL = "EMBER_URL"  # server the CLI talks to
EMBER_API_KEY = "EMBER_API_KEY"  # bearer key the server requires and the CLI sends
EMBER_NUM_THREADS = "EMBER_NUM_THREADS"  # torch's CPU threads per process (default: the CPUs it may use)


def ember_home() -> Path:
    """The directory that holds the store, the catalogue and the nodes' caches."""
    raw = os.environ.get(EMBER_HOME)
    home = Path(raw).expanduser() if raw else Path.home() / ".ember"
    home.mkdir(parents=True, exist_ok=True)
    return home


def registry_location() -> str | None:
    """The configured remote registry, or None when there is none."""
    return os.environ.get(EMBER_REGISTRY) or None
