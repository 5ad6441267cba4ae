"""The checkpoint store: loading-optimised format, fast loader, and tiers.

The names below are loaded on first use: the index, the catalogue and checksums need
no torch, so `ember store ls` and the client commands start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.store.checksum import verify_checkpoint
    from ember.store.format import CheckpointIndex, TensorEntry, read_index
    from ember.store.loader import load_tensors
    from ember.store.writer import save_tensors

__all__ = [
    "CheckpointIndex",
    "TensorEntry",
    "load_tensors",
    "read_index",
    "save_tensors",
    "verify_checkpoint",
]

_LAZY = {
    "CheckpointIndex": "ember.store.format",
    "TensorEntry": "ember.store.format",
    "read_index": "ember.store.format",
    "verify_checkpoint": "ember.store.checksum",
    "load_tensors": "ember.store.loader",
    "save_tensors": "ember.store.writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ember.store' has no attribute {name!r}")
