"""`ember bench serve` against a real Ember server (the tiny random Llama): every request
succeeds, a trace's scaled lengths come back exactly, the JSON has vLLM's names, and
failures are counted instead of ending the run."""

from __future__ import annotations

import json
import math
import random
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ember.bench.arrivals import gamma_arrivals
from ember.bench.serve import ServeTarget, parse_extra_body, parse_logit_bias, run_serve_bench, split_gaps
from ember.bench.serve_metrics import RequestResult, compute_metrics, result_block
from ember.bench.serve_workload import WorkloadSpec, build_workload
from ember.cli import app
from ember.errors import EmberError
from tests.bench.conftest import API_KEY, LiveServer

VLLM_FIELDS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")),
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "errors",
    "scaling",
]
VLLM_BLOCK = [
    "============ Serving Benchmark Result ============",
    "Successful requests:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Request throughput (req/s):",
    "Output token throughput (tok/s):",
    "Total Token throughput (tok/s):",
    "---------------Time to First Token----------------",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "-----Time per Output Token (excl. 1st token)------",
    "Mean TPOT (ms):",
    "---------------Inter-token Latency----------------",
    "P99 ITL (ms):",
    "----------------End-to-end Latency----------------",
    "Mean E2EL (ms):",
]

# arrived_at, num_prefill_tokens, num_decode_tokens: starts at 100 s to check the offset
TRACE = [(100.0, 40, 12), (100.5, 81, 7), (101.0, 17, 30), (101.2, 120, 3), (102.0, 9, 1), (103.0, 60, 21)]


def _write_trace(path: Path, rows: list[tuple[float, int, int]]) -> Path:
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens", *(f"{a},{p},{d}" for a, p, d in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bench", "serve", *args])
    return result.exit_code, result.output


def _dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_trace_run_reproduces_the_scaled_lengths_exactly(live_server: LiveServer, tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "trace.csv", [*TRACE, (200.0, 5000, 5000)])  # 7th row: not sent
    code, out = _bench(
        *("--base-url", live_server.url, "--api-key", API_KEY, "--model", "tiny"),
        *("--dataset", f"trace:{trace}", "--num-prompts", "6", "--length-scale", "0.5", "--rate-scale", "20"),
        *(
            "--save-result",
            "--result-dir",
            str(tmp_path / "results"),
            "--result-filename",
            "r.json",
            "--json",
        ),
    )
    assert code == 0, out
    data = json.loads(out)
    assert [k for k in VLLM_FIELDS if k not in data] == []
    assert data["completed"] == 6 and data["failed"] == 0, data["errors"]
    assert data["input_lens"] == [max(1, round(p * 0.5)) for _, p, _ in TRACE]
    assert data["output_lens"] == [max(1, round(d * 0.5)) for _, _, d in TRACE]
    assert data["total_output_tokens"] == sum(data["output_lens"])
    assert data["scaling"]["length_scale"] == 0.5 and data["scaling"]["rate_scale"] == 20
    assert data["scaling"]["arrivals"] == "trace" and data["request_rate"] == "trace"
    # one inter-token latency per token after the first, however the server chunked them
    assert [len(itl) for itl in data["itls"]] == [n - 1 for n in data["output_lens"]]
    assert all(t > 0 for t in data["ttfts"]) and data["p99_e2el_ms"] >= data["median_e2el_ms"] > 0
    saved = json.loads((tmp_path / "results" / "r.json").read_text())
    assert saved["output_lens"] == data["output_lens"] and saved["completed"] == 6


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_random_run_prints_vllms_result_block(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # --save-result with no --result-dir: ./results/, made as needed
    code, out = _bench(
        *("--base-url", f"{live_server.url}/v1", "--api-key", API_KEY),  # model: the first listed
        *("--num-prompts", "6", "--random-input-len", "20", "--random-output-len", "8"),
        *("--random-range-ratio", "0.5", "--request-rate", "inf", "--max-concurrency", "2", "--seed", "3"),
        "--save-result",
    )
    assert code == 0, out
    saved = list((tmp_path / "results").iterdir())
    assert [p.suffix for p in saved] == [".json"] and f"saved {Path('results') / saved[0].name}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing written beside it
    for line in VLLM_BLOCK:
        assert line in out, line
    assert "Successful requests:                     6" in out
    assert "Failed requests:                         0" in out
    assert "Maximum request concurrency:             2" in out
    assert "Scaling: random_input_len=20" in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_random_lengths_come_back_as_asked(live_server: LiveServer) -> None:
    spec = WorkloadSpec(
        num_prompts=6, random_input_len=30, random_output_len=10, random_range_ratio=0.5, seed=7
    )
    report = run_serve_bench(ServeTarget(live_server.url, "tiny", API_KEY), spec, max_concurrency=3)
    asked = report.workload.requests
    assert [r.error for r in report.run.results] == [""] * 6
    assert [r.output_len for r in report.run.results] == [q.output_len for q in asked]
    assert [len(q.prompt) for q in asked] == [q.input_len for q in asked]
    assert all(15 <= q.input_len <= 45 and 5 <= q.output_len <= 15 for q in asked)
    assert report.metrics.total_input_tokens == sum(q.input_len for q in asked)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mixed_text_prompts_with_the_end_token_banned_give_the_asked_lengths(live_server: LiveServer) -> None:
    spec = WorkloadSpec(dataset="mixed", num_prompts=5, seed=3)
    target = ServeTarget(live_server.url, "tiny", API_KEY, ignore_eos=False, logit_bias={"2": -100.0})
    report = run_serve_bench(target, spec, max_concurrency=5)
    asked = report.workload.requests
    assert [r.error for r in report.run.results] == [""] * 5
    assert [r.output_len for r in report.run.results] == [q.output_len for q in asked]
    assert all(r.input_len >= 20 for r in report.run.results)  # the server's count of prompt tokens


def test_the_mixed_dataset_is_text_of_20_to_120_words_and_a_fifth_long_outputs() -> None:
    wl = build_workload(WorkloadSpec(dataset="mixed", num_prompts=400, seed=1))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.input_len for r in wl.requests)
    assert all(20 <= r.input_len <= 120 for r in wl.requests)
    long = [r.output_len for r in wl.requests if r.output_len >= 120]
    assert all(120 <= n <= 240 for n in long) and all(
        8 <= r.output_len <= 32 for r in wl.requests if r.output_len < 120
    )
    assert 0.14 < len(long) / 400 < 0.26
    again = build_workload(WorkloadSpec(dataset="mixed", num_prompts=400, seed=1))
    assert [r.prompt for r in again.requests] == [r.prompt for r in wl.requests]


