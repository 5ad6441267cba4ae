"""Readers for what `ember store import` accepts: a Hugging Face directory of
safetensors (one file or sharded) and a GGUF file. Each gives a `SourceModel`:
tensors, config, tokenizer, generation config, and plans the import's progress once
it knows the sizes.

A GGUF file of an architecture the engine runs is parsed once (`gguf_file`) and
converted directly (`gguf_model`); while its weights are dequantised here, another
thread imports transformers and builds the config and the tokenizer. Files of other
architectures go through transformers' own GGUF loader (slower: it parses the file
several times and builds a model)."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.errors import CheckpointNotFoundError, InvalidRequestError, UnsupportedFeatureError
from ember.store.import_progress import DEQUANTISE, PARSE, READ, TOKENIZER, ImportTracker

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from ember.store.gguf_file import GgufFile

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


def read_safetensors_dir(src: Path, tracker: ImportTracker) -> SourceModel:
    """Every tensor of a Hugging Face safetensors directory, in its own dtype."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoTokenizer

    tracker.update(READ)
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
        nbytes = sum(p.stat().st_size for p in shards)
        tracker.plan([(READ, nbytes)], nbytes)
        done = 0
        for h in handles:
            for key in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[key] = h.get_tensor(key)
                done += tensors[key].numel() * tensors[key].element_size()
                tracker.update(READ, done, nbytes)
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


def read_gguf(src: Path, tracker: ImportTracker) -> SourceModel:
    """A GGUF file dequantised to float32 under Hugging Face names, with the config,
    tokenizer and generation config transformers' GGUF loader would give."""
    from ember.store.gguf_file import read_gguf_file
    from ember.store.gguf_model import DIRECT_ARCHITECTURES, config_fields, convert_tensors, output_bytes

    tracker.update(PARSE)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-gguf") as pool:
        pool.submit(_import_transformers)  # seconds of imports, started at once beside the rest
        gguf = read_gguf_file(src)
        if gguf.architecture not in DIRECT_ARCHITECTURES:
            return _read_gguf_with_transformers(src, tracker)
        header, nbytes = gguf.header_bytes, output_bytes(gguf)
        # the tokenizer's share is what is left of its thread's work once the weights are done
        tracker.plan([(PARSE, header), (DEQUANTISE, nbytes), (TOKENIZER, header)], nbytes)
        tracker.update(PARSE, 1, 1)
        fields = config_fields(gguf)
        described = pool.submit(_describe_gguf, src, gguf, fields)
        tensors = convert_tensors(gguf, fields, tracker.bytes_callback(DEQUANTISE))
        tracker.update(TOKENIZER)
        config, tokenizer, gen_json = described.result()
    tracker.update(TOKENIZER, 1, 1)
    return SourceModel(tensors, config, tokenizer, gen_json, str(src.resolve()), "gguf")


def _import_transformers() -> None:
    import transformers.integrations.gguf.gguf_tokenizer_mapping  # noqa: F401
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast  # noqa: F401


def _describe_gguf(
    src: Path, gguf: GgufFile, fields: dict[str, object]
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase | None, bytes]:
    from ember.store.gguf_model import build_config, build_tokenizer, generation_config_json

    config = build_config(dict(fields))
    try:
        tokenizer = build_tokenizer(gguf, config)
    except ImportError:  # a transformers without the GGUF tokenizer builder: its own loader
        tokenizer = _transformers_gguf_tokenizer(src)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"cannot build the tokenizer of GGUF file {src}: {exc}") from exc
    return config, tokenizer, generation_config_json(config)


def _transformers_gguf_tokenizer(src: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(src.parent), gguf_file=src.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidRequestError(f"cannot read GGUF file {src}: {exc}") from exc
    return tok


def _read_gguf_with_transformers(src: Path, tracker: ImportTracker) -> SourceModel:
    """A GGUF file of an architecture not converted here, dequantised to float32 by
    transformers. The model it loads refuses save_pretrained, so its state dict is
    taken instead; tied embeddings stay one tensor."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as transformers_logging

    tracker.update(READ, 0, 0)
    where, fname = str(src.parent), src.name
    if not sys.stderr.isatty():  # transformers' own bars would fill a log with carriage returns
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=fname, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidRequestError(f"cannot read GGUF file {src}: {exc}") from exc
    tokenizer = _transformers_gguf_tokenizer(src)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    tracker.plan([(READ, nbytes)], nbytes)
    tracker.update(READ, 1, 1)
    config = model.config
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    gen = model.generation_config
    gen_json = gen.to_json_string(use_diff=True).encode() if isinstance(gen, GenerationConfig) else None
    return SourceModel(tensors, config, tokenizer, gen_json, str(src.resolve()), "gguf")
