"""The control plane's migration and fail-over counters, labelled by model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from ember.server.metrics import ClusterMetrics


def test_migrations_and_failovers_are_counted_by_model() -> None:
    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry)
    metrics.migrated("tiny", 3, 0)
    metrics.migrated("tiny", 1, 2)
    metrics.failed_over("other")
    metrics.reclaimed("other")
    text = generate_latest(registry).decode()
    assert 'ember:migrations_total{model_name="tiny"} 2.0' in text
    assert 'ember:migrated_requests_total{model_name="tiny",outcome="moved"} 4.0' in text
    assert 'ember:migrated_requests_total{model_name="tiny",outcome="stayed"} 2.0' in text
    assert 'ember:request_failovers_total{model_name="other"} 1.0' in text
    assert 'ember:idle_instances_reclaimed_total{model_name="other"} 1.0' in text
