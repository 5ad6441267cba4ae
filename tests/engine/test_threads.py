"""torch's thread count from the CPUs a process may use (affinity, cgroup v2 and v1
quotas, read from fake files), its overrides, and how OpenMP threads wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.engine import threads
from ember.engine.config import EngineConfig
from ember.engine.threads import available_cpus, cgroup_cpu_limit, resolve_num_threads
from ember.env import default_omp_wait_policy
from ember.errors import InvalidRequestError

pytestmark = pytest.mark.timeout(60)

EIGHT = frozenset(range(8))
V1_UNLIMITED = {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"}


def cgroups(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """(cgroup mount root, /proc/self/cgroup) with `files` (paths under the root)."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return root, proc


def test_a_cgroup_v2_quota_caps_the_threads_at_its_tightest_level(tmp_path: Path) -> None:
    root, proc = cgroups(
        tmp_path,
        "0::/user.slice/job\n",
        {"user.slice/job/cpu.max": "max 100000\n", "user.slice/cpu.max": "250000 100000\n", "cpu.max": "max"},
    )
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert available_cpus(affinity=EIGHT, root=root, self_cgroup=proc) == 2  # 2.5 CPUs: 2 threads
    assert available_cpus(affinity={3}, root=root, self_cgroup=proc) == 1  # the affinity is tighter


def test_a_container_quota_below_one_cpu_still_gets_one_thread(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert available_cpus(affinity=EIGHT, root=root, self_cgroup=proc) == 1


def test_a_cgroup_v1_quota_is_read_where_the_cpu_controller_is_mounted(tmp_path: Path) -> None:
    # the container's own cgroup is the mount root: the path it is listed under is not mounted there
    root, proc = cgroups(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root, proc) == 3.0
    assert available_cpus(affinity=EIGHT, root=root, self_cgroup=proc) == 3


@pytest.mark.parametrize(
    ("membership", "files"),
    [
        (
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
        ),
        ("0::/\n", {"cpu.max": "max 100000\n"}),
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("0::/\n", {}),  # no cpu controller here
        ("", {}),
    ],
    ids=["v1-unlimited", "v2-unlimited", "unreadable", "no-file", "no-cgroup"],
)
def test_without_a_quota_every_cpu_of_the_affinity_counts(
    tmp_path: Path, membership: str, files: dict[str, str]
) -> None:
    root, proc = cgroups(tmp_path, membership, files)
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(affinity=EIGHT, root=root, self_cgroup=proc) == 8


def test_a_parameter_beats_the_environment_which_beats_the_cpus() -> None:
    environ = {"EMBER_NUM_THREADS": " 3 "}
    assert resolve_num_threads(5, environ=environ, cpus=lambda: 2) == 5
    assert resolve_num_threads(None, environ=environ, cpus=lambda: 2) == 3
    assert resolve_num_threads(None, environ={"EMBER_NUM_THREADS": ""}, cpus=lambda: 2) == 2
    assert resolve_num_threads(None, environ={}, cpus=lambda: 2) == 2


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_a_bad_environment_value_is_a_clear_error(raw: str) -> None:
    with pytest.raises(InvalidRequestError, match="EMBER_NUM_THREADS must be a positive integer") as info:
        resolve_num_threads(None, environ={"EMBER_NUM_THREADS": raw}, cpus=lambda: 2)
    assert info.value.param == "EMBER_NUM_THREADS" and raw in str(info.value)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_a_bad_thread_count_is_refused_when_the_engine_is_configured(bad: Any) -> None:
    with pytest.raises(InvalidRequestError, match="num_threads must be a positive integer") as info:
        EngineConfig(num_threads=bad)
    assert info.value.param == "num_threads"


def test_ember_lets_waiting_threads_sleep_unless_the_user_chose() -> None:
    environ: dict[str, str] = {}
    assert default_omp_wait_policy(environ) and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = dict(chosen)
        assert not default_omp_wait_policy(environ) and environ == chosen


@pytest.fixture
def fresh_process_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if no engine had set the thread count yet; torch's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", None)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("fresh_process_threads")
def test_loading_an_engine_sets_the_process_threads_once(
    tiny_llama: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember import LLM

    monkeypatch.setenv("EMBER_NUM_THREADS", "1")
    LLM(str(tiny_llama[0]), device="cpu")
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("EMBER_NUM_THREADS", "2")
    LLM(str(tiny_llama[0]), device="cpu")  # the process's count is set: a second engine keeps it
    assert torch.get_num_threads() == 1
    LLM(str(tiny_llama[0]), device="cpu", num_threads=2)  # an explicit count replaces it
    assert torch.get_num_threads() == 2
