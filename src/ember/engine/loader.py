"""load_engine: an Engine from a checkpoint (store name or path).

config.json and the tokenizer come from `<checkpoint>/model/`; the weights from the
store's loader as zero-copy views, or from the caller (the seam for a node's DRAM
pool: `lease, path, _ = node_store.acquire(name, device=...)`, then
`load_engine(path, config, weights=lease.tensors)`, keeping the lease while the
engine lives).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.output_lengths import OutputLengths
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.scheduler import Clock
from ember.engine.threads import apply_num_threads
from ember.errors import CheckpointError, InvalidRequestError
from ember.store import load_tensors
from ember.store.format import INDEX_FILE
from ember.store.loader import LoadProgress
from ember.store.local import LocalStore

MODEL_DIR = "model"


def resolve_checkpoint(model: str | Path) -> Path:
    """A checkpoint directory from a path to one, or a name in the local store."""
    path = Path(model).expanduser()
    if (path / INDEX_FILE).is_file():
        return path  # a directory needs no catalogue lookup
    return LocalStore().resolve(model)


def read_hf_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / MODEL_DIR / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{checkpoint} has no {MODEL_DIR}/config.json; re-import the model") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return config


TOKENIZER_CACHE_SIZE = 8  # tokenizers kept per process (SmolLM2's: ~10 MB)
_Key = tuple[str, tuple[tuple[str, int, int, int, int], ...]]
_tokenizers: OrderedDict[_Key, Any] = OrderedDict()
_parsing: dict[_Key, threading.Lock] = {}  # keys being parsed now
_tokenizers_lock = threading.Lock()


def _dir_signature(model_dir: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """Name, size, inode, mtime and ctime (ns) of every file in `model_dir`: any rewrite
    of a tokenizer file (ctime cannot be set back) changes it."""
    out = []
    with os.scandir(model_dir) as entries:
        for e in entries:
            if e.is_file():
                st = e.stat()
                out.append((e.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(out))


def load_tokenizer(model_dir: Path, *, cache: bool = True) -> Any | None:
    """The checkpoint's tokenizer, or None when it has none (token ids only).

    Parsing a tokenizer takes 0.1-0.2 s, most of a start from a DRAM hit, so the
    last TOKENIZER_CACHE_SIZE are kept per process, keyed by the directory and the
    stat of every file in it: an instance restarting on the same files (a serverless
    scale-up) gets the same object. Sharing it is safe: Ember only reads a tokenizer
    (encode, decode, apply_chat_template), as concurrent requests of one engine
    already do. Concurrent calls for the same files parse once (a node starts the
    parse beside the weights' read: see EmbeddedNode). `cache=False` always parses.

    A tokenizer.json loads through PreTrainedTokenizerFast directly: AutoTokenizer
    would import transformers' auto-modelling modules, which the engine avoids.
    """
    if not cache:
        return _parse_tokenizer(model_dir)
    try:
        key = (str(model_dir.resolve()), _dir_signature(model_dir))
    except FileNotFoundError:
        return None  # no model directory: no tokenizer
    with _tokenizers_lock:
        if key in _tokenizers:
            _tokenizers.move_to_end(key)
            return _tokenizers[key]
        parsing = _parsing.setdefault(key, threading.Lock())
    with parsing:  # a second caller for the same files waits for this parse, then hits
        with _tokenizers_lock:
            if key in _tokenizers:
                return _tokenizers[key]
        try:
            tokenizer = _parse_tokenizer(model_dir)
            if tokenizer is not None:
                with _tokenizers_lock:
                    _tokenizers[key] = tokenizer
                    while len(_tokenizers) > TOKENIZER_CACHE_SIZE:
                        _tokenizers.popitem(last=False)
        finally:
            with _tokenizers_lock:
                _parsing.pop(key, None)
    return tokenizer


def clear_tokenizer_cache() -> None:
    """Forget every cached tokenizer."""
    with _tokenizers_lock:
        _tokenizers.clear()


def _parse_tokenizer(model_dir: Path) -> Any | None:
    if (model_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.model").is_file():
        from transformers import AutoTokenizer  # sentencepiece-only checkpoints

        return AutoTokenizer.from_pretrained(model_dir)
    return None


def eos_token_ids(spec_eos: tuple[int, ...], model_dir: Path, tokenizer: Any | None) -> set[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer."""
    ids = set(spec_eos)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in weights.values() if t.is_floating_point())
    if not counts:
        raise CheckpointError("the checkpoint holds no floating-point weights")
    return counts.most_common(1)[0][0]


