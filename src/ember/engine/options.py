"""The engine options that `ember serve` exposes, with their defaults, in a module
without torch so the CLI can show them: EngineConfig (engine/config.py) and
ServeSettings (server/settings.py) both take them from here."""

from __future__ import annotations

from typing import Literal, get_args

# mlfq: FastServe's skip-join multi-level feedback queue; fcfs: first come first
# served (what vLLM does); srpt: shortest remaining processing time, an oracle;
# gittins: the Gittins index of each job under the output lengths the instance learnt.
SchedulerName = Literal["mlfq", "fcfs", "srpt", "gittins"]
# What happens to a preempted job's KV cache: swapped to host memory ahead of need,
# swapped when space runs out, or dropped and recomputed (as vLLM does).
SwapMode = Literal["proactive", "reactive", "off"]

SCHEDULERS: tuple[SchedulerName, ...] = get_args(SchedulerName)
SWAP_MODES: tuple[SwapMode, ...] = get_args(SwapMode)

DEFAULT_SCHEDULER: SchedulerName = "gittins"
DEFAULT_SWAP: SwapMode = "proactive"
DEFAULT_MAX_NUM_SEQS = 32  # sequences in one batch
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # tokens computed in one iteration, prefill and decode
