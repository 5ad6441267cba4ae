"""What `ember bench serve` sends: prompts, output lengths and arrival times, from a
trace or vLLM's `random` dataset (token-id prompts of exact lengths), or `mixed` (text
prompts any OpenAI server takes, llama.cpp's included: 20-120 words; outputs 8-32 tokens
for 80% of requests and 120-240 for the rest, the mix where short jobs wait behind long
ones under FCFS)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.bench.arrivals import gamma_arrivals
from ember.bench.workload import read_trace
from ember.errors import InvalidRequestError

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: `prompt` is `input_len` token ids, or text of `input_len`
    words; `output_len` is max_tokens."""

    prompt: list[int] | str
    input_len: int
    output_len: int
    arrival_s: float  # seconds after the start of the run


@dataclass(frozen=True)
class Workload:
    requests: list[BenchRequest]
    dataset: str
    scaling: dict[str, Any] = field(default_factory=dict)  # how lengths and rates were scaled


@dataclass(frozen=True)
class WorkloadSpec:
    """The dataset flags of `ember bench serve`, as vLLM's serving benchmark names them."""

    dataset: str = "random"  # "random", "mixed" or "trace:PATH"
    num_prompts: int = 100
    request_rate: float | None = None  # None: a trace's own times, or inf for `random`
    burstiness: float = 1.0
    seed: int = 0
    vocab_size: int = DEFAULT_VOCAB_SIZE
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    length_scale: float = 1.0
    rate_scale: float = 1.0


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """`length` random token ids from a safe range of the vocabulary: above the special
    tokens that tokenizers keep at low ids, below the padding some vocabularies end with."""
    low = min(1000, vocab_size // 4)
    high = vocab_size - 1 - min(256, vocab_size // 8)
    return [rng.randint(low, high) for _ in range(length)]


# Plain words for text prompts: common, single-token-ish in most vocabularies.
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three house river garden window story "
    "music light water city letter market winter morning table paper doctor engine forest bridge"
)
_WORDS = tuple(_WORD_TEXT.split())
MIXED_PROMPT_WORDS = (20, 120)
MIXED_SHORT_OUTPUT, MIXED_LONG_OUTPUT, MIXED_LONG_SHARE = (8, 32), (120, 240), 0.2


def _mixed(spec: WorkloadSpec, rng: random.Random) -> list[tuple[str, int, int]]:
    """(text prompt, its words, output tokens) for each request of the mixed dataset."""
    out = []
    for _ in range(spec.num_prompts):
        words = rng.randint(*MIXED_PROMPT_WORDS)
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        span = MIXED_LONG_OUTPUT if rng.random() < MIXED_LONG_SHARE else MIXED_SHORT_OUTPUT
        out.append((text, words, rng.randint(*span)))
    return out


def _random_lengths(spec: WorkloadSpec, rng: random.Random) -> list[tuple[int, int]]:
    r = spec.random_range_ratio
    if not 0 <= r < 1:
        raise InvalidRequestError("--random-range-ratio must be in [0, 1)")
    if spec.random_input_len < 1 or spec.random_output_len < 1:
        raise InvalidRequestError("--random-input-len and --random-output-len must be at least 1")

    def bounds(n: int) -> tuple[int, int]:
        return max(1, math.floor(n * (1 - r))), max(1, math.ceil(n * (1 + r)))

    (in_lo, in_hi), (out_lo, out_hi) = bounds(spec.random_input_len), bounds(spec.random_output_len)
    return [(rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)) for _ in range(spec.num_prompts)]


def build_workload(spec: WorkloadSpec) -> Workload:
    """The requests of one run. With a trace, arrivals follow the trace's (scaled) times
    unless a request rate is given; the random dataset uses the gamma process."""
    if spec.num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be at least 1")
    if spec.vocab_size < 16:
        raise InvalidRequestError("--vocab-size is too small")
    rng = random.Random(spec.seed)
    scaling: dict[str, Any] = {}
    arrivals: list[float] | None = None
    texts: list[str] | None = None
    if spec.dataset == "mixed":
        mixed = _mixed(spec, rng)
        texts = [text for text, _, _ in mixed]
        lengths = [(words, n_out) for _, words, n_out in mixed]
        scaling = {"prompt_words": list(MIXED_PROMPT_WORDS), "long_output_share": MIXED_LONG_SHARE}
    elif spec.dataset == "random":
        lengths = _random_lengths(spec, rng)
        scaling = {
            "random_input_len": spec.random_input_len,
            "random_output_len": spec.random_output_len,
            "random_range_ratio": spec.random_range_ratio,
        }
    elif spec.dataset.startswith("trace:"):
        path = Path(spec.dataset.removeprefix("trace:")).expanduser()
        trace = read_trace(
            path, num_requests=spec.num_prompts, length_scale=spec.length_scale, rate_scale=spec.rate_scale
        )
        lengths = [(t.prompt_tokens, t.output_tokens) for t in trace]
        scaling = {"trace": str(path), "length_scale": spec.length_scale, "rate_scale": spec.rate_scale}
        if spec.request_rate is None:
            arrivals = [t.arrival_s for t in trace]
            span = arrivals[-1]
            scaling["arrivals"] = "trace"
            scaling["trace_request_rate"] = (len(trace) - 1) / span if span > 0 else None
    else:
        raise InvalidRequestError(f"unknown dataset {spec.dataset!r}: use 'random', 'mixed' or 'trace:PATH'")
    if arrivals is None:
        rate = math.inf if spec.request_rate is None else spec.request_rate
        arrivals = gamma_arrivals(len(lengths), rate, spec.burstiness, rng)
        scaling["arrivals"] = f"gamma(rate={rate}, burstiness={spec.burstiness})"
    prompts: list[list[int] | str] = []
    prompts += texts or [random_prompt(rng, n_in, spec.vocab_size) for n_in, _ in lengths]
    requests = [
        BenchRequest(prompt, n_in, n_out, at)
        for prompt, (n_in, n_out), at in zip(prompts, lengths, arrivals, strict=True)
    ]
    return Workload(requests, spec.dataset, scaling)
