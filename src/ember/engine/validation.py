"""validate_request: every reason an engine refuses a request, as a clear error."""

from __future__ import annotations

from collections.abc import Iterable

from ember.engine.request import SEED_MAX, SEED_MIN, EngineRequest
from ember.engine.sampler import import_state
from ember.errors import ContextLengthError, InvalidRequestError, UnsupportedFeatureError


def _check_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"{param} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param=param
        )


def validate_request(request: EngineRequest, *, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidRequestError (or a subclass) if the request cannot be served."""
    p = request.sampling_params
    if p.n != 1:
        raise UnsupportedFeatureError(
            "the engine runs one completion per request; submit n requests (LLM.generate does)", param="n"
        )
    if p.seed is not None and not SEED_MIN <= p.seed <= SEED_MAX:  # params built around __post_init__
        raise InvalidRequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]", param="seed")
    if not request.prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    _check_ids(request.prompt_token_ids, vocab_size, "prompt")
    _check_ids(request.output_token_ids, vocab_size, "output_token_ids")
    _check_ids(p.stop_token_ids, vocab_size, "stop_token_ids")
    _check_ids(p.logit_bias, vocab_size, "logit_bias")
    total = len(request.prompt_token_ids) + len(request.output_token_ids)
    if total >= max_model_len:
        raise ContextLengthError(
            f"the prompt has {total} tokens but this model's context holds {max_model_len} "
            "(prompt and output together); shorten the prompt",
            param="prompt",
        )
    if len(request.output_token_ids) >= p.max_tokens:
        raise InvalidRequestError(
            f"the request already has {len(request.output_token_ids)} of its max_tokens={p.max_tokens}",
            param="max_tokens",
        )
    if request.sampler_state is not None:
        try:
            import_state(request.sampler_state)
        except (RuntimeError, ValueError) as e:
            raise InvalidRequestError(f"sampler_state is not a generator state: {e}") from e
