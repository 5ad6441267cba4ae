"""`ember bench cli`: start-up to exit of the client commands against the floor of
`python -c "import typer, httpx"`.

Registered on the `bench` typer app: `bench_app.command("cli")(cli_command)`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ember.cli.output import JsonOption, console, print_json, print_table, stage_progress


def cli_command(
    url: Annotated[
        str | None,
        typer.Option(help="Run `ember status` against this server instead of starting one of its own."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Runs of each command (medians are reported).")] = 5,
    as_json: bool = JsonOption,
) -> None:
    """Time `ember --help`, `ember status` against a running server and with none, each
    a fresh process, next to `python -c "import typer, httpx"`, interleaved. Without
    --url it starts a server of its own (the admin API over one node, no model loaded)
    in a child process."""
    from ember.bench.cli_startup import BASELINE, run_cli_bench

    with stage_progress({}, enabled=not as_json) as p:
        p("starting", 0, 0)
        report = run_cli_bench(url, repeats, progress=lambda done, total: p("measuring", done, total))
    if as_json:
        print_json(report.to_json())
        return
    base = report.median(BASELINE)
    print_table(
        f"CLI start-up to exit: medians of {report.repeats} (seconds)",
        ["command", "median s", "/ baseline"],
        [[c, f"{report.median(c):.3f}", f"{report.median(c) / base:.2f}"] for c in report.times_s],
        right={"median s", "/ baseline"},
    )
    print_table(
        "targets",
        ["target line", "value", "goal", "status"],
        [[t["name"], f"{t['ratio']:.2f}", f"<= {t['goal']:.1f}", "met" if t["met"] else "NOT MET"]
         for t in report.targets()],
    )  # fmt: skip
    console().print(f"server: {report.server}")
