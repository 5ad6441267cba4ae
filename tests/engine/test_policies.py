"""The scheduling policies by name: what EngineConfig and the CLI accept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.engine.config import EngineConfig
from ember.engine.policies import POLICY_NAMES
from ember.errors import InvalidRequestError


def test_an_unknown_policy_is_a_clear_error_naming_the_known_ones() -> None:
    with pytest.raises(
        InvalidRequestError, match="unknown scheduler 'lottery'; known: mlfq, fcfs, srpt"
    ) as err:
        EngineConfig(scheduler="lottery")
    assert err.value.param == "scheduler"
    for name in POLICY_NAMES:
        assert EngineConfig(scheduler=name).scheduler == name


@pytest.mark.timeout(60)
def test_the_policy_names_load_without_torch() -> None:
    """The CLI checks `--scheduler` against them without paying for torch's import."""
    code = "import sys, ember.engine.policies as p; assert 'torch' not in sys.modules; print(*p.POLICY_NAMES)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert tuple(out.stdout.split()) == POLICY_NAMES
