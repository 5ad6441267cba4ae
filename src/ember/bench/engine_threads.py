"""`ember bench engine --background-load N`: decode speed beside N busy processes,
Ember's thread settings against torch's defaults.

Each setting runs in its own worker process, because OpenMP reads how its threads
wait once, when torch is imported (see ember.engine.threads):
- "ember": imports ember first (OMP_WAIT_POLICY=PASSIVE unless set), Ember's count;
- "torch default": imports torch first, without Ember's policy (libgomp's threads
  spin before they sleep), torch's own count.
Both load the checkpoint; then N `while True: pass` processes start, and the workers
take turns (interleaved, the first alternating) timing a decode step at each batch
size; medians of `rounds`. The busy processes stop before this returns.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ember import env as env_vars
from ember.engine import threads

BUSY_LOOP = "while True: pass"
# The worker's first lines: the torch-default one imports torch before ember can set a policy.
_BOOT = {
    "ember": "from ember.bench.engine_threads import worker_main; worker_main()",
    "torch": "import torch; from ember.bench.engine_threads import worker_main; worker_main()",
}
LABELS = {"ember": "ember", "torch": "torch default"}


@dataclass
class _Worker:
    mode: str  # "ember" or "torch"
    proc: subprocess.Popen[str]
    threads: int = 0
    wait: str = ""

    def ask(self, batch: int) -> float:
        """Median seconds of one decode step at `batch` sequences."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(f"{batch}\n")
        stdin.flush()
        return float(_line(stdout, self))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _line(stream: IO[str], worker: _Worker) -> str:
    line = stream.readline()
    if not line:
        raise RuntimeError(f"the {LABELS[worker.mode]} worker exited ({worker.proc.wait()}); see its stderr")
    return line


def _wait_label(env: dict[str, str]) -> str:
    chosen = [f"{name}={env[name]}" for name in env_vars.OMP_WAIT_VARS if name in env]
    return ", ".join(chosen) or "unset (libgomp spins, then sleeps)"


def _start(mode: str, checkpoint: Path) -> _Worker:
    env = dict(os.environ)
    if mode == "torch" and env_vars.omp_wait_policy_set_by_ember():
        env.pop("OMP_WAIT_POLICY", None)  # as a process that never imported ember
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT[mode], mode, str(checkpoint)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    return _Worker(mode, proc, wait=_wait_label(env))


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` processes that each keep one CPU busy, stopped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-S", "-c", BUSY_LOOP]))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def run_threads_case(
    checkpoint: Path, background_load: int, *, batches: Sequence[int] = (1, 8), rounds: int = 3
) -> list[dict[str, Any]]:
    """Decode tokens/s at each batch size beside `background_load` busy processes:
    one row per batch size, Ember's settings next to torch's defaults."""
    workers = [_start("ember", checkpoint), _start("torch", checkpoint)]
    try:
        for w in workers:  # loaded and warm: the line says its thread count
            assert w.proc.stdout is not None
            w.threads = int(json.loads(_line(w.proc.stdout, w))["threads"])
        times: dict[tuple[str, int], list[float]] = {(w.mode, b): [] for w in workers for b in batches}
        with busy_processes(background_load):
            for r in range(rounds):
                for b in batches:
                    for w in workers if r % 2 == 0 else workers[::-1]:
                        times[w.mode, b].append(w.ask(b))
    finally:
        for w in workers:
            w.close()
    ours, theirs = workers
    rows = []
    for b in batches:
        ours_s, theirs_s = statistics.median(times["ember", b]), statistics.median(times["torch", b])
        rows.append({
            "case": f"decode b{b}",
            "background_load": background_load,
            "ember_threads": ours.threads,
            "ember_wait": ours.wait,
            "ember_tok_s": b / ours_s,
            "torch_threads": theirs.threads,
            "torch_wait": theirs.wait,
            "torch_tok_s": b / theirs_s,
            "speedup": theirs_s / ours_s,
        })  # fmt: skip
    return rows


def worker_main() -> None:
    """A worker: `python -c BOOT MODE CHECKPOINT`. Loads the checkpoint, prints
    {"threads": n}, then for each batch size read from stdin prints the median
    seconds of one decode step."""
    mode, checkpoint = sys.argv[1], Path(sys.argv[2])
    import torch

    from ember.bench.engine_model import time_decode
    from ember.engine.config import EngineConfig
    from ember.engine.loader import load_engine

    threads._warned = True  # the torch-default worker imported torch first on purpose
    count = torch.get_num_threads() if mode == "torch" else None  # torch's own default
    model: Any = load_engine(checkpoint, EngineConfig(device="cpu", num_threads=count)).runner.model
    time_decode(model, 1, steps=2)  # the first forward's one-off costs
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        print(time_decode(model, int(line)), flush=True)
