"""EngineConfig: the knobs of one instance engine, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ember.engine.options import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_SCHEDULER,
    DEFAULT_SWAP,
    SWAP_MODES,
)
from ember.engine.policies import policy
from ember.engine.threads import check_num_threads
from ember.errors import InvalidRequestError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
MAX_DEFAULT_MODEL_LEN = 8192
DEFAULT_CPU_KV_BYTES = 512 * 2**20
DEFAULT_GPU_KV_FRACTION = 0.5  # of the free accelerator memory once the weights are in


def _fail(param: str, message: str) -> None:
    raise InvalidRequestError(message, param=param)


@dataclass(frozen=True)
class EngineConfig:
    """Limits and placement of one engine. Every field has a default.

    max_num_seqs: most sequences in one batch (32).
    max_num_batched_tokens: most tokens computed in one iteration, prefill and decode
        together; longer prompts are prefilled in chunks of at most this (2048).
    max_model_len: longest prompt + output (None: the model's max_position_embeddings
        capped at 8192, and at what the KV cache holds).
    block_size: tokens per KV cache block (16).
    kv_cache_bytes: the KV cache budget (None: 512 MiB on CPU, half the accelerator's
        free memory after the weights on CUDA).
    dtype: "auto" (the weights' dtype) or float32 / float16 / bfloat16 / float64;
        another dtype than the weights' converts them (a copy).
    device: "cuda" when available, else "cpu" (None picks).
    scheduler: "mlfq" (FastServe's skip-join multi-level feedback queue: short jobs
        overtake long ones, so mean completion time drops), "fcfs" (first come first
        served, continuous batching, what vLLM does), "srpt" (shortest remaining
        processing time from each request's max_tokens: an oracle for evaluation) or
        "gittins" (each job's Gittins index under the output lengths the instance
        learns from its own requests: FCFS-like for similar lengths, MLFQ-like for
        heavy tails).
    swap: what happens to the KV cache of a job pushed off the device (mlfq, srpt, gittins):
        "proactive" (FastServe: swap the last-to-run jobs out to host memory before
        blocks run short, keep a reserve free for arrivals, and swap the next-to-run
        back in ahead of time, overlapped with computation), "reactive" (swap out only
        when an allocation fails, swap in when the job is scheduled) or "off"
        (recompute, as vLLM does). Recomputation is the fallback when host space is full.
    swap_bytes: the host swap space budget (None: as large as the device KV budget, so
        every block the device holds can be parked once; 0 turns swapping off).
    swap_reserve_fraction: proactive mode keeps this fraction of device blocks free for
        new arrivals (0.05: room for a prefill or two without swapping on their path).
    mlfq_base_quantum_s: the top queue's quantum (None: the measured time of one decode
        iteration, so a job in the top queue runs one token before it is demoted,
        the finest granularity at which preemption can help).
    mlfq_num_queues: queues, each quantum twice the one above (8: the bottom quantum is
        128 decode iterations, past most outputs, so only the long tail shares it).
    mlfq_starvation_s: a job that waited this long is promoted to the top queue (None:
        twice the bottom queue's quantum, so a long job is delayed at most about two
        rounds of the longest quantum); gittins runs such a job next (None: 256 decode
        iterations, the same time).
    num_threads: torch's CPU threads (None: EMBER_NUM_THREADS, else the CPUs the process
        may use: its affinity capped by its cgroup's quota). One setting per process,
        applied when an engine loads (ember.engine.threads).
    """

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_bytes: int | None = None
    dtype: str = "auto"
    device: str | None = None
    scheduler: str = DEFAULT_SCHEDULER
    swap: str = DEFAULT_SWAP
    swap_bytes: int | None = None
    swap_reserve_fraction: float = 0.05
    mlfq_base_quantum_s: float | None = None
    mlfq_num_queues: int = 8
    mlfq_starvation_s: float | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            _fail("max_model_len", f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            _fail("kv_cache_bytes", f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            _fail("dtype", f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        policy(self.scheduler)  # InvalidRequestError naming the known policies
        if self.swap not in SWAP_MODES:
            _fail("swap", f"unknown swap mode {self.swap!r}; known: {', '.join(SWAP_MODES)}")
        if self.swap_bytes is not None and self.swap_bytes < 0:
            _fail("swap_bytes", f"swap_bytes must be >= 0, got {self.swap_bytes}")
        if not 0 <= self.swap_reserve_fraction < 1:
            _fail(
                "swap_reserve_fraction",
                f"swap_reserve_fraction must be in [0, 1): {self.swap_reserve_fraction}",
            )
        if not isinstance(self.mlfq_num_queues, int) or self.mlfq_num_queues < 1:
            _fail("mlfq_num_queues", f"mlfq_num_queues must be a positive integer: {self.mlfq_num_queues!r}")
        for name in ("mlfq_base_quantum_s", "mlfq_starvation_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                _fail(name, f"{name} must be positive, got {value}")
        if self.num_threads is not None:
            check_num_threads(self.num_threads, "num_threads")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                _fail("device", f"not a device: {self.device!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtype(self, weights_dtype: torch.dtype) -> torch.dtype:
        return weights_dtype if self.dtype == "auto" else DTYPES[self.dtype]

    def default_kv_bytes(self, device: torch.device) -> int:
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * DEFAULT_GPU_KV_FRACTION)
        return DEFAULT_CPU_KV_BYTES

    def resolve_max_model_len(self, max_position_embeddings: int, kv_capacity_tokens: int) -> int:
        """The context length the engine serves, given the model and the KV pool.

        An explicit max_model_len larger than the model's positions or the KV pool is an
        error; the default is capped by both.
        """
        if self.max_model_len is None:
            return min(max_position_embeddings, MAX_DEFAULT_MODEL_LEN, kv_capacity_tokens)
        if self.max_model_len > max_position_embeddings:
            _fail(
                "max_model_len",
                f"max_model_len {self.max_model_len} exceeds the model's {max_position_embeddings} positions",
            )
        if self.max_model_len > kv_capacity_tokens:
            _fail(
                "max_model_len",
                f"max_model_len {self.max_model_len} does not fit the KV cache "
                f"({kv_capacity_tokens} tokens); raise kv_cache_bytes",
            )
        return self.max_model_len

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
