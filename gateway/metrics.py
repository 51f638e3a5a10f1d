"""Prometheus metrics: attempts by outcome and step, latency, attempts in flight.

With several worker processes the master sets ``PROMETHEUS_MULTIPROC_DIR`` before forking, and
``/metrics`` aggregates every worker's values (prometheus_client's multi-process mode).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["Metrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Registered by the core as ``core.metrics``."""

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = None if self.multiprocess else CollectorRegistry()
        kwargs = {"registry": self.registry}
        self.attempts = Counter("authgw_attempts", "Authentication attempts by outcome and deciding step",
                                ["outcome", "step", "front_door", "from_cache"], **kwargs)
        self.latency = Histogram("authgw_attempt_duration_seconds", "Time to decide an attempt",
                                 ["front_door"], buckets=_BUCKETS, **kwargs)
        self.in_flight = Gauge("authgw_attempts_in_flight", "Attempts being decided",
                               multiprocess_mode="livesum", **kwargs)

        # labels() takes a lock and builds tuples; the label sets are few, so keep the children.
        self._counters: dict[tuple[str, str, str, bool], Any] = {}
        self._histograms: dict[str, Any] = {}

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        key = (decision.outcome.value, decision.step or "none", attempt.front_door, decision.from_cache)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters.setdefault(key, self.attempts.labels(*key[:3], "true" if key[3] else "false"))
        counter.inc()
        histogram = self._histograms.get(attempt.front_door)
        if histogram is None:
            histogram = self._histograms.setdefault(attempt.front_door, self.latency.labels(attempt.front_door))
        histogram.observe(time.monotonic() - attempt.started)

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
