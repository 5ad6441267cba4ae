"""Random-weight Llama checkpoints of a chosen size, with the tensor shapes and
count of real Llama-family models, for load benchmarks without downloads."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import InvalidRequestError
from ember.store.writer import save_tensors

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
}


def parse_size(text: str) -> int:
    """Bytes from "2GB", "20MB", "512MiB" or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidRequestError(f"cannot read size {text!r}: use e.g. 20MB, 2GB or 512MiB", param="size")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim  # q, o; k, v
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden  # mlp; two norms

    def fixed_params(self, tied: bool = False) -> int:
        """Embeddings, lm_head (unless tied to them) and the final norm."""
        return (1 if tied else 2) * self.vocab * self.hidden + self.hidden


# Real Llama-family shapes, smallest first: tiny, SmolLM2-135M, SmolLM2-360M,
# TinyLlama-1.1B, Llama-2-7B, Llama-2-13B.
LADDER = (
    LlamaShape(128, 352, 4, 4, 8192),
    LlamaShape(576, 1536, 9, 3, 49152),
    LlamaShape(960, 2560, 15, 5, 49152),
    LlamaShape(2048, 5632, 32, 4, 32000),
    LlamaShape(4096, 11008, 32, 32, 32000),
    LlamaShape(5120, 13824, 40, 40, 32000),
)


MIN_LAYERS = 8


def plan_llama(
    nbytes: int, itemsize: int, vocab: int | None = None, *, tied: bool = False, min_layers: int = MIN_LAYERS
) -> tuple[LlamaShape, int]:
    """The largest ladder shape with room for `min_layers` layers (real models are
    deep, not one giant layer), and the layer count that brings the checkpoint
    closest to `nbytes`. `vocab` replaces the ladder's vocabulary size (to match
    a tokenizer shipped with the checkpoint); `tied`: lm_head is the embeddings (as
    in SmolLM2), which leaves a small model more of its bytes for layers."""
    params = nbytes // itemsize
    ladder = LADDER if vocab is None else tuple(dataclasses.replace(s, vocab=vocab) for s in LADDER)
    shape = ladder[0]
    for s in ladder:
        if s.fixed_params(tied) + min_layers * s.layer_params() <= params:
            shape = s
    layers = max(1, round((params - shape.fixed_params(tied)) / shape.layer_params()))
    return shape, layers


def random_llama_tensors(
    shape: LlamaShape, layers: int, dtype: torch.dtype, seed: int = 0, *, tied: bool = False
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)

    def w(*dims: int) -> torch.Tensor:
        return torch.empty(dims, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    tensors = {"model.embed_tokens.weight": w(shape.vocab, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": w(h, h),
                p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h),
                p + "self_attn.o_proj.weight": w(h, h),
                p + "mlp.gate_proj.weight": w(i, h),
                p + "mlp.up_proj.weight": w(i, h),
                p + "mlp.down_proj.weight": w(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            }
        )
    tensors["model.norm.weight"] = torch.ones(h, dtype=dtype)
    if not tied:
        tensors["lm_head.weight"] = w(shape.vocab, h)
    return tensors


def make_random_llama(
    dest: Path,
    nbytes: int,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    vocab: int | None = None,
    files: Mapping[str, bytes | Path] | None = None,
    tied: bool = False,
    min_layers: int = MIN_LAYERS,
) -> Path:
    """Write a random-weight Llama checkpoint of about `nbytes` at `dest`. `files`
    adds checkpoint files (e.g. "model/tokenizer.json"); `vocab` sizes the
    embeddings for that tokenizer; `tied` and `min_layers` as plan_llama's."""
    if dtype not in ("bfloat16", "float32"):
        raise InvalidRequestError(
            f"random Llama dtype must be bfloat16 or float32, not {dtype!r}", param="dtype"
        )
    torch_dtype = getattr(torch, dtype)
    shape, layers = plan_llama(nbytes, torch_dtype.itemsize, vocab, tied=tied, min_layers=min_layers)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": tied,
        "dtype": dtype,
    }
    tensors = random_llama_tensors(shape, layers, torch_dtype, seed, tied=tied)
    metadata = {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "dtype": dtype,
        "source": "random-llama",
    }
    extra: dict[str, bytes | Path] = {
        **(files or {}),
        "model/config.json": json.dumps(config, indent=2).encode(),
    }
    save_tensors(tensors, dest, metadata=metadata, files=extra)
    return dest


def cached_random_llama(
    cache: Path,
    nbytes: int,
    *,
    dtype: str = "float32",
    seed: int = 0,
    vocab: int | None = None,
    files: Mapping[str, bytes | Path] | None = None,
    tied: bool = False,
    min_layers: int = MIN_LAYERS,
) -> Path:
    """make_random_llama's checkpoint, made once under `cache` (keyed by its arguments
    but `files`, which are the caller's to keep the same) and reused by
    every later call. Written under a temporary name first, so a run stopped halfway
    leaves no half checkpoint behind that name."""
    tie = "-tied" if tied else ""
    dest = cache / f"llama-{nbytes}-{dtype}-seed{seed}-vocab{vocab or 'ladder'}{tie}-min{min_layers}"
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_random_llama(
        partial, nbytes, dtype=dtype, seed=seed, vocab=vocab, files=files, tied=tied, min_layers=min_layers
    )
    try:
        partial.rename(dest)
    except OSError:  # another process made it first
        shutil.rmtree(partial, ignore_errors=True)
    return dest
