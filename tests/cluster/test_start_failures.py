"""Failed starts: retried with an exponential backoff when a retry can fix them,
never when it cannot (a missing or corrupt checkpoint, a full disk), and each
deployment's state (ready, starting, failed with the reason) as model_states and
`ember status` show it. Tiny random Llamas on embedded nodes, an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cluster.controller import Controller
from ember.cluster.start_failures import StartFailures, backoff_s
from ember.cluster.state import Deployment
from ember.errors import (
    CorruptCheckpointError,
    EmberError,
    OverloadedError,
    RegistryError,
    RegistryUnavailableError,
    StorageFullError,
)
from tests.cluster.conftest import collect, make_controller, make_nodes, request, run
from tests.cluster.fakes import FakeClock, FlakyNode

pytestmark = pytest.mark.timeout(120)


def _rewrite(path: Path, change: bytes | None = None) -> None:
    """Flip a byte of `path` (or replace it with `change`) in a new file: the test's
    models share their files as hard links, and only this one must change."""
    data = bytearray(path.read_bytes()) if change is None else bytearray(change)
    if change is None:
        data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


def test_the_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    assert [backoff_s(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    clock = FakeClock()
    failures = StartFailures(clock)
    failures.failed("m", RegistryUnavailableError("down"), began=clock())
    failures.failed("m", RegistryUnavailableError("down"), began=clock())  # ran alongside: once
    assert not failures.may_start("m")
    assert failures.state("m", ready=False, min_instances=1).retry_in_s == 1.0
    clock.advance(1)
    assert failures.may_start("m")
    failures.failed("m", RegistryUnavailableError("down"), began=clock())
    assert failures.state("m", ready=False, min_instances=1).retry_in_s == 2.0
    failures.succeeded("m")
    assert failures.may_start("m") and failures.state("m", ready=False, min_instances=1).state == "starting"


def _flaky(home: Path) -> tuple[Controller, FlakyNode, FakeClock]:
    clock = FakeClock()
    [inner] = make_nodes(home)
    node = FlakyNode(inner)
    return make_controller(home, runtimes=[node], clock=clock), node, clock


async def _tick(c: Controller) -> None:
    c.reconcile()
    await c.settle()


def test_a_corrupt_index_fails_the_model_at_once_and_no_start_is_tried(
    ember_home: Path, models: list[str]
) -> None:
    _rewrite(ember_home / "store" / "tiny" / "index.json", b"{not json")

    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        await c.start(
            [Deployment("tiny", "tiny", min_instances=1), Deployment("tiny2", "tiny2", min_instances=1)]
        )
        await c.wait_ready(30)  # the failed model does not hold it up
        states = c.model_states()
        assert states["tiny2"].state == "ready"
        assert states["tiny"].state == "failed"
        assert "CorruptCheckpointError" in (states["tiny"].reason or "")
        assert "not valid JSON" in (states["tiny"].reason or "")
        clock.advance(3600)
        await _tick(c)
        assert node.starts == 1  # tiny2's; none for tiny, ever
        with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
            await collect(c, "tiny", request("r"))
        tiny = next(d for d in (await c.status())["deployments"] if d["name"] == "tiny")
        assert (tiny["state"], tiny["instances"]) == ("failed", [])
        assert "not valid JSON" in tiny["reason"]
        await c.close()

    run(main)


def test_corrupt_weights_fail_the_model_after_the_loads_checksum_error_and_are_not_retried(
    ember_home: Path, models: list[str]
) -> None:
    _rewrite(ember_home / "store" / "tiny" / "part-00000.bin")

    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        await c.settle()  # a registry start serves while its weights arrive: it fails as they do
        state = c.model_states()["tiny"]
        assert state.state == "failed" and "checksum mismatch" in (state.reason or "")
        for _ in range(3):
            clock.advance(120)
            await _tick(c)
        assert node.starts == 1
        with pytest.raises(RegistryError, match="checksum mismatch"):
            await collect(c, "tiny", request("r"))
        assert node.starts == 1  # a request does not start it either
        await c.close()

    run(main)


def test_a_bad_cached_copy_is_retried_and_fetched_again_but_a_bad_source_fails_the_model(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", min_instances=0, keep_alive_s=10))
        want = await collect(c, "tiny", request("a"))  # fetched into the node's disk cache

        async def cold_start_on_a_corrupt_cached_copy() -> None:
            clock.advance(11)
            await _tick(c)  # idle past its keep-alive: stopped
            assert node.inner.store.settle("tiny") is None  # type: ignore[attr-defined]
            assert node.inner.store.evict("tiny")  # type: ignore[attr-defined]
            _rewrite(node.inner.store.disk.path("tiny") / "part-00000.bin")  # type: ignore[attr-defined]
            with pytest.raises(EmberError, match="checksum mismatch"):  # it served as its weights came
                await collect(c, "tiny", request("b"))
            await c.settle()

        await cold_start_on_a_corrupt_cached_copy()
        state = c.model_states()["tiny"]
        assert (state.state, state.retry_in_s) == ("starting", 1.0)
        assert "dropped its copy" in (state.reason or "")
        clock.advance(1)
        assert await collect(c, "tiny", request("c")) == want  # fetched again from the registry
        assert c.model_states()["tiny"].state == "ready"

        await cold_start_on_a_corrupt_cached_copy()
        _rewrite(ember_home / "store" / "tiny" / "part-00000.bin")  # the registry's copy too
        clock.advance(1)
        with pytest.raises(RegistryError, match="checksum mismatch"):
            await collect(c, "tiny", request("d"))
        await c.settle()
        assert c.model_states()["tiny"].state == "failed"
        starts = node.starts
        clock.advance(600)
        await _tick(c)
        with pytest.raises(RegistryError):
            await collect(c, "tiny", request("e"))
        assert node.starts == starts
        await c.close()

    run(main)


def test_a_transient_failure_is_retried_after_1_2_4_seconds_then_serves(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        node.start_errors = [RegistryUnavailableError("registry answered 503")] * 3
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.settle()
        tried_at = [node.starts]
        for wait in (0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0):
            clock.advance(wait)
            await _tick(c)
            tried_at.append(node.starts)
        # failures after 0, 1 and 3 s; the start after 7 s works
        assert tried_at == [1, 1, 2, 2, 3, 3, 3, 3, 4]
        await c.wait_ready(30)
        assert c.model_states()["tiny"].state == "ready"
        assert len(await collect(c, "tiny", request("r"))) == 8
        await c.close()

    run(main)


def test_a_full_disk_fails_the_model_until_it_is_deployed_again(ember_home: Path, models: list[str]) -> None:
    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        node.start_errors = [StorageFullError("no space left on device")]
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        assert c.model_states()["tiny"] == c.starts.state("tiny", ready=False, min_instances=1)
        assert c.model_states()["tiny"].reason == "StorageFullError: no space left on device"
        clock.advance(600)
        await _tick(c)
        assert node.starts == 1
        await c.deploy(Deployment("tiny", "tiny", min_instances=1))  # the disk was cleared
        await c.wait_ready(30)
        assert c.model_states()["tiny"].state == "ready" and node.starts == 2
        await c.close()

    run(main)


def test_a_request_during_the_backoff_fails_at_once_with_the_last_error(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c, node, clock = _flaky(ember_home)
        node.start_errors = [OverloadedError("node0 has no free slot")]
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", min_instances=0))
        with pytest.raises(OverloadedError, match="no free slot"):
            await collect(c, "tiny", request("a"))
        with pytest.raises(OverloadedError, match="no free slot"):
            await collect(c, "tiny", request("b"))  # within the second: no second start
        assert node.starts == 1
        clock.advance(1)
        assert len(await collect(c, "tiny", request("c"))) == 8
        await c.close()

    run(main)
