"""Engine: the iteration loop of one instance (schedule, run the model, post-process).

Parked sequences (EngineRequest.park, live migration's destination side) sit outside
the scheduler with their KV blocks kept: a later request with the same id and more
tokens takes them over, and one left longer than `park_ttl_s` is freed.

Failures: an unexpected error in an iteration ends the requests it touched, never the
engine. The scheduler's error fails every request (which ones it touched is unknown),
the forward's or the sampler's the batch's, one request's own (its detokenizer, its
logprobs) that request alone; each leaves with its error (take_failed) and its KV
blocks freed, and the next iteration runs the others.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from ember.engine.block_manager import BlockManager
from ember.engine.config import EngineConfig
from ember.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from ember.engine.model_runner import CausalLMLike, KVCacheLike, ModelRunner
from ember.engine.output_lengths import OutputLengths
from ember.engine.policies import PolicyOptions, policy
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.request import (
    CompletionOutput,
    EngineRequest,
    EngineStats,
    Logprob,
    RequestMetrics,
    RequestOutput,
    RequestSnapshot,
    TokenLogprobs,
)
from ember.engine.sampler import SampleResult, export_state, import_state, new_generator
from ember.engine.scheduler import Clock, SchedulerOutput
from ember.engine.sequence import Sequence, SequenceStatus
from ember.engine.swapper import KVSwapper
from ember.engine.validation import validate_request
from ember.errors import EmberError, InternalError, InvalidRequestError

log = logging.getLogger(__name__)

PARK_TTL_S = 60.0  # a parked sequence nobody took over by then is freed

# Stands in for the model forward and sampling (a replay of the schedulers with a
# cost-model clock, ember.bench.sched_replay): the sampled token of each sequence of
# the batch that samples, in batch order.
RunBatch = Callable[[SchedulerOutput], list[int]]


class Engine:
    """Runs requests to completion, one iteration per step(); not thread-safe.

    `tokenizer` may be None (token ids in, token ids out, no text, no stop strings).
    `lengths`: the output lengths this instance learns from its finished (and, censored,
    aborted) requests, which the gittins policy ranks by (None: the prior, in memory).
    """

    park_ttl_s = PARK_TTL_S

    def __init__(
        self,
        model: CausalLMLike,
        kv_cache: KVCacheLike,
        config: EngineConfig,
        *,
        tokenizer: Tokenizer | None = None,
        eos_token_ids: Iterable[int] = (),
        clock: Clock = time.monotonic,
        profile: PrefillProfile | None = None,
        lengths: OutputLengths | None = None,
        run_batch: RunBatch | None = None,
        timer: Clock = time.perf_counter,
    ) -> None:
        """`run_batch`: replaces the model forward and sampling (the model and cache then
        only give their sizes). `timer`: what times an iteration for the profile (a
        virtual clock in a replay, like `clock`)."""
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = model.spec.vocab_size
        self.clock = clock
        self.blocks = BlockManager(kv_cache.num_blocks, kv_cache.block_size)
        self.max_model_len = config.resolve_max_model_len(
            model.spec.max_position_embeddings, self.blocks.capacity_tokens
        )
        self.profile = profile or PrefillProfile()
        self.lengths = lengths if lengths is not None else OutputLengths.prior()
        scheduling = policy(config.scheduler)
        host_blocks = self._host_blocks(config, kv_cache) if scheduling.swaps else 0
        self.swapper = KVSwapper(self.blocks, kv_cache if host_blocks else None, host_blocks)
        self.scheduler = scheduling.build(
            self.swapper,
            PolicyOptions(
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                clock=clock, profile=self.profile, swap=config.swap,
                reserve_fraction=config.swap_reserve_fraction, base_quantum_s=config.mlfq_base_quantum_s,
                num_queues=config.mlfq_num_queues, starvation_s=config.mlfq_starvation_s,
                lengths=self.lengths,
            ),
        )  # fmt: skip
        self.runner = ModelRunner(model, kv_cache, self.blocks, config.torch_device)
        self.run_batch = run_batch
        self.timer = timer
        self._seqs: dict[str, Sequence] = {}
        self._parked: dict[str, tuple[Sequence, float]] = {}  # id -> (sequence, parked at)
        self._newly_parked: list[tuple[str, int]] = []  # (id, tokens cached) since take_parked()
        self._failed: list[tuple[str, EmberError]] = []  # (id, error) since take_failed()

    @staticmethod
    def _host_blocks(config: EngineConfig, kv_cache: KVCacheLike) -> int:
        if config.swap == "off":
            return 0
        if config.swap_bytes is None:
            return kv_cache.num_blocks
        return config.swap_bytes // kv_cache.block_bytes

    # -- requests -------------------------------------------------------------------

    def validate(self, request: EngineRequest) -> None:
        """Raise InvalidRequestError (or a subclass) if the engine cannot serve it."""
        validate_request(request, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        if request.request_id in self._seqs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")

    def add_request(self, request: EngineRequest) -> None:
        """Admit a request (InvalidRequestError if it cannot be served). Whatever fails
        while it joins leaves nothing of it behind: no sequence, no KV blocks."""
        self.validate(request)
        try:
            self._admit(request)
        except BaseException:
            rid = request.request_id
            self._seqs.pop(rid, None)
            self.scheduler.abort(rid)
            self._parked.pop(rid, None)
            self.swapper.free(rid)  # a parked cache it took over
            raise

    def _admit(self, request: EngineRequest) -> None:
        p = request.sampling_params
        if request.sampler_state is not None:
            generator = import_state(request.sampler_state)
        else:  # a request that samples always has a seed (drawn at admission); greedy draws nothing
            generator = new_generator(p.seed if p.seed is not None else 0)
        seq = Sequence(
            request.request_id,
            list(request.prompt_token_ids),
            p,
            RequestMetrics(arrival_time=self.clock()),
            output_token_ids=list(request.output_token_ids),
            prompt=request.prompt,
            park=request.park,
            generator=generator,
        )
        self._take_over_parked(seq)
        if seq.park and seq.num_computed_tokens == seq.num_tokens:  # nothing new to compute
            self._park(seq)
            return
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=p.skip_special_tokens,
                stop=p.stop,
            )
            for token in request.output_token_ids:
                if not self._is_stop_token(token, seq):
                    seq.detokenizer.append(token)
            seq.detokenizer.skip_emitted()  # the source instance already streamed this text
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    # -- parking (live migration) -----------------------------------------------------

    def _take_over_parked(self, seq: Sequence) -> None:
        """Give `seq` the cache of the parked sequence of its id when the parked tokens
        are a prefix of its own; free that cache otherwise."""
        entry = self._parked.pop(seq.request_id, None)
        if entry is None:
            return
        parked = entry[0]
        n = parked.num_computed_tokens
        if n <= seq.num_tokens and parked.tokens(0, n) == seq.tokens(0, n):
            # a sequence that samples recomputes at least its last token: its logits
            seq.num_computed_tokens = n if seq.park else min(n, seq.num_tokens - 1)
        else:
            self.swapper.free(seq.request_id)

    def _park(self, seq: Sequence) -> None:
        self._parked[seq.request_id] = (seq, self.clock())
        self._newly_parked.append((seq.request_id, seq.num_computed_tokens))

    def take_parked(self) -> list[tuple[str, int]]:
        """(request id, tokens cached) of the sequences parked since the last call."""
        out, self._newly_parked = self._newly_parked, []
        return out

    def expire_parked(self) -> list[str]:
        """Free the parked sequences older than park_ttl_s; their ids."""
        now = self.clock()
        old = [rid for rid, (_, at) in self._parked.items() if now - at >= self.park_ttl_s]
        for rid in old:
            self._release_parked(rid)
        return old

    def _release_parked(self, request_id: str) -> bool:
        if self._parked.pop(request_id, None) is None:
            return False
        self.swapper.free(request_id)
        return True

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def abort(self, request_id: str) -> tuple[RequestOutput, RequestSnapshot] | None:
        """Stop a request now and free its KV blocks: its last output (finish_reason
        "abort") and a snapshot from which resume() continues it. None if unknown or
        parked (a parked sequence's cache is freed)."""
        if self._release_parked(request_id):
            return None
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(request_id)
        assert seq.generator is not None
        snapshot = RequestSnapshot(
            request_id,
            tuple(seq.prompt_token_ids),
            tuple(seq.output_token_ids),
            seq.params,
            export_state(seq.generator),
        )
        self._finish(seq, "abort", None)
        return self._output(seq, [], [], ""), snapshot

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def stats(self) -> EngineStats:
        """Load and memory counters (see EngineStats)."""
        s, w = self.scheduler, self.swapper
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=self.blocks.usage,
            num_preemptions=s.num_preemptions,
            num_swaps_out=w.num_swaps_out,
            num_swaps_in=w.num_swaps_in,
            swap_bytes_out=w.swap_bytes_out,
            swap_bytes_in=w.swap_bytes_in,
            num_recomputations=s.num_recomputations,
        )

    def close(self) -> None:
        """Finish the swap transfers in flight; save the iteration-time profile and the
        output lengths."""
        for rid in list(self._parked):
            self._release_parked(rid)
        self.swapper.close()
        self.profile.save()
        self.lengths.save()

    # -- the loop -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration; a delta output for every sequence that got a token. The
        requests an error ends are left for take_failed()."""
        try:
            batch = self.scheduler.schedule()
        except Exception as e:  # which requests it touched is unknown: all of them
            self._fail(list(self._seqs), e)
            return []
        samples: list[SampleResult] = []
        if not batch.is_empty:
            try:
                samples = self._execute(batch)
            except Exception as e:  # the forward or the sampler: every request of the batch
                self._fail([s.seq.request_id for s in batch.scheduled], e)
                return []
        return self._postprocess(batch, samples)

    def _execute(self, batch: SchedulerOutput) -> list[SampleResult]:
        self.swapper.prepare(s.seq.request_id for s in batch.scheduled)
        loading = getattr(self.runner.model, "loading", None) is not None
        start = self.timer()
        if self.run_batch is not None:
            samples = [SampleResult(token) for token in self.run_batch(batch)]
        else:
            samples = self.runner.execute(batch)
        if not loading:  # an iteration that waited for weights to arrive is no sample of its cost
            self.profile.observe(
                [s.num_new_tokens for s in batch.scheduled],
                [s.start for s in batch.scheduled],
                self.timer() - start,
            )
        return samples

    def _postprocess(self, batch: SchedulerOutput, samples: list[SampleResult]) -> list[RequestOutput]:
        sampling = [s.seq for s in batch.scheduled if s.samples]  # before any token is appended
        outputs: list[RequestOutput] = []
        failed: list[tuple[str, Exception]] = []
        for seq, sample in zip(sampling, samples, strict=True):
            try:
                outputs.append(self._append(seq, sample))
            except Exception as e:  # this request's own: it alone ends
                failed.append((seq.request_id, e))
        try:
            self.scheduler.update(batch, [seq.request_id for seq in sampling if seq.is_finished])
            self._park_computed(batch)
        except Exception as e:
            self._fail([s.seq.request_id for s in batch.scheduled], e)
            return []
        for request_id, error in failed:
            self._fail([request_id], error)
        return outputs

    def _park_computed(self, batch: SchedulerOutput) -> None:
        for s in batch.scheduled:
            seq = s.seq
            if seq.park and seq.num_computed_tokens == seq.num_tokens:
                self.scheduler.detach(seq.request_id)
                self._seqs.pop(seq.request_id, None)
                self._park(seq)

    def _fail(self, request_ids: list[str], cause: Exception) -> None:
        """End the requests with `cause` (an EmberError as it is, anything else as an
        InternalError) and free their KV blocks; take_failed() hands them out."""
        log.error("%d request(s) failed in the engine: %s", len(request_ids), cause, exc_info=cause)
        error: EmberError
        if isinstance(cause, EmberError):
            error = cause
        else:
            error = InternalError(f"the engine failed running this request: {type(cause).__name__}: {cause}")
            error.__cause__ = cause
        for request_id in request_ids:
            self._seqs.pop(request_id, None)
            self.scheduler.abort(request_id)
            self._failed.append((request_id, error))

    def take_failed(self) -> list[tuple[str, EmberError]]:
        """(request id, error) of the requests an error ended since the last call: they
        have left the engine and freed their KV blocks; their callers must be told."""
        out, self._failed = self._failed, []
        return out

    def _is_stop_token(self, token: int, seq: Sequence) -> bool:
        return token in seq.params.stop_token_ids or (
            token in self.eos_token_ids and not seq.params.ignore_eos
        )

    def _append(self, seq: Sequence, sample: SampleResult) -> RequestOutput:
        token, p = sample.token_id, seq.params
        seq.output_token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = self.clock()
        stop_string = None
        if seq.detokenizer is not None and not self._is_stop_token(token, seq):
            stop_string = seq.detokenizer.append(token)
        if token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif token in self.eos_token_ids and not p.ignore_eos:
            self._finish(seq, "stop", None)
        elif stop_string is not None:
            self._finish(seq, "stop", stop_string)
        elif seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)
        text = seq.detokenizer.take_delta(seq.is_finished) if seq.detokenizer is not None else ""
        return self._output(seq, [token], self._logprobs(seq, sample), text)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason  # type: ignore[assignment]
        seq.stop_reason = stop_reason
        seq.metrics.finish_time = self.clock()
        self._seqs.pop(seq.request_id, None)
        self.lengths.observe(seq.num_generated, finished=reason != "abort")  # an abort: censored

    def _logprobs(self, seq: Sequence, sample: SampleResult) -> list[TokenLogprobs]:
        if sample.logprob is None:
            return []

        def lp(token: int, value: float) -> Logprob:
            text = seq.detokenizer.token_text(token) if seq.detokenizer is not None else ""
            return Logprob(token, text, value)

        top = tuple(lp(t, v) for t, v in sample.top_logprobs)
        return [TokenLogprobs(lp(sample.token_id, sample.logprob), top)]

    def _output(
        self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs], text: str
    ) -> RequestOutput:
        completion = CompletionOutput(
            0,
            text,
            tokens,
            seq.finish_reason,
            seq.stop_reason,
            logprobs if seq.params.logprobs else None,
        )
        return RequestOutput(
            seq.request_id,
            seq.prompt,
            seq.prompt_token_ids,
            [completion],
            seq.is_finished,
            dataclasses.replace(seq.metrics),
        )
