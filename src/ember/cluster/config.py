"""ControllerConfig: the control plane's timeouts, periods and live-migration knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.cluster.migration import MigrationConfig


@dataclass(frozen=True)
class ControllerConfig:
    start_timeout_s: float = 300.0  # how long a request waits for a cold start before a 503
    tick_s: float | None = 1.0  # autoscaler, health-check and gauges period; None: only on requests
    max_model_len: int | None = None  # the engines' context cap, for ModelInfo before a load
    health_timeout_s: float = 5.0  # a node whose status() takes longer is marked down
    migrate: bool = True  # may placement live-migrate a running instance (startup-time-aware only)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
