"""What every command prints: rich tables for people, JSON for scripts, progress
bars on stderr (so `--json` output stays clean).

When stdout is not a terminal (a pipe, a file) tables are plain aligned columns and
lines are not wrapped: nothing is cut to a terminal's width that is not there."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from ember.errors import InvalidRequestError

JsonOption = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")


def console() -> Console:
    """stdout: a terminal wraps at its width; elsewhere lines are written whole."""
    out = Console()
    if not out.is_terminal:
        out.soft_wrap = True
    return out


def err_console() -> Console:
    return Console(stderr=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


_RIGHT = {"size", "gb/s", "median s", "value"}  # numeric columns, right-aligned


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    right: Collection[str] = _RIGHT,
) -> None:
    """A table on stdout: boxed on a terminal, plain aligned columns elsewhere.
    Columns named in `right` (lower case) are right-aligned."""
    cells = [[str(v) for v in row] for row in rows]
    aligned = [c.lower() in right for c in columns]
    out = console()
    if not out.is_terminal:
        typer.echo(plain_table(title, columns, cells, aligned))
        return
    from rich.table import Table

    table = Table(title=title)
    for c, r in zip(columns, aligned, strict=True):
        table.add_column(c, justify="right" if r else "left")
    for row in cells:
        table.add_row(*row)
    out.print(table)


def plain_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]
) -> str:
    """The title on its own line, then the columns two spaces apart, never cut."""
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([*([title] if title else []), line(columns), *(line(row) for row in rows)])


def check_number(flag: str, value: float, *, positive: bool = True) -> None:
    """A finite option value, > 0 (or >= 0 with positive=False), else a clear error."""
    if math.isnan(value) or math.isinf(value) or (value <= 0 if positive else value < 0):
        kind = "positive" if positive else "non-negative"
        raise InvalidRequestError(f"{flag} must be a {kind} number, got {value}", param=flag[2:])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def stage_progress(
    labels: dict[str, str], *, enabled: bool = True
) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar driven by (stage, done, total) callbacks; total 0 = a spinner.
    Shown only when stderr is a terminal."""
    if not enabled or not err_console().is_terminal:
        yield lambda stage, done, total: None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task, description=labels.get(stage, stage), completed=done, total=total or None)

        yield update


@contextmanager
def byte_progress(label: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A download-style progress bar driven by (done_bytes, total_bytes) callbacks.
    Shown only when stderr is a terminal."""
    if not enabled or not err_console().is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=err_console()
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)
