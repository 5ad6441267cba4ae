"""Measurements of the model half of the engine: prefill and decode speed of a CausalLM
over the paged cache, the same for a transformers model with its own cache, and the
memory-bandwidth floor of a batch-1 decode step (every weight byte read once)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.engine.attention import AttentionMetadata
from ember.engine.kv_cache import KVCache
from ember.engine.model import CausalLM
from ember.store.format import MODEL_DIR


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float  # multi-threaded streaming read
    weight_bytes: int

    @property
    def floor_s(self) -> float:
        """Shortest possible batch-1 decode step: the weights read once."""
        return self.weight_bytes / self.bytes_per_s


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (a tied embedding counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def measure_bandwidth_floor(
    model_bytes: int, *, buffer_bytes: int = 2 << 30, threads: int = 2, repeats: int = 5
) -> Bandwidth:
    """Streaming read bandwidth (torch.sum over a buffer far larger than the caches,
    with `threads` torch threads; median of `repeats`) and the floor it implies."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # distinct values on every page, written once before timing
        buf = torch.arange(buffer_bytes // 4, dtype=torch.float32)
        median = statistics.median(_timed(lambda: buf.sum()) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return Bandwidth(buffer_bytes / median, model_bytes)


def _timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    t0 = time.perf_counter()
    fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _step(
    model: CausalLM, kv: KVCache, ids: list[list[int]], ctx: list[int], block_size: int
) -> torch.Tensor:
    """One forward over sequence i's new tokens ids[i] after ctx[i] cached ones; sequence
    i owns blocks [i * per_seq, (i + 1) * per_seq). Returns next tokens (greedy) [B]."""
    per_seq = kv.num_blocks // len(ids)
    q_lens = [len(t) for t in ids]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(ids))]
    meta = AttentionMetadata.build(q_lens, ctx, tables, block_size, kv.device)
    flat = torch.tensor([t for seq in ids for t in seq], device=kv.device)
    pos = torch.tensor([c + j for c, q in zip(ctx, q_lens, strict=True) for j in range(q)], device=kv.device)
    hidden = model(flat, pos, meta, kv)
    last = torch.tensor([sum(q_lens[: i + 1]) - 1 for i in range(len(ids))], device=kv.device)
    return model.compute_logits(hidden[last]).argmax(-1)


def _cache(model: CausalLM, batch: int, tokens: int, block_size: int) -> KVCache:
    per_seq = -(-tokens // block_size)
    dtype = model.lm_head.dtype
    return KVCache(model.spec, batch * per_seq, block_size, dtype, model.device)


def time_prefill(model: CausalLM, prompt_len: int = 512, *, block_size: int = 16) -> float:
    """Seconds for one prefill of a `prompt_len`-token prompt (logits for its last token)."""
    kv = _cache(model, 1, prompt_len, block_size)
    ids = torch.randint(0, model.spec.vocab_size, (prompt_len,)).tolist()
    with torch.inference_mode():
        return _timed(lambda: _step(model, kv, [ids], [0], block_size), kv.device)


def time_decode(
    model: CausalLM, batch: int, *, context_len: int = 128, steps: int = 8, block_size: int = 16
) -> float:
    """Median seconds of one decode step of `batch` sequences with `context_len` tokens
    already cached (the prefill is not timed)."""
    kv = _cache(model, batch, context_len + steps, block_size)
    prompts = torch.randint(0, model.spec.vocab_size, (batch, context_len)).tolist()
    times = []
    with torch.inference_mode():
        nxt = _step(model, kv, prompts, [0] * batch, block_size).tolist()
        for s in range(steps):
            t0 = time.perf_counter()
            nxt = _next(model, kv, nxt, [context_len + s] * batch)  # .tolist() synchronises
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _next(model: CausalLM, kv: KVCache, last: list[int], ctx: list[int]) -> list[int]:
    return _step(model, kv, [[t] for t in last], ctx, kv.block_size).tolist()  # type: ignore[no-any-return]


def time_hf_prefill(hf_model: Any, prompt_len: int = 512) -> float:
    """Seconds for one transformers forward over a `prompt_len`-token prompt."""
    ids = torch.randint(0, hf_model.config.vocab_size, (1, prompt_len))
    with torch.inference_mode():
        return _timed(lambda: hf_model(ids, use_cache=True, logits_to_keep=1))


def time_hf_decode(hf_model: Any, batch: int, *, context_len: int = 128, steps: int = 8) -> float:
    """Median seconds of one transformers decode step (its own DynamicCache)."""
    ids = torch.randint(0, hf_model.config.vocab_size, (batch, context_len))
    times = []
    with torch.inference_mode():
        out = hf_model(ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = hf_model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Comparison:
    label: str  # "prefill 512" or "decode b8"
    tokens: int  # tokens per timed call
    ours_s: float  # median seconds per call
    hf_s: float

    @property
    def ours_tps(self) -> float:
        return self.tokens / self.ours_s

    @property
    def hf_tps(self) -> float:
        return self.tokens / self.hf_s


def compare(
    model: CausalLM,
    hf_model: Any,
    *,
    batches: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 512,
    context_len: int = 128,
    rounds: int = 3,
) -> list[Comparison]:
    """Ours and transformers side by side on the same weights, interleaved, median of
    `rounds`."""
    cases: list[tuple[str, int, Callable[[], float], Callable[[], float]]] = [
        (
            f"prefill {prompt_len}",
            prompt_len,
            lambda: time_prefill(model, prompt_len),
            lambda: time_hf_prefill(hf_model, prompt_len),
        ),
    ]
    for b in batches:
        cases.append(
            (
                f"decode b{b}",
                b,
                lambda b=b: time_decode(model, b, context_len=context_len),  # type: ignore[misc]
                lambda b=b: time_hf_decode(hf_model, b, context_len=context_len),  # type: ignore[misc]
            )
        )
    results = []
    for label, tokens, ours, theirs in cases:
        ours_t, hf_t = [], []
        for _ in range(rounds):
            ours_t.append(ours())
            hf_t.append(theirs())
        results.append(Comparison(label, tokens, statistics.median(ours_t), statistics.median(hf_t)))
    return results


def hf_model(path: Path, weights: dict[str, torch.Tensor]) -> Any:
    """transformers' model over the very same tensors (assign=True: no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path / MODEL_DIR)
    # Built on the CPU (not meta) so its computed buffers (rotary frequencies) exist;
    # then every parameter is replaced by our tensor itself.
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
    model.load_state_dict(weights, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
