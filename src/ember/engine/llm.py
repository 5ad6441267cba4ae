"""LLM: offline batch generation over one engine (`from ember import LLM, SamplingParams`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeAlias

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.loader import load_engine
from ember.engine.options import DEFAULT_SCHEDULER
from ember.engine.request import CompletionOutput, EngineRequest, RequestOutput, SamplingParams, offset_seed
from ember.errors import InvalidRequestError

Prompt: TypeAlias = str | Mapping[str, Any]  # text, or {"prompt_token_ids": [...]}
Message: TypeAlias = Mapping[str, Any]  # {"role": ..., "content": ...}


def tokenize_prompt(engine: Engine, prompt: Prompt) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text or as {"prompt_token_ids": [...]}."""
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise InvalidRequestError(
                "this checkpoint has no tokenizer; send prompt_token_ids", param="prompt"
            )
        return prompt, list(engine.tokenizer.encode(prompt))
    if isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequestError("prompt_token_ids must be integers", param="prompt")
        return prompt.get("prompt"), list(ids)
    raise InvalidRequestError('a prompt is a string or {"prompt_token_ids": [...]}', param="prompt")


def _merge(deltas: list[RequestOutput]) -> CompletionOutput:
    done = deltas[-1].outputs[0]
    logprobs = [lp for d in deltas for lp in d.outputs[0].logprobs or []]
    return CompletionOutput(
        0,
        "".join(d.outputs[0].text for d in deltas),
        [t for d in deltas for t in d.outputs[0].token_ids],
        done.finish_reason,
        done.stop_reason,
        logprobs if done.logprobs is not None else None,
    )


class LLM:
    """A model loaded for offline generation.

    `model` is a store name or a checkpoint directory; `engine_config` are
    EngineConfig fields (max_num_seqs, kv_cache_bytes, device, ...). `num_threads`:
    torch's CPU threads for this process (None: EMBER_NUM_THREADS, else the CPUs the
    process may use).
    """

    def __init__(
        self,
        model: str | Path,
        scheduler: str = DEFAULT_SCHEDULER,
        *,
        num_threads: int | None = None,
        **engine_config: Any,
    ) -> None:
        config = EngineConfig(scheduler=scheduler, num_threads=num_threads, **engine_config)
        self.engine = load_engine(model, config)
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs in prompt order, each with n completions.

        All prompts are checked before any runs: a bad one raises InvalidRequestError.
        With n > 1 and a seed, completion i uses seed + i (wrapped into 64 bits);
        without a seed, every completion draws a fresh one (a new run gives new text).
        """
        batch = [prompts] if isinstance(prompts, str | Mapping) else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise InvalidRequestError(
                    "give one SamplingParams, or one per prompt", param="sampling_params"
                )
        groups: list[tuple[str | None, list[int], list[str]]] = []
        requests: list[EngineRequest] = []
        for prompt, p in zip(batch, params, strict=True):
            text, ids = tokenize_prompt(self.engine, prompt)
            ids_of_group = []
            for i in range(p.n):
                seed = None if p.seed is None else offset_seed(p.seed, i)
                self._counter += 1
                request = EngineRequest.make(str(self._counter), ids, replace(p, n=1, seed=seed), prompt=text)
                self.engine.validate(request)
                requests.append(request)
                ids_of_group.append(request.request_id)
            groups.append((text, ids, ids_of_group))
        deltas = self._run(requests)
        results = []
        for text, ids, members in groups:
            completions = [_merge(deltas[r]) for r in members]
            for i, c in enumerate(completions):
                c.index = i
            metrics = deltas[members[0]][-1].metrics
            results.append(RequestOutput(members[0], text, ids, completions, True, metrics))
        return results

    def _run(self, requests: list[EngineRequest]) -> dict[str, list[RequestOutput]]:
        deltas: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        self.engine.take_failed()  # an earlier call's, already raised
        try:
            for r in requests:
                self.engine.add_request(r)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    deltas[out.request_id].append(out)
                failed = self.engine.take_failed()
                if failed:  # a request an error ended: the call fails, the others stop
                    raise failed[0][1]
        finally:  # an interrupt must not leave requests holding KV blocks
            for r in requests:
                self.engine.abort(r.request_id)
        return deltas

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the
        checkpoint's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this checkpoint has no chat template; use generate()", param="messages"
            )
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts: list[Prompt] = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
            )
            # the template already holds the special tokens: do not add a second BOS
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params)
