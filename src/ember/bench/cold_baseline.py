"""The baseline of `ember bench cold`: a serving process without Ember starts a
model with transformers' `from_pretrained` from a safetensors copy of the same
weights (page cache dropped first), then runs the same generation.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.bench.load import unique_tensors
from ember.bench.page_cache import evict_page_cache
from ember.store.format import MODEL_DIR
from ember.store.loader import load_tensors


@dataclass(frozen=True)
class SafetensorsCopy:
    """A transformers-loadable directory: config, tokenizer, model.safetensors."""

    path: Path
    dtype: torch.dtype

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file())


@dataclass(frozen=True)
class BaselineSample:
    load_s: float  # tokenizer + from_pretrained, page cache cold
    first_token_s: float  # chat template, prefill, first token out of generate()
    tokens: int  # tokens generated in all


def write_safetensors_copy(ckpt: Path, dest: Path) -> SafetensorsCopy:
    """The checkpoint's tensors as one model.safetensors (tied tensors once, as
    transformers saves them) beside its model/ files, at `dest`."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in (ckpt / MODEL_DIR).iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    tensors = load_tensors(ckpt)
    dtype = next(iter(tensors.values())).dtype
    save_file(unique_tensors(tensors), str(dest / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    return SafetensorsCopy(dest, dtype)


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives
    (generate() puts the prompt first, then each new token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_cold_start(
    copy: SafetensorsCopy, messages: list[dict[str, str]], max_tokens: int
) -> BaselineSample:
    """Drop the copy's pages from the page cache, load tokenizer and model in this
    process, and generate `max_tokens` greedy tokens for `messages`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bars would interleave with the benchmark's table
    evict_page_cache(copy.files())
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(copy.path)
    model = AutoModelForCausalLM.from_pretrained(copy.path, dtype=copy.dtype).eval()
    loaded = time.perf_counter()
    ids: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    streamer = _FirstToken()
    with torch.inference_mode():
        out = model.generate(
            **ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, streamer=streamer
        )
    tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert streamer.first_at is not None
    tokens = int(out.shape[1] - ids["input_ids"].shape[1])
    del model
    return BaselineSample(loaded - start, streamer.first_at - loaded, tokens)
