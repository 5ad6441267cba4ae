"""Prometheus metrics with vLLM's names under the `ember:` prefix, labelled by model.

Request-level histograms and counters are observed as requests finish; the gauges
(running, waiting, KV usage) and engine counters (preemptions, swaps) are read from
each model's engine when /metrics is scraped, so they are never stale; so is the
server's own count of requests in flight (`ember:server_requests_in_flight`, no label).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ember.engine.request import EngineStats

if TYPE_CHECKING:
    from ember.cluster.estimator import Observation
    from ember.cluster.messages import InstanceInfo

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip


_ENGINE_COUNTERS = {
    "num_preemptions": "Preemptions of running requests.",
    "num_swaps_out": "Jobs whose KV blocks were swapped out to host memory.",
    "num_swaps_in": "Jobs whose KV blocks were swapped back in.",
    "num_recomputations": "Preempted jobs whose KV cache was recomputed.",
}


class _EngineCollector(Collector):
    def __init__(self, sources: Callable[[], Mapping[str, EngineStats]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        snapshot = self._sources()
        running = GaugeMetricFamily(
            "ember:num_requests_running", "Requests in the running batch.", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            "ember:num_requests_waiting", "Requests waiting to run.", labels=["model_name"]
        )
        usage = GaugeMetricFamily(
            "ember:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", labels=["model_name"]
        )
        counters = {
            name: CounterMetricFamily(f"ember:{name}", doc, labels=["model_name"])
            for name, doc in _ENGINE_COUNTERS.items()
        }
        for model, g in snapshot.items():
            running.add_metric([model], g.num_running)
            waiting.add_metric([model], g.num_waiting)
            usage.add_metric([model], g.kv_cache_usage)
            for name, family in counters.items():
                family.add_metric([model], getattr(g, name))
        yield from (running, waiting, usage, *counters.values())


class ServerMetrics:
    """The server's metrics registry (one per app, so tests never share state)."""

    def __init__(
        self, engine_stats: Callable[[], Mapping[str, EngineStats]], in_flight: Callable[[], int] = lambda: 0
    ) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        Gauge(
            "ember:server_requests_in_flight",
            "Requests the server holds, from admission until their response ends: what --max-in-flight "
            "limits (num_requests_running counts the engines' batches).",
            registry=self.registry,
        ).set_function(in_flight)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=_LATENCY_BUCKETS)

        self.ttft = hist("ember:time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("ember:inter_token_latency_seconds", "Time between two output tokens.")
        self.e2e = hist("ember:e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = hist("ember:request_queue_time_seconds", "Time from arrival to first scheduling.")
        self.prompt_tokens = Counter(
            "ember:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "ember:generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.requests = Counter(
            "ember:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ClusterMetrics:
    """The control plane's metrics, labelled by model (deployment): cold starts and load
    bytes and seconds by tier, estimated and actual start-up times, scale events, live
    migrations and the requests they moved, requests failed over from a dead node.
    Implements ember.cluster.events.ClusterEvents."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        tiered = [*labels, "tier"]
        self.cold_starts = Counter(
            "ember:cold_starts", "Instances started, by the tier the weights came from.", tiered,
            registry=registry,
        )  # fmt: skip
        self.load_bytes = Counter(
            "ember:load_bytes", "Checkpoint bytes loaded to start instances.", tiered, registry=registry
        )
        self.load_seconds = Counter(
            "ember:load_seconds", "Seconds spent loading weights to start instances.", tiered,
            registry=registry,
        )  # fmt: skip
        self.estimated = Histogram(
            "ember:startup_time_estimated_seconds", "Start-up time placement expected.", labels,
            registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.actual = Histogram(
            "ember:startup_time_seconds", "Start-up time from placement to a ready instance.", labels,
            registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.scale = Counter(
            "ember:scale_events", "Instances started (up) and stopped (down).", [*labels, "direction"],
            registry=registry,
        )  # fmt: skip
        self.migrations = Counter(
            "ember:migrations", "Live migrations of an instance's requests to another node.", labels,
            registry=registry,
        )  # fmt: skip
        self.migrated_requests = Counter(
            "ember:migrated_requests",
            "Requests in live migrations: moved to the destination, or stayed on the source.",
            [*labels, "outcome"], registry=registry,
        )  # fmt: skip
        self.failovers = Counter(
            "ember:request_failovers", "Requests resumed on another instance after their node failed.",
            labels, registry=registry,
        )  # fmt: skip
        self.reclaims = Counter(
            "ember:idle_instances_reclaimed",
            "Idle instances stopped before their keep-alive ended because a start needed their slot.",
            labels, registry=registry,
        )  # fmt: skip

    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        self.cold_starts.labels(deployment, info.tier).inc()
        self.load_bytes.labels(deployment, info.tier).inc(info.nbytes)
        self.load_seconds.labels(deployment, info.tier).inc(info.load_s)
        self.estimated.labels(deployment).observe(observed.estimated_s)
        self.actual.labels(deployment).observe(observed.actual_s)

    def scaled(self, deployment: str, direction: str) -> None:
        self.scale.labels(deployment, direction).inc()

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        self.migrations.labels(deployment).inc()
        self.migrated_requests.labels(deployment, "moved").inc(moved)
        self.migrated_requests.labels(deployment, "stayed").inc(stayed)

    def failed_over(self, deployment: str) -> None:
        self.failovers.labels(deployment).inc()

    def reclaimed(self, deployment: str) -> None:
        self.reclaims.labels(deployment).inc()
