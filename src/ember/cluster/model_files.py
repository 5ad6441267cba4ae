"""A deployment's ModelInfo without its weights: the checkpoint's model/ files (config,
tokenizer, chat template) copied under `$EMBER_HOME/cluster/models/<model>/`, so
/v1/models lists and requests are tokenised even while scaled to zero."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ember.backend import ModelInfo
from ember.engine.loader import load_tokenizer
from ember.errors import CheckpointError
from ember.store.scratch import old_copy, remove_orphans, temporary_dir


def write_model_dir(root: Path, model: str, files: dict[str, bytes]) -> Path:
    """Write the files to `root/<model>/` (replaced whole); returns that directory.
    What a killed controller left in `root` goes first (ember.store.scratch)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    dest = root / model
    with temporary_dir(dest) as tmp:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        old = old_copy(tmp)  # under tmp's lock, like the store's overwrites
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def model_info(name: str, model_dir: Path, created: int, max_model_len: int | None) -> ModelInfo:
    """ModelInfo from a model/ directory: its tokenizer, and the context from config.json
    (capped by the engine's max_model_len when one is set)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the checkpoint of {name!r} has no readable model/config.json") from exc
    positions = int(config.get("max_position_embeddings", 2048))
    limit = positions if max_model_len is None else min(positions, max_model_len)
    return ModelInfo(name, load_tokenizer(model_dir), limit, created)
