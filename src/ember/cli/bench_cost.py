"""`ember bench cost`: fit the scheduling replay's cost model to this machine.

Registered on the `bench` typer app: `bench_app.command("cost")(cost_command)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ember.cli.output import JsonOption, console, print_json, print_table, stage_progress


def cost_command(
    out: Annotated[Path, typer.Option(help="Write the fitted cost model (JSON) here.")],
    model: Annotated[
        str | None, typer.Option(help="Store name or checkpoint directory (default: SmolLM2).")
    ] = None,
    seconds: Annotated[
        float,
        typer.Option(min=0, help="Repeat the grid of batch shapes for about this long (at least once)."),
    ] = 300.0,
    as_json: bool = JsonOption,
) -> None:
    """Time the real engine's iterations over a grid of batch shapes (prefills, decode
    batches, contexts, mixes), fit the cost model a replay of the schedulers runs on
    (`a + b*tokens + c*prefill pairs + d*sequences + e*decode KV reads`, plus swap bytes
    / bandwidth) and report its error on held-out iterations."""
    from ember.bench.sched_calibrate import calibrate
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    name = model or ensure_default_model(LocalStore())
    with stage_progress({}, enabled=not as_json) as progress:
        result = calibrate(name, seconds=seconds, progress=progress)
    cost = result.cost
    cost.save(out)
    if as_json:
        print_json(cost.to_json())
        return
    rows = [[k, f"{v:.4g}"] for k, v in cost.to_json()["coef"].items()]
    rows.append(["swap bytes/s", f"{cost.swap_bytes_per_s:.4g}"])
    print_table(
        f"cost model of {name} ({result.samples} iterations, {result.passes} passes)", ["term", "value"], rows
    )
    err = cost.fit_error
    if err is not None:
        console().print(
            f"held-out relative error over {err.samples} iterations: "
            f"median {err.median:.1%}, P90 {err.p90:.1%}"
        )
    console().print(f"written to {out}")
