"""What every `ember` command shares: help text that reads as flowing paragraphs,
arguments named in capitals (`ember deploy [OPTIONS] MODEL`), and EmberError printed
as `error: ...` on stderr with exit status 1 (anything else is a bug and keeps its
traceback).

Every typer app of the CLI is an `EmberTyper`, so each command it registers is an
`EmberCommand` and each group an `EmberGroup`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ember.errors import EmberError


def flow(text: str | None) -> str | None:
    """Docstring text as paragraphs without the line breaks of the source: lines are
    joined within a paragraph, paragraphs stay apart (a blank line between)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def literal(text: str | None) -> str | None:
    """Text shown as written: help is rich markup, where `[default: 30]` would be a tag
    and vanish; a backslash keeps such a bracket."""
    return re.sub(r"\[(?=[a-z#/@])", r"\\[", text) if text else text


class EmberCommand(TyperCommand):
    """A command whose help flows and whose arguments show as NAME, [NAME] when optional."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["rich_markup_mode"] = "rich"  # the mode `literal` escapes for, in every typer version
        super().__init__(*args, **kwargs)
        self.help = literal(flow(self.help))
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar is None and param.name:
                param.metavar = param.name.upper()
            if isinstance(param, TyperArgument | TyperOption):
                param.help = literal(flow(param.help))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # typer writes a required argument as {NAME}; the usual form is a bare NAME.
        pieces: list[str] = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


class EmberGroup(TyperGroup):
    """A group of commands; EmberError from any of them -> `error: ...`, exit 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["rich_markup_mode"] = "rich"
        super().__init__(*args, **kwargs)
        self.help = literal(flow(self.help))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EmberError as exc:
            typer.echo(f"error: {exc}", err=True)  # with its detail: this is the machine it is about
            raise typer.Exit(1) from exc


class LazyGroup(EmberGroup):
    """A group whose commands are imported when one is run or listed: `ember status`
    then imports the client code alone, not the server's settings or the benchmarks.
    `lazy` maps each name to "module:attribute", a command function or an EmberTyper."""

    lazy: dict[str, str] = {}  # noqa: RUF012  (set once by the app that uses it)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.lazy, *(name for name in super().list_commands(ctx) if name not in self.lazy)]

    def get_command(self, ctx: Any, name: str) -> Any:
        if name in self.lazy and name not in self.commands:
            self.add_command(_load(name, self.lazy[name]), name)
        return super().get_command(ctx, name)


def _load(name: str, target: str) -> Any:
    """The click command for "module:attribute" (a command function or an EmberTyper)."""
    import importlib

    module, attribute = target.split(":")
    obj = getattr(importlib.import_module(module), attribute)
    if isinstance(obj, typer.Typer):
        group = typer.main.get_group(obj)
        group.name = name  # help lists a group by its own name
        return group
    single = EmberTyper()
    single.command(name)(obj)
    return typer.main.get_command(single)  # one command and no callback: the command itself


class EmberTyper(typer.Typer):
    """typer.Typer whose groups are EmberGroups and commands EmberCommands."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", EmberGroup)
        kwargs.setdefault("no_args_is_help", True)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        kwargs.setdefault("cls", EmberCommand)
        return super().command(*args, **kwargs)
