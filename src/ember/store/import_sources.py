"""Readers for what `ember store import` accepts: a Hugging Face directory of
safetensors (one file or sharded) and a GGUF file (dequantised by transformers).
Each gives a `SourceModel`: tensors, config, tokenizer, generation config."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.errors import CheckpointNotFoundError, InvalidRequestError, UnsupportedFeatureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# stage, done, total (total 0: not known in advance)
ImportProgress = Callable[[str, int, int], None]

SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class SourceModel:
    tensors: dict[str, torch.Tensor]
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None
    generation_config: bytes | None  # generation_config.json as stored
    source: str  # where it came from, for the catalogue
    kind: str  # "safetensors" | "gguf" | "state_dict"


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def source_kind(src: Path) -> str:
    """ "safetensors" or "gguf"; raises for a missing path or anything else."""
    if not src.exists():
        raise CheckpointNotFoundError(f"nothing to import at {src}: no such file or directory")
    if src.is_file() and src.suffix.lower() == ".gguf":
        return "gguf"
    if src.is_dir():
        if (src / SAFETENSORS_INDEX).is_file() or any(src.glob("*.safetensors")):
            return "safetensors"
        if any(src.glob("*.gguf")):
            raise InvalidRequestError(f"{src} holds GGUF files: pass the .gguf file itself", param="src")
        found = ", ".join(sorted(p.name for p in src.iterdir())[:8]) or "nothing"
        raise UnsupportedFeatureError(
            f"{src} has no .safetensors weights (found: {found}); Ember imports Hugging Face "
            "safetensors directories and .gguf files"
        )
    raise UnsupportedFeatureError(
        f"cannot import {src}: Ember imports Hugging Face safetensors directories and .gguf files"
    )


def _shard_files(src: Path) -> list[Path]:
    index_path = src / SAFETENSORS_INDEX
    if not index_path.is_file():
        return sorted(src.glob("*.safetensors"))
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequestError(f"{index_path} is not a valid safetensors index ({exc!r})") from exc
    shards = [src / n for n in names]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointNotFoundError(f"{index_path} names shards that are missing: {', '.join(missing)}")
    return shards


def read_safetensors_dir(src: Path, progress: ImportProgress = _no_progress) -> SourceModel:
    """Every tensor of a Hugging Face safetensors directory, in its own dtype."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoTokenizer

    if not (src / "config.json").is_file():
        raise InvalidRequestError(f"{src} has no config.json: not a Hugging Face model directory")
    shards = _shard_files(src)
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequestError(f"cannot read {src / 'config.json'}: {exc}") from exc

    tensors: dict[str, torch.Tensor] = {}
    try:
        handles = [safe_open(str(p), framework="pt") for p in shards]
        total = sum(len(list(h.keys())) for h in handles)
        for h in handles:
            for key in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[key] = h.get_tensor(key)
                progress("read", len(tensors), total)
    except SafetensorError as exc:
        raise InvalidRequestError(f"cannot read safetensors in {src}: {exc}") from exc

    tokenizer = None
    if any((src / m).is_file() for m in _TOKENIZER_MARKERS):
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"cannot read the tokenizer in {src}: {exc}") from exc
    gen_path = src / "generation_config.json"
    gen = gen_path.read_bytes() if gen_path.is_file() else None
    return SourceModel(tensors, config, tokenizer, gen, str(src.resolve()), "safetensors")


def read_gguf(src: Path, progress: ImportProgress = _no_progress) -> SourceModel:
    """A GGUF file dequantised to float32 by transformers. The model it loads refuses
    save_pretrained, so its state dict is taken instead; tied embeddings stay one tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as transformers_logging

    progress("read", 0, 0)
    where, fname = str(src.parent), src.name
    if not sys.stderr.isatty():  # transformers' own bars would fill a log with carriage returns
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=fname, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=fname, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidRequestError(f"cannot read GGUF file {src}: {exc}") from exc
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    config = model.config
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    gen = model.generation_config
    gen_json = gen.to_json_string(use_diff=True).encode() if isinstance(gen, GenerationConfig) else None
    progress("read", 1, 1)
    return SourceModel(tensors, config, tokenizer, gen_json, str(src.resolve()), "gguf")
