"""The scheduling policies by name: what EngineConfig and the CLI accept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.engine.config import EngineConfig
from ember.engine.policies import POLICIES, POLICY_NAMES
from ember.errors import InvalidRequestError


def test_an_unknown_policy_is_a_clear_error_naming_the_known_ones() -> None:
    with pytest.raises(
        InvalidRequestError, match="unknown scheduler 'lottery'; known: mlfq, fcfs, srpt, gittins$"
    ) as err:
        EngineConfig(scheduler="lottery")
    assert err.value.param == "scheduler"
    for name in POLICY_NAMES:
        assert EngineConfig(scheduler=name).scheduler == name


def test_every_policy_name_has_a_registered_policy_and_back() -> None:
    """The names (engine/options.py, what `ember serve --scheduler` accepts) and the
    registry (engine/policies.py) are two lists: a policy added to one only fails here."""
    assert set(POLICIES) == set(POLICY_NAMES)


@pytest.mark.timeout(60)
def test_the_policy_names_load_without_torch_or_numpy() -> None:
    """The CLI checks `--scheduler` against them without paying for torch's import."""
    code = (
        "import sys, ember.engine.options as o; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules; print(*o.SCHEDULERS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert tuple(out.stdout.split()) == POLICY_NAMES
