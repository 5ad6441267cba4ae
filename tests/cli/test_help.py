"""Every command's --help as a user reads it: paragraphs without the source's line
breaks, arguments in capitals, every default shown."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ember.cli import app

WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # no wrapping by the terminal's width


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)  # the top group imports its commands when asked
        yield (*path, name), cmd
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*path, name))


ALL = sorted(path for path, _ in commands(typer.main.get_command(app)))
assert ("bench", "cli") in ALL and ("store", "ls") in ALL


def help_of(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def on_one_line(text: str, out: str) -> bool:
    words = " ".join(text.split())
    return any(words in " ".join(line.split()) for line in out.splitlines())


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_every_help_flows_as_paragraphs(path: tuple[str, ...]) -> None:
    cmd = dict(commands(typer.main.get_command(app)))[path]
    out = help_of(*path)
    paragraphs = [p for p in (cmd.help or "").split("\n\n") if p.strip()]
    assert paragraphs
    for paragraph in paragraphs:  # wide enough for any: a paragraph broken in two is a bug
        assert on_one_line(paragraph, out), paragraph


@pytest.mark.parametrize("group", [(), ("store",), ("bench",)], ids=lambda g: " ".join(("ember", *g)))
def test_command_lists_show_each_summary_on_one_line(group: tuple[str, ...]) -> None:
    out = help_of(*group)
    for path, cmd in commands(typer.main.get_command(app)):
        if path[:-1] == group:
            assert on_one_line((cmd.help or "").split("\n\n")[0], out), path


def test_usage_names_arguments_in_capitals() -> None:
    assert "Usage: root deploy [OPTIONS] MODEL" in help_of("deploy")
    assert "Usage: root bench load [OPTIONS] [TARGET]" in help_of("bench", "load")


def test_defaults_written_in_help_text_are_shown() -> None:
    # "[default: ...]" in help is also rich markup; it must show, not vanish as a tag
    assert "[default: http://127.0.0.1:8000]" in help_of("deploy")
    serve = help_of("serve")
    for shown in ("[default: 8000]", "[default: gittins]", "[default: smollm2-135m-instruct]"):
        assert shown in serve
