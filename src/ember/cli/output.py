"""What every command prints: rich tables for people, JSON for scripts, progress
bars on stderr (so `--json` output stays clean)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

JsonOption = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")


def console() -> Console:
    return Console()


def err_console() -> Console:
    return Console(stderr=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c.lower() in {"size", "gb/s", "median s", "value"} else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console().print(table)


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
    with Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=err_console()
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)
