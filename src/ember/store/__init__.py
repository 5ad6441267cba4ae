"""The checkpoint store: loading-optimised format, fast loader, and tiers."""

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
