"""ServeSettings: typed values, the layers (defaults, ember.toml, EMBER_* variables,
flags) and errors that name the setting and where its value came from."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from ember.cluster.placement import POLICIES
from ember.engine.config import EngineConfig
from ember.engine.options import SCHEDULERS, SWAP_MODES
from ember.errors import InvalidRequestError
from ember.server.settings import SETTINGS, LogLevel, PlacementName, ServeSettings, help_of, load_settings


def test_each_layer_overrides_the_one_before(tmp_path: Path) -> None:
    config = tmp_path / "ember.toml"
    config.write_text('scheduler = "fcfs"\nswap = "off"\nport = 9001\nnodes = 3\nmodels = ["a", "b"]\n')
    environ = {"EMBER_SWAP": "reactive", "EMBER_PORT": "9002", "EMBER_NODES": "2", "EMBER_MODELS": "c,d"}
    flags = {"port": 9003, "models": [], "nodes": None}  # [] and None: flags not given
    s = load_settings(config, flags, environ)
    assert (s.scheduler, s.swap, s.port, s.nodes, s.models) == ("fcfs", "reactive", 9003, 2, ["c", "d"])
    assert s.max_num_seqs == EngineConfig().max_num_seqs  # untouched: the default
    assert load_settings(None, {}, {}).scheduler == EngineConfig().scheduler == "gittins"


def test_the_api_key_home_and_registry_variables_are_settings(tmp_path: Path) -> None:
    environ = {
        "EMBER_API_KEY": "k",
        "EMBER_HOME": str(tmp_path),
        "EMBER_REGISTRY": "http://r",
        "EMBER_URL": "x",
    }
    s = load_settings(None, {}, environ)
    assert (s.api_key, s.home, s.registry) == ("k", str(tmp_path), "http://r")


@pytest.mark.parametrize(
    ("config", "environ", "flags", "message"),
    [
        ("", {}, {"scheduler": "mflq"}, "scheduler='mflq' (from --scheduler): Input should be 'mlfq'"),
        ('swap = "sometimes"\n', {}, {}, "bad setting swap='sometimes' (from {config})"),
        ("", {"EMBER_PLACEMENT": "best"}, {}, "bad setting placement='best' (from EMBER_PLACEMENT)"),
        ("", {"EMBER_PORT": "http"}, {}, "port='http' (from EMBER_PORT): Input should be a valid integer"),
        ("", {}, {"port": 70000}, "port=70000 (from --port)"),
        ("", {}, {"max_num_seqs": 0}, "max_num_seqs=0 (from --max-num-seqs)"),
        ("bogus = 1\nport = 1\n", {}, {}, "{config}: unknown settings ['bogus']"),
        ("port = [", {}, {}, "{config}: "),
    ],
    ids=["flag", "toml", "env", "not-an-int", "range", "minimum", "unknown-toml-key", "bad-toml"],
)  # fmt: skip
def test_bad_values_are_errors_naming_setting_and_source(
    tmp_path: Path, config: str, environ: dict[str, str], flags: dict[str, object], message: str
) -> None:
    path = tmp_path / "ember.toml"
    path.write_text(config)
    with pytest.raises(InvalidRequestError) as exc:
        load_settings(path, flags, environ)
    assert message.format(config=path) in exc.value.message


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no config file"):
        load_settings(tmp_path / "nope.toml", {}, {})


def test_choices_are_the_ones_the_engine_and_the_cluster_know() -> None:
    hints = get_type_hints(ServeSettings)
    assert get_args(hints["scheduler"]) == SCHEDULERS
    assert get_args(hints["swap"]) == SWAP_MODES
    assert set(get_args(PlacementName)) == set(POLICIES)
    literals = {"scheduler": SCHEDULERS, "swap": SWAP_MODES, "placement": get_args(PlacementName),
                "log_level": get_args(LogLevel)}  # fmt: skip
    for name, literal in literals.items():  # each choice explained in the flag's help
        assert all(choice in help_of(name) for choice in literal), name


def test_engine_options_make_a_valid_engine_config() -> None:
    s = ServeSettings(scheduler="srpt", swap="off", kv_cache_bytes=1 << 20, max_model_len=64)
    config = EngineConfig(**s.engine_options())
    assert (config.scheduler, config.swap, config.kv_cache_bytes, config.max_model_len) == (
        "srpt",
        "off",
        1 << 20,
        64,
    )


def test_docs_list_every_setting_with_its_flag_and_variable() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    for name in SETTINGS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/serving.md has no row for {name}"
        assert f"EMBER_{name.upper()}" in row


def test_node_budget_defaults_are_the_stores() -> None:
    from ember.server.settings import DEFAULT_DISK_BYTES, DEFAULT_DRAM_BYTES
    from ember.store.node import DEFAULT_DISK_BUDGET, DEFAULT_DRAM_BUDGET

    assert (DEFAULT_DRAM_BYTES, DEFAULT_DISK_BYTES) == (DEFAULT_DRAM_BUDGET, DEFAULT_DISK_BUDGET)


def test_budgets_and_no_migration_come_from_flags_and_variables() -> None:
    env = {"EMBER_NO_MIGRATION": "true", "EMBER_DISK_BYTES": "4000000"}
    s = load_settings(None, {"dram_bytes": 2_000_000}, env)
    assert (s.dram_bytes, s.disk_bytes, s.no_migration) == (2_000_000, 4_000_000, True)
    assert load_settings(None, {}, {}).no_migration is False
    with pytest.raises(InvalidRequestError, match=r"dram_bytes=0 \(from --dram-bytes\)"):
        load_settings(None, {"dram_bytes": 0}, {})
    with pytest.raises(InvalidRequestError, match="disk_bytes='lots' \\(from EMBER_DISK_BYTES\\)"):
        load_settings(None, {}, {"EMBER_DISK_BYTES": "lots"})
