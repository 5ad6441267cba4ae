"""Which read mode is faster for cold data on a given filesystem, as measured.

`ember bench load` records, per filesystem (st_dev), whether direct or buffered
cold reads were faster; the loader's "auto" mode follows that record, and uses
direct I/O where nothing has been measured yet (it skips the page cache's copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from ember.env import ember_home

PROFILE_FILE = "io_profile.json"


def _key(path: Path) -> str:
    return str(os.stat(path).st_dev)


def _read() -> dict[str, str]:
    try:
        data = json.loads((ember_home() / PROFILE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def preferred_cold_mode(path: Path) -> Literal["direct", "buffered"]:
    return "buffered" if _read().get(_key(path)) == "buffered" else "direct"


def record_cold_mode(path: Path, mode: Literal["direct", "buffered"]) -> None:
    data = _read()
    data[_key(path)] = mode
    target = ember_home() / PROFILE_FILE
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, target)
