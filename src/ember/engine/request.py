"""Messages that cross the engine boundary: sampling parameters, submissions, outputs.

All are plain picklable dataclasses, so they can travel between threads, processes
and (for live migration) instances.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ember.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "abort"]

MAX_TOP_LOGPROBS = 20
# A seed is a signed 64-bit integer, as OpenAI's API defines it (and torch takes it).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. Validated on creation (InvalidRequestError).

    temperature 0 is greedy. top_k 0 or -1 means no top-k cut. `logprobs` returns the
    chosen token's log-probability under the raw model distribution (before penalties,
    bias, temperature and cuts), `top_logprobs` that many alternatives beside it.
    presence/frequency penalties and logit_bias follow OpenAI's definitions and see
    only the generated tokens. Stop strings are cut from the text (the stop string
    itself is not returned); stop_token_ids and eos end the completion with "stop".
    A request that samples without a seed gets a fresh one when it is admitted (see
    EngineRequest), so no two unseeded requests share their randomness.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        stop: object = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop))  # type: ignore[arg-type]
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()})
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.top_logprobs and not self.logprobs:
            object.__setattr__(self, "logprobs", True)
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be >= 1, got {self.n}")
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            f"max_tokens must be >= 1, got {self.max_tokens}",
        )
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"temperature must be >= 0, got {self.temperature}",
        )
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"top_k must be -1, 0 (no cut) or >= 1, got {self.top_k}")
        _check(
            self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (signed 64 bits), got {self.seed!r}",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, f"{name} must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias.items():
            _check(-100 <= bias <= 100, "logit_bias", f"logit_bias[{token}] must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Logprob:
    """One token and its log-probability; `token` is its text alone (may hold U+FFFD)."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `top_logprobs` most likely tokens."""

    chosen: Logprob
    top: tuple[Logprob, ...] = ()


def offset_seed(seed: int, offset: int) -> int:
    """`seed + offset` wrapped into the signed 64-bit range: the seed of the offset-th
    choice of a seeded request (n > 1), valid even for a seed at the top of the range."""
    return (seed + offset - SEED_MIN) % 2**64 + SEED_MIN


def fresh_seed() -> int:
    """A seed from the operating system's randomness (63 bits: any torch generator takes it)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class EngineRequest:
    """A submission. `output_token_ids` and `sampler_state` are set when resuming a
    request from its tokens (live migration): the engine recomputes the KV cache of
    prompt + outputs and continues; only tokens after them are returned.

    Admission: a request that samples (temperature > 0) and gives no seed gets one
    here, drawn from the OS (`fresh_seed`) into its sampling_params. Every request is
    made here (the Python API, the HTTP server, the chat), so each one gets fresh
    randomness, and the seed travels with the request to the relay that moves it and
    in its snapshot: a resumed request's sampler state can always be rebuilt from the
    seed and its token count (`sampler.state_after`), as for a seeded one.

    `park`: compute the KV cache of prompt + outputs, sample nothing, and keep the
    sequence parked under its id (live migration's rounds, while the source still
    generates). A later request with the same id whose tokens extend the parked ones
    (parked again, or run) computes only the tokens after them."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    prompt: str | None = None
    output_token_ids: tuple[int, ...] = ()
    sampler_state: bytes | None = None
    park: bool = False

    def __post_init__(self) -> None:
        p = self.sampling_params
        if p.seed is None and not p.greedy:
            object.__setattr__(self, "sampling_params", dataclasses.replace(p, seed=fresh_seed()))

    @classmethod
    def make(
        cls,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        prompt: str | None = None,
        output_token_ids: Sequence[int] = (),
        sampler_state: bytes | None = None,
        park: bool = False,
    ) -> EngineRequest:
        return cls(
            request_id,
            tuple(int(t) for t in prompt_token_ids),
            sampling_params,
            prompt,
            tuple(int(t) for t in output_token_ids),
            sampler_state,
            park,
        )


@dataclass(frozen=True)
class RequestSnapshot:
    """Everything needed to continue a request elsewhere: its tokens and sampler state.
    A sampling request's seed (its own, or the one drawn at admission) is
    `sampling_params.seed`: with the token count it rebuilds the sampler state."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    sampler_state: bytes


@dataclass
class CompletionOutput:
    """One completion. From the engine's step and the async stream these are deltas
    (new text and tokens only); LLM.generate returns them whole."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestMetrics:
    """Times in seconds of the engine's clock."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine's load and memory counters (the server's metrics).

    Counters are totals since the engine started: preemptions (a job stopped before it
    finished), swaps out / in (a job's KV blocks moved to / from host memory) and their
    bytes, recomputations (a job's KV cache dropped, to be computed again).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the device KV blocks
    num_preemptions: int
    num_swaps_out: int
    num_swaps_in: int
    swap_bytes_out: int
    swap_bytes_in: int
    num_recomputations: int

    @classmethod
    def total(cls, stats: Sequence[EngineStats], *, extra_waiting: int = 0) -> EngineStats:
        """Several instances' stats as one model's: counts summed, KV usage the highest."""
        return cls(
            num_running=sum(s.num_running for s in stats),
            num_waiting=sum(s.num_waiting for s in stats) + extra_waiting,
            kv_cache_usage=max((s.kv_cache_usage for s in stats), default=0.0),
            num_preemptions=sum(s.num_preemptions for s in stats),
            num_swaps_out=sum(s.num_swaps_out for s in stats),
            num_swaps_in=sum(s.num_swaps_in for s in stats),
            swap_bytes_out=sum(s.swap_bytes_out for s in stats),
            swap_bytes_in=sum(s.swap_bytes_in for s in stats),
            num_recomputations=sum(s.num_recomputations for s in stats),
        )
