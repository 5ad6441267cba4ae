"""SRPTScheduler: shortest remaining processing time first, an oracle for evaluation.

It reads each job's output length from SamplingParams.max_tokens, which is the true
length only with ignore_eos (as the benchmarks send); a real server cannot know it.
Remaining time is the predicted prefill of the tokens still to compute plus one
decode iteration per remaining output token, from the instance's PrefillProfile; until
the profile has seen iterations, remaining tokens stand in for time.
"""

from __future__ import annotations

from ember.engine.priority_scheduler import PriorityScheduler
from ember.engine.sequence import Sequence


class SRPTScheduler(PriorityScheduler):
    def remaining(self, seq: Sequence) -> float:
        """Predicted seconds (or, before any measurement, tokens) of work left."""
        outputs = max(0, seq.params.max_tokens - seq.num_generated)
        to_compute = seq.num_tokens - seq.num_computed_tokens
        prefill = to_compute - 1 if seq.num_generated else to_compute  # a decode feeds 1 token
        decode_s = self.profile.decode_iteration_s
        if decode_s is None or not self.profile.ready:
            return outputs + prefill / self.max_num_batched_tokens
        return outputs * decode_s + (self.profile.predict_prefill(prefill) if prefill > 0 else 0.0)

    def ranked(self, now: float) -> list[Sequence]:
        return sorted(self.jobs.values(), key=self.remaining)  # stable: ties keep arrival order
