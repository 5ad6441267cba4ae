"""`ember bench engine`'s end-to-end part: `LLM.generate` against transformers' `generate`.

Each side runs in its own worker process, as a user would run it:
- "ember" imports ember first (its thread count and OMP_WAIT_POLICY=PASSIVE unless
  the user chose) and calls `LLM(checkpoint).generate(prompts, SamplingParams(...))`;
- "transformers" imports torch first, without Ember's wait policy, with torch's own
  thread count, and calls `model.generate(ids, attention_mask=...)` on a transformers
  model over the same weights (the checkpoint's tensors, loaded by the store).
Both complete the same random prompts of `prompt_len` tokens with `new_tokens` greedy
tokens each, ignoring EOS, at each batch size; the workers take turns (interleaved,
the first alternating by round) and the medians of `rounds` are reported. The Ember
worker also times the parts of each iteration (ember.bench.step_parts) in its
median run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import env as env_vars

SIDES = ("ember", "transformers")
# The worker's first lines: transformers' imports torch before ember can set a wait policy.
_BOOT = {
    "ember": "from ember.bench.engine_e2e import worker_main; worker_main()",
    "transformers": "import torch; from ember.bench.engine_e2e import worker_main; worker_main()",
}
PROMPT_SEED = 0


@dataclass
class _Worker:
    side: str
    proc: subprocess.Popen[str]
    wait: str
    threads: int = 0

    def request(self, line: str) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(line + "\n")
        stdin.flush()
        return json.loads(self.read())  # type: ignore[no-any-return]

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited ({self.proc.wait()}); see its stderr")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _start(side: str, checkpoint: Path, prompt_len: int, new_tokens: int) -> _Worker:
    environ = dict(os.environ)
    if side == "transformers" and env_vars.omp_wait_policy_set_by_ember():
        environ.pop("OMP_WAIT_POLICY", None)  # as a process that never imported ember
    args = [side, str(checkpoint), str(prompt_len), str(new_tokens)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT[side], *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=environ,
    )  # fmt: skip
    chosen = [f"{name}={environ[name]}" for name in env_vars.OMP_WAIT_VARS if name in environ]
    return _Worker(side, proc, ", ".join(chosen) or "unset (libgomp spins, then sleeps)")


def run_e2e_case(
    checkpoint: Path,
    *,
    batches: Sequence[int] = (1, 16, 32),
    prompt_len: int = 64,
    new_tokens: int = 64,
    rounds: int = 3,
) -> list[dict[str, Any]]:
    """One row per batch size: generated tokens/s of each side (medians), their ratio,
    and the parts of Ember's iterations in its median run."""
    workers = [_start(side, checkpoint, prompt_len, new_tokens) for side in SIDES]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(w.side, b): [] for w in workers for b in batches}
    try:
        for w in workers:  # loaded and warm: the line says its thread count
            w.threads = int(json.loads(w.read())["threads"])
        for r in range(rounds):
            for b in batches:
                for w in workers if r % 2 == 0 else workers[::-1]:
                    runs[w.side, b].append(w.request(str(b)))
    finally:
        for w in workers:
            w.close()
    return [_row(b, prompt_len, new_tokens, workers, runs) for b in batches]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: float(run["seconds"]))
    return ordered[(len(ordered) - 1) // 2]


def _row(
    batch: int, prompt_len: int, new_tokens: int, workers: list[_Worker],
    runs: dict[tuple[str, int], list[dict[str, Any]]],
) -> dict[str, Any]:  # fmt: skip
    ours, theirs = workers
    ours_s = statistics.median(run["seconds"] for run in runs["ember", batch])
    hf_s = statistics.median(run["seconds"] for run in runs["transformers", batch])
    tokens = batch * new_tokens
    median = _median_run(runs["ember", batch])
    return {
        "case": f"generate b{batch}",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "ours_s": ours_s,
        "hf_s": hf_s,
        "ours_tok_s": tokens / ours_s,
        "hf_tok_s": tokens / hf_s,
        "speedup": hf_s / ours_s,
        "ours_samples_s": [run["seconds"] for run in runs["ember", batch]],
        "hf_samples_s": [run["seconds"] for run in runs["transformers", batch]],
        "ember_threads": ours.threads,
        "ember_wait": ours.wait,
        "hf_threads": theirs.threads,
        "hf_wait": theirs.wait,
        "step_parts": median["parts"],
        "outside_steps_s": median["seconds"] - median["parts"]["step_s"],
    }


# -- the worker processes ----------------------------------------------------------------


def prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
    """The same random prompts on both sides: [batch][prompt_len] token ids."""
    import torch

    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).tolist()  # type: ignore[no-any-return]


class _EmberSide:
    def __init__(self, checkpoint: Path, prompt_len: int, new_tokens: int) -> None:
        from ember.engine.llm import LLM
        from ember.engine.request import SamplingParams

        self.llm = LLM(str(checkpoint))
        self.prompt_len = prompt_len
        self.params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.llm.generate(self._prompts(1), warm)  # the first forward's one-off costs

    def _prompts(self, batch: int) -> list[dict[str, Any]]:
        ids = prompts(self.llm.engine.vocab_size, batch, self.prompt_len)
        return [{"prompt_token_ids": p} for p in ids]

    def run(self, batch: int) -> dict[str, Any]:
        from ember.bench.step_parts import timed_parts

        batch_prompts = self._prompts(batch)
        with timed_parts(self.llm.engine) as parts:
            start = time.perf_counter()
            out = self.llm.generate(batch_prompts, self.params)
            seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == self.params.max_tokens for o in out)
        return {"seconds": seconds, "parts": parts.to_json()}


class _TransformersSide:
    def __init__(self, checkpoint: Path, prompt_len: int, new_tokens: int) -> None:
        from ember.bench.engine_model import hf_model
        from ember.store.loader import load_tensors

        self.model = hf_model(checkpoint, load_tensors(checkpoint))
        config = self.model.generation_config
        config.eos_token_id = None  # ignore EOS: every sequence generates new_tokens
        config.pad_token_id = 0  # unused (no padding), but generate asks for one
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self._generate(1, 2)  # the first forward's one-off costs

    def _generate(self, batch: int, new_tokens: int) -> Any:
        import torch

        ids = torch.tensor(prompts(self.model.config.vocab_size, batch, self.prompt_len))
        with torch.inference_mode():
            return self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )

    def run(self, batch: int) -> dict[str, Any]:
        start = time.perf_counter()
        out = self._generate(batch, self.new_tokens)
        seconds = time.perf_counter() - start
        assert tuple(out.shape) == (batch, self.prompt_len + self.new_tokens), out.shape
        return {"seconds": seconds}


def worker_main() -> None:
    """A worker: `python -c BOOT SIDE CHECKPOINT PROMPT_LEN NEW_TOKENS`. Loads the model,
    prints {"threads": n}, then for each batch size read from stdin runs one timed
    generate and prints {"seconds": s, ...}."""
    side, checkpoint = sys.argv[1], Path(sys.argv[2])
    prompt_len, new_tokens = int(sys.argv[3]), int(sys.argv[4])
    import torch

    from ember.engine import threads

    if side == "transformers":
        threads._warned = True  # this worker imported torch first on purpose
    runner = (_EmberSide if side == "ember" else _TransformersSide)(checkpoint, prompt_len, new_tokens)
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(runner.run(int(line))), flush=True)
