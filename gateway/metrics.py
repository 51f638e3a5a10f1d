"""Prometheus metrics: attempts by outcome and step, latency, attempts in flight.

An attempt only adds to plain in-process counters (a dict entry, a histogram bucket, an int):
prometheus_client's own ``inc``/``observe`` cost ~25 µs each in multi-process mode (a
``getpid`` and an mmap write per call) and were most of the metrics' per-attempt work.
:meth:`Metrics.publish` hands the deltas to prometheus_client: at every scrape of this process,
at ``gateway_shutdown``, and, with several workers, every :data:`PUBLISH_INTERVAL` seconds from a
thread, so that ``/metrics`` (prometheus_client's multi-process mode: the master sets
``PROMETHEUS_MULTIPROC_DIR`` before forking, each worker writes its own files, a scrape sums
them) shows another worker's attempts at most that late. A worker killed outright loses at most
its last interval's counts. Names, labels and buckets are those prometheus_client exposes for the
same observations. No configuration keys.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["Metrics", "PUBLISH_INTERVAL"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUBLISH_INTERVAL = 0.5  # seconds: how stale another worker's figures may be in a scrape


class _LocalGauge:
    """``inc``/``dec`` as on a prometheus Gauge, without its per-call store write."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class _LocalHistogram:
    __slots__ = ("counts", "sum", "child", "published_counts", "published_sum")

    def __init__(self, child: Any) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.child = child
        self.published_counts = [0] * (len(_BUCKETS) + 1)
        self.published_sum = 0.0


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
        self._in_flight = Gauge("authgw_attempts_in_flight", "Attempts being decided",
                                multiprocess_mode="livesum", **kwargs)
        self.in_flight = _LocalGauge()  # the HTTP layer's inc()/dec() around each attempt
        self._in_flight_published = 0

        self._lock = threading.Lock()  # attempts may finish on pool threads
        # key -> [count, published count, prometheus child]; the child is made with the first
        # attempt of its key, so that its ``_created`` time is that attempt's, as before.
        self._counters: dict[tuple[str, str, str, bool], list] = {}
        self._histograms: dict[str, _LocalHistogram] = {}
        self._publish_lock = threading.Lock()
        self._publisher: threading.Thread | None = None
        self._stopped = threading.Event()

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        elapsed = time.monotonic() - attempt.started
        key = (decision.outcome.value, decision.step or "none", attempt.front_door, decision.from_cache)
        with self._lock:
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = [0, 0, self.attempts.labels(*key[:3], "true" if key[3] else "false")]
                if self.multiprocess and self._publisher is None:
                    self._start_publisher()
            counter[0] += 1
            histogram = self._histograms.get(attempt.front_door)
            if histogram is None:
                histogram = self._histograms[attempt.front_door] = _LocalHistogram(
                    self.latency.labels(attempt.front_door))
            histogram.counts[bisect_left(_BUCKETS, elapsed)] += 1  # the first bound >= elapsed
            histogram.sum += elapsed

    def publish(self) -> None:
        """Hand what changed since the last call to prometheus_client's store."""
        with self._publish_lock:
            with self._lock:
                counters = [(c, c[0]) for c in self._counters.values() if c[0] != c[1]]
                histograms = [(h, h.counts[:], h.sum) for h in self._histograms.values()]
            for counter, count in counters:
                counter[2].inc(count - counter[1])
                counter[1] = count
            for histogram, counts, total in histograms:
                # prometheus_client has no public "add n to a bucket"; these are what observe() uses.
                for index, count in enumerate(counts):
                    if count != histogram.published_counts[index]:
                        histogram.child._buckets[index].inc(count - histogram.published_counts[index])
                        histogram.published_counts[index] = count
                if total != histogram.published_sum:
                    histogram.child._sum.inc(total - histogram.published_sum)
                    histogram.published_sum = total
            if self.in_flight.value != self._in_flight_published:  # idle workers write nothing
                self._in_flight.set(self.in_flight.value)
                self._in_flight_published = self.in_flight.value

    def _start_publisher(self) -> None:
        self._publisher = threading.Thread(target=self._publish_every_interval, name="authgw-metrics", daemon=True)
        self._publisher.start()

    def _publish_every_interval(self) -> None:
        while not self._stopped.wait(PUBLISH_INTERVAL):
            self.publish()

    @hookimpl
    def gateway_shutdown(self) -> None:
        self._stopped.set()
        self.publish()

    def exposition(self) -> bytes:
        self.publish()
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