def load_engine(
    model: str | Path,
    config: EngineConfig,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    loading: LoadProgress | None = None,
    clock: Clock = time.monotonic,
    lengths: OutputLengths | None = None,
    profile: PrefillProfile | None = None,
) -> Engine:
    """Build the model, KV cache and tokenizer of a checkpoint and an Engine over them.

    `loading`: `weights` are still arriving (a streaming acquire); the engine serves
    at once and each forward waits for every layer's weights just before using them.
    `lengths`: the output lengths the engine starts from and learns into (None: those
    saved for this model, device and dtype under EMBER_HOME, which it keeps updating;
    `OutputLengths.prior()` starts afresh and writes nothing). `profile`: likewise for
    the iteration-time profile (None: the saved one, kept updated).

    Raises CheckpointNotFoundError, UnsupportedModelError (an unknown architecture),
    CheckpointError, or InvalidRequestError for a config that cannot work.
    """
    from ember.engine.kv_cache import KVCache, num_blocks_for_budget
    from ember.engine.model import ModelSpec, build_model

    apply_num_threads(config.num_threads)  # once per process, before the first forward
    checkpoint = resolve_checkpoint(model)
    spec = ModelSpec.from_hf_config(read_hf_config(checkpoint))
    device = config.torch_device
    if weights is None:
        weights = load_tensors(checkpoint, device=device)
    dtype = config.torch_dtype(_weights_dtype(weights))
    if loading is not None and (dtype != _weights_dtype(weights) or device.type != "cpu"):
        loading.wait()  # a copy reads every byte: nothing to overlap
        loading = None
    if dtype != _weights_dtype(weights):  # asked for another dtype: a converted copy
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    lm = build_model(spec, weights, device)
    lm.loading = loading
    budget = config.default_kv_bytes(device)
    num_blocks = num_blocks_for_budget(spec, budget, config.block_size, dtype)
    if num_blocks < 1:
        raise InvalidRequestError(
            f"kv_cache_bytes={budget} holds no block of {config.block_size} tokens "
            f"({spec.kv_bytes_per_token(dtype) * config.block_size} bytes)",
            param="kv_cache_bytes",
        )
    kv = KVCache(spec, num_blocks, config.block_size, dtype, device)
    tokenizer = load_tokenizer(checkpoint / MODEL_DIR)
    eos = eos_token_ids(spec.eos_token_ids, checkpoint / MODEL_DIR, tokenizer)
    key, dtype_name = model_key(checkpoint), str(dtype).removeprefix("torch.")
    if profile is None:
        profile = PrefillProfile.for_model(key, str(device), dtype_name)
    if lengths is None:
        lengths = OutputLengths.for_model(key, str(device), dtype_name)
    return Engine(
        lm, kv, config, tokenizer=tokenizer, eos_token_ids=eos, clock=clock, profile=profile, lengths=lengths
    )


def model_key(checkpoint: Path) -> str:
    """A name for the model's iteration-time profile: the checkpoint's name and a digest
    of its config.json (the same model imported twice shares one profile)."""
    config = (checkpoint / MODEL_DIR / "config.json").read_bytes()
    return f"{checkpoint.name}-{hashlib.sha256(config).hexdigest()[:12]}"
