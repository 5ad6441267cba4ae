"""ember sim: hand-checked scenarios, determinism, and its reuse of the real control plane."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import ember.sim
from ember.bench.cluster_workload import ClusterRequest
from ember.cluster import placement
from ember.cluster.estimator import StartupEstimate, StartupTimeEstimator
from ember.cluster.messages import NodeStatus
from ember.errors import InvalidRequestError
from ember.sim.config import GB, ModelSpec, ServerSpec, SimConfig, load_config
from ember.sim.run import WorkloadSpec, make_workload, run_policies
from ember.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

# One server, round numbers: a 10 GB model loads in 10 s from the registry (1 GB/s),
# 1 s from DRAM (10 GB/s), plus 0.5 s to build; prefill 0.01 s/token, decode 0.1 s/step.
SERVER = ServerSpec(
    gpus=1, gpu_bytes=24 * GB, dram_bytes=20 * GB, ssd_bytes=40 * GB,
    dram_bps=10e9, ssd_bps=5e9, network_bps=1e9, overhead_s=0.5, baseline_load_bps=2e9,
)  # fmt: skip
MODEL = ModelSpec("m", 10 * GB, 1, 0.01, 0.1)


def _config(**kw: object) -> SimConfig:
    base = {"servers": 1, "server": SERVER, "models": (MODEL,), "keep_alive_s": 10.0, "max_batch": 4}
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_keep_alive_then_scale_to_zero_exact_ttfts() -> None:
    reqs = [
        ClusterRequest(0.0, "m", 10, 5),
        ClusterRequest(15.0, "m", 10, 5),
        ClusterRequest(40.0, "m", 10, 5),
    ]
    sim = Simulator(_config(), "startup-time-aware")
    out = sim.run(reqs)
    # 1st: registry download 10 s + 0.5 s build, then 10 tokens of prefill (0.1 s).
    # 2nd: the instance is warm (idle since 11.1 s, kept alive until 21.1 s): prefill only.
    # 3rd: the instance went at 25.6 s (scale to zero); the checkpoint is in DRAM: 1 + 0.5 + 0.1.
    assert [o.ttft_s for o in out] == pytest.approx([10.6, 0.1, 1.6])
    assert [o.e2e_s for o in out] == pytest.approx([11.1, 0.6, 2.1])
    assert [o.start_tier for o in out] == ["registry", None, "dram"]
    assert sim.starts == {"registry": 1, "dram": 1}
    assert sim.router.routes() == []  # scaled to zero at the end


def test_remote_only_downloads_every_start() -> None:
    reqs = [ClusterRequest(0.0, "m", 10, 5), ClusterRequest(40.0, "m", 10, 5)]
    out = Simulator(_config(), "remote-only").run(reqs)
    assert [o.ttft_s for o in out] == pytest.approx([10.6, 10.6])
    assert [o.start_tier for o in out] == ["registry", "registry"]
    # As Ray Serve and KServe start: the download, then a standard loader (2 GB/s) reads it.
    out = Simulator(_config(), "remote-only+safetensors").run(reqs)
    assert [o.ttft_s for o in out] == pytest.approx([15.6, 15.6])


def test_downloads_share_the_registrys_link_when_there_is_one() -> None:
    other = ModelSpec("n", 10 * GB, 1, 0.01, 0.1)
    reqs = [ClusterRequest(0.0, "m", 10, 5), ClusterRequest(0.0, "n", 10, 5)]
    config = _config(servers=2, models=(MODEL, other))
    # each server downloads at its own 1 GB/s: both ready at 10.5 s
    assert [o.ttft_s for o in Simulator(config, "remote-only").run(reqs)] == pytest.approx([10.6, 10.6])
    # one 1 GB/s link for both: the second download crosses it after the first
    linked = Simulator(dataclasses.replace(config, registry_link_bps=1e9), "remote-only").run(reqs)
    assert [o.ttft_s for o in linked] == pytest.approx([10.6, 20.6])


def test_the_cli_runs_every_policy_by_default() -> None:
    from ember.cli.sim import DEFAULT_POLICIES
    from ember.sim.simulator import POLICIES

    assert DEFAULT_POLICIES.split(",") == list(POLICIES)


def test_a_model_taking_several_slots_waits_for_all_of_them() -> None:
    big = ModelSpec("big", 10 * GB, 4, 0.01, 0.1)
    small = ModelSpec("small", 10 * GB, 1, 0.01, 0.1)
    config = _config(server=SERVER.__class__(**{**SERVER.__dict__, "gpus": 4}), models=(big, small))
    reqs = [ClusterRequest(0.0, "big", 10, 5), ClusterRequest(1.0, "small", 10, 5)]
    sim = Simulator(config, "startup-time-aware-no-migration")
    out = sim.run(reqs)
    assert out[0].ttft_s == pytest.approx(10.6) and not out[0].waited_for_slot
    # big holds all 4 slots while it serves, to 11.1 s; idle then, it gives them to small's
    # start at once (not at the end of its keep-alive), which downloads in 10.5 s: ready at
    # 11.1 + 10.5, first token 0.1 s later.
    assert out[1].waited_for_slot
    assert out[1].ttft_s == pytest.approx(11.1 + 10.5 + 0.1 - 1.0)
    assert sim.reclaims == 1


def test_zoo_models_larger_than_a_gpu_take_several_slots() -> None:
    config = load_config(None, models=7)
    slots = {m.name.rsplit("-", 1)[0]: m.slots for m in config.models}
    assert slots["opt-6.7b"] == 1 and slots["opt-13b"] == 2 and slots["llama-2-70b"] == 8
    with pytest.raises(InvalidRequestError, match="needs 8 GPUs"):
        load_config(None, models=7, gpus_per_server=4)


def _small_run(seed: int) -> tuple[dict[str, object], dict[str, object]]:
    config = load_config(None, servers=2, models=6)
    workload = make_workload(config, WorkloadSpec(requests=200, rate=0.5), seed)
    report, outcomes = run_policies(config, workload, ["startup-time-aware", "random"], seed=seed)
    for p in report["policies"].values():
        for key in ("wall_s", "sim_requests_per_wall_s"):
            p.pop(key)
    return report, outcomes  # type: ignore[return-value]


def test_same_seed_same_result() -> None:
    one, two, other = _small_run(3), _small_run(3), _small_run(4)
    assert one == two
    assert one[0] != other[0]


def test_the_policy_is_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patching ember.cluster's StartupTimeAware changes the simulator's decisions: it
    carries no copy of the policy."""
    config = load_config(None, servers=3, models=3)
    reqs = [ClusterRequest(float(i), f"{m.name}", 10, 5) for i, m in enumerate(config.models)]
    calls: list[int] = []
    real = placement.StartupTimeAware.place

    def last_node(
        self: placement.StartupTimeAware, *args: object, **kw: object
    ) -> placement.Placement | None:
        calls.append(1)
        nodes = args[2]
        p = real(self, args[0], args[1], nodes[-1:], *args[3:], **kw)  # type: ignore[arg-type,index]
        return p

    monkeypatch.setattr(placement.StartupTimeAware, "place", last_node)
    sim = Simulator(config, "startup-time-aware")
    sim.run(reqs)
    assert calls and {r.node for r in sim.router.routes()} <= {"s00002"}
    assert all(inst.server.node_id == "s00002" for inst in sim.instances.values())


