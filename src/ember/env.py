"""Every environment variable Ember reads, in one place.

`ember serve` also reads each of its settings from `EMBER_<SETTING>` (EMBER_PORT,
EMBER_SCHEDULER, ...: `setting_variable`), between the --config file and the flags;
docs/serving.md lists them. EMBER_HOME, EMBER_REGISTRY and EMBER_API_KEY below are
three of those, read elsewhere too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

PREFIX = "EMBER_"
EMBER_HOME = "EMBER_HOME"  # root of everything Ember stores (default ~/.ember)
EMBER_REGISTRY = "EMBER_REGISTRY"  # remote registry: a directory or an http(s) URL
EMBER_URL = "EMBER_URL"  # server the CLI talks to
EMBER_API_KEY = "EMBER_API_KEY"  # bearer key the server requires and the CLI sends
EMBER_ADMIN_KEY = "EMBER_ADMIN_KEY"  # the /admin routes' key, when the server has one
EMBER_NUM_THREADS = "EMBER_NUM_THREADS"  # torch's CPU threads per process (default: the CPUs it may use)

# Variables Ember sets rather than reads: how torch's OpenMP threads wait while idle.
# Any of these set means the user chose it, and Ember leaves it be (engine/threads.py
# says why Ember wants them to sleep).
OMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OMP_WAIT_POLICY = "PASSIVE"

DEFAULT_URL = "http://127.0.0.1:8000"  # where the CLI looks for a server without --url / EMBER_URL


def setting_variable(name: str) -> str:
    """The variable an `ember serve` setting is read from: port -> EMBER_PORT."""
    return PREFIX + name.upper()


def server_url(url: str | None = None) -> str:
    """The server the CLI talks to: `url`, else EMBER_URL, else DEFAULT_URL."""
    return (url or os.environ.get(EMBER_URL) or DEFAULT_URL).rstrip("/")


def verify_tls(url: str) -> bool:
    """Whether the CLI's HTTP client for `url` loads certificates: only for https, as
    loading the CA bundle costs about 70 ms, a quarter of a client command's run."""
    return url.startswith("https://")


def ember_home() -> Path:
    """The directory that holds the store, the catalogue and the nodes' caches."""
    raw = os.environ.get(EMBER_HOME)
    home = Path(raw).expanduser() if raw else Path.home() / ".ember"
    home.mkdir(parents=True, exist_ok=True)
    return home


def registry_location() -> str | None:
    """The configured remote registry, or None when there is none."""
    return os.environ.get(EMBER_REGISTRY) or None


_omp_wait_set = False  # this process's OMP_WAIT_POLICY is Ember's default
_torch_came_first = False  # torch was imported before Ember could set it


def default_omp_wait_policy(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set one of OMP_WAIT_VARS; True when
    Ember set it. `import ember` calls it, before anything imports torch: OpenMP reads
    the policy once, when torch loads it. Here, in the one module `import ember` needs
    anyway, so that the CLI's start pays nothing for it."""
    global _omp_wait_set, _torch_came_first
    if any(name in environ for name in OMP_WAIT_VARS):
        return False
    environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    if environ is os.environ:
        _omp_wait_set = True
        _torch_came_first = "torch" in sys.modules
    return True


def omp_wait_policy_set_by_ember() -> bool:
    """Whether this process's OMP_WAIT_POLICY is Ember's default, not the user's."""
    return _omp_wait_set


def torch_imported_before_ember() -> bool:
    """Whether Ember set the wait policy too late: torch had loaded OpenMP already."""
    return _torch_came_first