def test_logit_bias_flag() -> None:
    assert parse_logit_bias("0:-100,2:-100") == {"0": -100.0, "2": -100.0}
    assert parse_logit_bias(None) is None
    for bad in ("eos:-100", "2", "2:x"):
        with pytest.raises(EmberError, match="--logit-bias"):
            parse_logit_bias(bad)


def test_extra_body_flag() -> None:
    assert parse_extra_body('{"repeat_penalty": 1.0}') == {"repeat_penalty": 1.0}
    assert parse_extra_body(None) is None
    for bad in ("[1]", "{not json"):
        with pytest.raises(EmberError, match="--extra-body"):
            parse_extra_body(bad)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("model", "key", "expect"), [("no-such-model", API_KEY, "HTTP 404"), ("tiny", "wrong-key", "HTTP 401")]
)
def test_refused_requests_are_counted_not_fatal(
    live_server: LiveServer, model: str, key: str, expect: str
) -> None:
    code, out = _bench(
        *("--base-url", live_server.url, "--api-key", key, "--model", model),
        *("--num-prompts", "3", "--random-input-len", "5", "--random-output-len", "2", "--json"),
    )
    assert code == 0, out
    data = json.loads(out)
    assert data["completed"] == 0 and data["failed"] == 3
    assert all(e.startswith(expect) for e in data["errors"]), data["errors"]
    assert data["total_output_tokens"] == 0 and data["request_throughput"] == 0


@pytest.mark.timeout(60)
def test_a_server_that_is_down_gives_failures_not_a_crash() -> None:
    code, out = _bench(
        *("--base-url", _dead_url(), "--model", "m", "--num-prompts", "4"),
        *("--random-input-len", "4", "--random-output-len", "2"),
    )
    assert code == 0, out
    assert "Successful requests:                     0" in out
    assert "Failed requests:                         4" in out
    assert "4 failed: ConnectError" in out


@pytest.mark.timeout(60)
def test_without_a_model_a_down_server_is_a_clear_error() -> None:
    url = _dead_url()
    code, out = _bench("--base-url", url, "--num-prompts", "1")
    assert code == 1 and f"no server answers at {url}" in out


def test_request_rate_overrides_the_trace_times(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "t.csv", TRACE)
    wl = build_workload(WorkloadSpec(dataset=f"trace:{trace}", num_prompts=6, request_rate=math.inf))
    assert [r.arrival_s for r in wl.requests] == [0.0] * 6
    assert [r.output_len for r in wl.requests] == [d for _, _, d in TRACE]
    assert all(1000 <= t < 49152 for r in wl.requests for t in r.prompt)


def test_gamma_arrivals_have_the_asked_mean_rate() -> None:
    times = gamma_arrivals(4001, rate=5.0, burstiness=0.5, rng=random.Random(0))
    assert times[0] == 0.0 and times == sorted(times)
    assert 4000 / times[-1] == pytest.approx(5.0, rel=0.1)
    assert gamma_arrivals(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_chunk_gaps_split_into_one_latency_per_token() -> None:
    assert split_gaps([0.1, 0.3, 0.2], 5) == [0.1, 0.15, 0.15, 0.1, 0.1]  # extra tokens: longest gaps
    assert split_gaps([0.1, 0.2], 2) == [0.1, 0.2]
    assert split_gaps([0.1, 0.2], 1) == [0.1, 0.2]  # more chunks than tokens: kept as they came
    assert split_gaps([], 4) == []


def test_metrics_follow_vllms_definitions() -> None:
    ok = RequestResult(input_len=10, success=True, output_len=5, ttft_s=0.2, itls_s=[0.1] * 4, latency_s=0.6)
    one = RequestResult(input_len=4, success=True, output_len=1, ttft_s=0.4, latency_s=0.4)
    bad = RequestResult(input_len=99, error="HTTP 500: boom")
    m = compute_metrics([ok, one, bad], duration_s=2.0)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (2, 1, 14, 6)
    assert m.request_throughput == 1.0 and m.total_token_throughput == 10.0
    assert m.latency_ms["mean_tpot_ms"] == pytest.approx(100.0)  # one-token requests have no TPOT
    assert m.latency_ms["mean_ttft_ms"] == pytest.approx(300.0)
    block = result_block(m, head=[], tail=["Scaling: x"])
    assert block.splitlines()[1] == "Successful requests:                     2"
    assert "Benchmark duration (s):                  2.00" in block
    assert block.endswith("=" * 50 + "\nScaling: x")