def test_the_estimator_is_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    real = StartupTimeEstimator._estimate  # what estimate() and estimate_many() compute

    def avoid_first(
        self: StartupTimeEstimator, status: NodeStatus, checkpoint: str, nbytes: int
    ) -> StartupEstimate:
        est = real(self, status, checkpoint, nbytes)
        penalty = 1e6 if status.node_id == "s00000" else 0.0
        return StartupEstimate(est.node, est.tier, est.queue_s + penalty, est.load_s)

    config = load_config(None, servers=2, models=2)
    reqs = [ClusterRequest(0.0, config.models[0].name, 10, 5)]
    sim = Simulator(config, "startup-time-aware")
    sim.run(reqs)
    assert [i.server.node_id for i in sim.instances.values()] == ["s00000"]
    monkeypatch.setattr(StartupTimeEstimator, "_estimate", avoid_first)
    sim = Simulator(config, "startup-time-aware")
    sim.run(reqs)
    assert [i.server.node_id for i in sim.instances.values()] == ["s00001"]


def test_sim_modules_define_no_policy_and_import_the_real_ones() -> None:
    root = Path(ember.sim.__file__).parent
    imported: set[str] = set()
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert not any(
                    k in node.name for k in ("Placement", "Estimator", "Autoscaler", "Router", "Policy")
                )
                assert not any(isinstance(b, ast.FunctionDef) and b.name == "place" for b in node.body)
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.update(f"{node.module}.{a.name}" for a in node.names)
    assert {
        "ember.cluster.placement.make_policy",
        "ember.cluster.estimator.StartupTimeEstimator",
        "ember.cluster.autoscaler.Autoscaler",
        "ember.cluster.router.Router",
        "ember.cluster.migration_cost.MigrationCost",
    } <= imported


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("servers = 0\n", "servers must be >= 1"),
        ("colour = 1\n", "unknown keys colour"),
        ("[server]\ndram_bps = -1\n", "bandwidths must be positive"),
        ("[server]\ngpus = 'eight'\n", "bad"),
        ("servers = [\n", "cannot read the config"),
        (
            "[[models]]\nname = 'x'\nnbytes = 1\nslots = 9\nprefill_s_per_token = 0\ndecode_s_per_step = 0\n",
            "slots",
        ),
        ("[[models]]\nbase = 'gpt-5'\n", "unknown zoo model"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match=match):
        load_config(path)


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "servers = 3\nkeep_alive_s = 5.0\n[server]\ngpus = 2\ndram_bytes = 1_000_000\n"
        "[[models]]\nbase = 'opt-6.7b'\nname = 'chat'\n"
        "[[models]]\nname = 'tiny'\nnbytes = 1000\nslots = 2\n"
        "prefill_s_per_token = 0.001\ndecode_s_per_step = 0.01\n"
    )
    config = load_config(path, servers=5)
    assert config.servers == 5 and config.keep_alive_s == 5.0 and config.server.gpus == 2
    assert [m.name for m in config.models] == ["chat", "tiny"] and config.models[1].slots == 2
    with pytest.raises(InvalidRequestError, match="no config"):
        load_config(tmp_path / "none.toml")


def test_a_trace_with_an_unknown_model_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="not in the config"):
        Simulator(_config(), "random").run([ClusterRequest(0.0, "other", 1, 1)])
