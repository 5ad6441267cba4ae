"""Small state files an engine keeps between runs (the prefill profile, the output
lengths it learnt), written so that a crash or a full disk never costs more than the
latest update."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def save_json_atomic(path: Path, data: Any, what: str) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename, so a reader
    sees the old file or the new one, never half of one. Failures are logged (naming
    `what`), never raised: losing an update of learnt state must not stop serving."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not save the %s %s: %s", what, path, e)
