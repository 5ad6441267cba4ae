"""How torch's CPU threads wait and how many there are: set once per process.

Why. torch runs its CPU kernels on OpenMP threads (libgomp). When OMP_WAIT_POLICY is
unset and the process has no more OpenMP threads than CPUs, an idle libgomp thread
spins about 300,000 times (milliseconds) before it sleeps. A decode step is hundreds
of short parallel regions, so the threads never sleep: beside another busy process, a
spinning thread holds a core while the thread with the work waits for one, and every
region waits for the slowest thread. Measured on 2 cores with one `while True: pass`
beside it: 16 tokens of SmolLM2 through `LLM.generate` took 14-39 s instead of about
1 s. `ember serve` was spared by accident: there torch runs on more than one thread
(a node builds an instance on a worker thread, its engine steps on another), so the
process has more OpenMP threads than CPUs, and libgomp then spins only about 100 times
(one parallel op on a second thread made `LLM.generate` as fast in the same test).

So Ember
- lets waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose how they
  wait. OpenMP reads this once, when torch is imported, so `import ember` sets it
  (`env.default_omp_wait_policy`); it cannot act in a process that imported torch
  first;
- sets torch's intra-op thread count to the CPUs the process may use: its affinity
  mask, capped by its cgroup's CPU quota (a container given 2 CPUs of a 64-core host
  would otherwise run 64 threads on 2 CPUs), unless EMBER_NUM_THREADS or an explicit
  count says otherwise. `load_engine` applies it before the first forward
  (`apply_num_threads`): LLM, the embedded chat and every node process.
Inter-op threads are left alone: eager inference never uses them.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Set
from pathlib import Path

from ember import env
from ember.errors import InvalidRequestError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_lock = threading.Lock()
_applied: int | None = None  # the count this process runs with, once set
_warned = False


# -- how many threads ------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(mount: Path, cgroup_path: str) -> list[Path]:
    """mount/cgroup_path and each directory above it up to mount: a parent's quota
    binds its children. Inside a container the path may name a directory that is not
    mounted there; its mount root is then the container's own cgroup."""
    parts = [p for p in cgroup_path.split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(cpu_max: str | None) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") -> CPUs, None if unlimited."""
    fields = (cpu_max or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(quota_us: str | None, period_us: str | None) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us -> CPUs, None if unlimited (-1)."""
    try:
        quota, period = int((quota_us or "").strip()), int((period_us or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPUs this process's cgroup may use (quota / period, the tightest along its
    path, cgroup v2 or v1); None when there is no quota or no cgroup to read."""
    limits: list[float | None] = []
    for line in (_read(self_cgroup) or "").splitlines():
        fields = line.strip().split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: the unified hierarchy
            limits += [_v2_limit(_read(d / "cpu.max")) for d in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):  # v1: mounted as "cpu,cpuacct", linked as "cpu"
            for mount in dict.fromkeys((root / controllers, root / "cpu")):
                limits += [
                    _v1_limit(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                    for d in _ancestors(mount, path)
                ]
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def available_cpus(
    *,
    affinity: Set[int] | None = None,
    root: Path = CGROUP_ROOT,
    self_cgroup: Path = PROC_SELF_CGROUP,
) -> int:
    """CPUs this process may run on: its affinity mask (`affinity`: that of the calling
    process when None), capped by its cgroup's CPU quota rounded down (1.5 CPUs -> 1:
    a second thread would be throttled), at least 1."""
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    count = len(affinity) if affinity is not None else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        count = min(count, math.floor(limit))
    return max(1, count)


def check_num_threads(value: object, source: str) -> int:
    """`value` if it is a thread count (a positive integer); InvalidRequestError
    naming `source` (a parameter or an environment variable) otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        message = f"{source} must be a positive integer (threads), got {value!r}"
        raise InvalidRequestError(message, param=source)
    return value


def resolve_num_threads(
    requested: int | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    cpus: Callable[[], int] = available_cpus,
) -> int:
    """The thread count: `requested`, else EMBER_NUM_THREADS, else `cpus()` (the
    CPUs the process may use)."""
    if requested is not None:
        return check_num_threads(requested, "num_threads")
    raw = environ.get(env.EMBER_NUM_THREADS, "").strip()
    if not raw:
        return cpus()
    try:
        value: object = int(raw)
    except ValueError:
        value = raw
    return check_num_threads(value, env.EMBER_NUM_THREADS)


def apply_num_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return the count in force.

    The first call fixes it (`resolve_num_threads`); a later call without a count keeps
    it, one with another count replaces it (the setting is per process: every engine
    in it shares the threads). Threads started afterwards (an AsyncEngine's) take it
    on their first parallel operation."""
    global _applied, _warned
    import torch

    with _lock:
        if requested is None and _applied is not None:
            return _applied
        count = resolve_num_threads(requested)
        if count != torch.get_num_threads():
            torch.set_num_threads(count)
        _applied = count
        if env.torch_imported_before_ember() and count > 1 and not _warned:
            _warned = True
            log.warning(
                "torch was imported before ember, so its threads spin while they wait and "
                "slow down several times beside other busy processes; import ember first "
                "or set OMP_WAIT_POLICY=PASSIVE"
            )
        return count
