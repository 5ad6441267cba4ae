"""The models of `ember bench cluster`: random-weight Llamas of real shapes (made once,
cached under the bench's home) or checkpoints from the store, laid out as a registry
directory (one checkpoint directory per model name, hard links where possible)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.errors import InvalidRequestError
from ember.store.format import MODEL_DIR, read_index

SMOLLM2_VOCAB = 49152  # the tokenizer random models carry is SmolLM2's
# SmolLM2-135M's width with embeddings tied, as in SmolLM2: 0.15-0.3 GB float32 is 3-10
# of its layers (the ladder's 8-layer minimum would leave only its tiniest shape, over
# a hundred layers of width 128, at these sizes).
MIN_LAYERS = 2


@dataclass(frozen=True)
class ClusterModel:
    """A model of the bench: its deployment name, checkpoint directory and tensor bytes."""

    name: str
    checkpoint: Path
    nbytes: int


def smollm2_tokenizer_files() -> dict[str, Path]:
    """SmolLM2's tokenizer and chat template (its model/ files but config.json), the
    default model imported into the store on first use: what a random Llama needs to
    serve chat and completions."""
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    smol = store.resolve(ensure_default_model(store)) / MODEL_DIR
    return {f"{MODEL_DIR}/{f.name}": f for f in sorted(smol.iterdir()) if f.name != "config.json"}


def random_models(
    cache: Path, count: int, sizes: Sequence[int], *, files: dict[str, Path] | None = None
) -> list[ClusterModel]:
    """`count` random float32 Llamas named random-0, random-1, ..., sizes (bytes)
    assigned in turn, each with its own seed, embeddings tied; made once under `cache`. `files`: the
    tokenizer files they carry (default: SmolLM2's)."""
    from ember.bench.random_llama import cached_random_llama

    if count < 1:
        raise InvalidRequestError("--random-models must be at least 1", param="random_models")
    if not sizes:
        raise InvalidRequestError("give at least one size in --sizes", param="sizes")
    files = smollm2_tokenizer_files() if files is None else files
    out = []
    for i in range(count):
        path = cached_random_llama(
            cache, sizes[i % len(sizes)], dtype="float32", seed=i, vocab=SMOLLM2_VOCAB, files=files,
            tied=True, min_layers=MIN_LAYERS,
        )  # fmt: skip
        out.append(ClusterModel(f"random-{i}", path, read_index(path).total_bytes))
    return out


def store_models(names: Sequence[str]) -> list[ClusterModel]:
    """Checkpoints of the store (or directories), by name."""
    from ember.store.local import LocalStore

    store = LocalStore()
    out = []
    for name in names:
        path = store.resolve(name)
        out.append(ClusterModel(path.name, path, read_index(path).total_bytes))
    if len({m.name for m in out}) != len(out):
        raise InvalidRequestError("--models names a model twice", param="models")
    return out


def link_registry(models: Sequence[ClusterModel], root: Path) -> Path:
    """A registry directory at `root` holding every model under its name (hard links;
    a copy where links are refused), made anew: a name may stand for another model now."""

    def link(a: str, b: str) -> None:
        try:
            Path(b).hardlink_to(a)
        except OSError:
            shutil.copy2(a, b)

    root.mkdir(parents=True, exist_ok=True)
    for m in models:
        shutil.rmtree(root / m.name, ignore_errors=True)
        shutil.copytree(m.checkpoint, root / m.name, copy_function=link)
    return root
