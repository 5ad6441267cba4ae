"""`ember bench serve`: load an OpenAI-compatible server (Ember, vLLM, ...) with a
trace or random requests and print vLLM's serving-benchmark result block."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from ember import env
from ember.cli.output import JsonOption, print_json, stage_progress
from ember.errors import EmberError

DEFAULT_URL = "http://127.0.0.1:8000"
# Where --save-result writes unless --result-dir says otherwise: a folder of its own
# (ignored by git in this repository), not the current directory.
DEFAULT_RESULT_DIR = Path("results")


def _result_path(result_dir: Path | None, filename: str | None, model: str, rate: float | None) -> Path:
    if filename is None:  # vLLM's naming: backend-rate-model-date
        rate_s = "trace" if rate is None else f"{rate:g}qps"
        filename = f"openai-{rate_s}-{model.split('/')[-1]}-{datetime.now():%Y%m%d-%H%M%S}.json"
    return (result_dir or DEFAULT_RESULT_DIR) / filename


def bench_serve_cmd(
    base_url: Annotated[
        str | None, typer.Option(help=f"Server root (EMBER_URL). [default: {DEFAULT_URL}]")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name. [default: the first one the server lists]")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Sent as 'Authorization: Bearer KEY' (or set EMBER_API_KEY).")
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(
            help="'random' (token ids), 'mixed' (text prompts of 20-120 words; 80% of outputs 8-32 "
            "tokens, 20% 120-240), or 'trace:PATH' for a CSV of arrived_at,num_prefill_tokens,..."
        ),
    ] = "random",
    num_prompts: Annotated[int, typer.Option(min=1, help="Requests to send (a trace's first N).")] = 100,
    request_rate: Annotated[
        float | None,
        typer.Option(
            help="Mean requests per second of a gamma process; 'inf' sends all at once. "
            "[default: a trace's own times; inf for random]"
        ),
    ] = None,
    burstiness: Annotated[
        float, typer.Option(help="Shape of the gamma process: 1 = Poisson, lower = burstier.")
    ] = 1.0,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Most requests in flight; the rest wait.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts, random lengths and arrivals.")] = 0,
    length_scale: Annotated[
        float, typer.Option(help="Multiply a trace's prompt and output lengths by this.")
    ] = 1.0,
    rate_scale: Annotated[
        float, typer.Option(help="Multiply a trace's arrival rate by this (times are divided by it).")
    ] = 1.0,
    random_input_len: Annotated[int, typer.Option(help="Prompt tokens of the random dataset.")] = 1024,
    random_output_len: Annotated[int, typer.Option(help="Output tokens of the random dataset.")] = 128,
    random_range_ratio: Annotated[
        float, typer.Option(help="Random lengths drawn uniformly in len * [1 - r, 1 + r].")
    ] = 0.0,
    vocab_size: Annotated[
        int, typer.Option(help="Prompts are random token ids below this (SmolLM2's vocabulary).")
    ] = 49152,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            help="Ask the server to ignore EOS so outputs have exactly the asked length "
            "(a vLLM/Ember extension: other servers may ignore it, or refuse it)."
        ),
    ] = True,
    logit_bias: Annotated[
        str | None,
        typer.Option(
            help="Send this logit_bias with every request, as TOKEN:BIAS,... (e.g. '0:-100,2:-100' "
            "bans SmolLM2's end tokens: fixed output lengths on servers without ignore_eos)."
        ),
    ] = None,
    extra_body: Annotated[
        str | None,
        typer.Option(
            help="More fields for every request, as a JSON object (e.g. '{\"repeat_penalty\": 1.0}' "
            "for llama.cpp, whose default penalty changes greedy outputs)."
        ),
    ] = None,
    save_result: Annotated[bool, typer.Option(help="Save the result JSON (vLLM's field names).")] = False,
    result_dir: Annotated[
        Path | None,
        typer.Option(help=f"Directory for --save-result, made if missing. [default: {DEFAULT_RESULT_DIR}]"),
    ] = None,
    result_filename: Annotated[
        str | None, typer.Option(help="File name for --save-result. [default: vLLM's naming]")
    ] = None,
    as_json: bool = JsonOption,
) -> None:
    """Measure TTFT, TPOT, ITL, end-to-end latency and throughput of any OpenAI-compatible
    server, with the flags and result block of vLLM's serving benchmark. Prompts are
    token-id lists of exact lengths, streamed from /v1/completions."""
    from ember.bench.serve import (
        ServeTarget,
        list_models,
        parse_extra_body,
        parse_logit_bias,
        run_serve_bench,
    )
    from ember.bench.serve_workload import WorkloadSpec

    url = base_url or os.environ.get(env.EMBER_URL) or DEFAULT_URL
    key = api_key or os.environ.get(env.EMBER_API_KEY)
    if model is None:
        names = list_models(url, key)
        if not names:
            raise EmberError(f"the server at {url} lists no models; give --model")
        model = names[0]
    spec = WorkloadSpec(
        dataset=dataset,
        num_prompts=num_prompts,
        request_rate=request_rate,
        burstiness=burstiness,
        seed=seed,
        vocab_size=vocab_size,
        random_input_len=random_input_len,
        random_output_len=random_output_len,
        random_range_ratio=random_range_ratio,
        length_scale=length_scale,
        rate_scale=rate_scale,
    )
    target = ServeTarget(
        url, model, key, ignore_eos=ignore_eos,
        logit_bias=parse_logit_bias(logit_bias), extra_body=parse_extra_body(extra_body),
    )  # fmt: skip
    with stage_progress({}, enabled=not as_json) as progress:
        report = run_serve_bench(
            target,
            spec,
            max_concurrency=max_concurrency,
            on_done=lambda done, total: progress("requests", done, total),
        )
    data = report.to_json()
    if save_result:
        path = _result_path(result_dir, result_filename, model, request_rate)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    if as_json:
        print_json(data)
        return
    typer.echo(report.block())  # plain text: vLLM's fixed-width layout must not wrap
    if save_result:
        typer.echo(f"saved {path}")
