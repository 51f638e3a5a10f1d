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

prometheus_client maps each worker's files (``counter_PID.db`` ...) and writes into them as
memory: on a full disk a page of a sparse file has no block, and the write is SIGBUS. With the
metrics directory's disk full, every worker died of it at its start or first attempt, and their
replacements too: no request was answered (review of the reliability modules). A worker therefore
gives its files their blocks (:func:`_allocate`) before prometheus_client writes a new entry
(its children are made at a publish, not at the attempt); while it cannot, its counts wait in
memory (not in ``/metrics``, one ERROR line) and it tries again at each publish.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["Metrics", "PUBLISH_INTERVAL"]

log = logging.getLogger("authgw.metrics")

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUBLISH_INTERVAL = 0.5  # seconds: how stale another worker's figures may be in a scrape

#: Bytes of a value file one entry may take, counted generously (prometheus_client writes the JSON
#: of the metric's name, labels and help, ~250 bytes here, and two doubles), and the step by which
#: the files are allocated.
_ENTRY_BYTES = 1024
_STEP_BYTES = 64 * 1024
_HISTOGRAM_ENTRIES = len(_BUCKETS) + 2  # a child's buckets, +Inf and sum


def _allocate(directory: str, pid: int, prefix: str, entries: int) -> str | None:
    """Give this process's value file of *prefix* (``counter``, ``histogram``, ``gauge_livesum``)
    the blocks for the entries it holds and *entries* more, now (``posix_fallocate``), before
    prometheus_client writes them into its mapping of the file: on a full disk a page without its
    block is SIGBUS. A file made here starts at 64 KiB (prometheus_client's own start is a sparse
    1 MiB), so that a dead worker's file, kept for its counts, holds no more. None, or why not; a
    file made here and not allocated is removed (a scrape would fail on it)."""
    path = os.path.join(directory, f"{prefix}_{pid}.db")
    made = False
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            made = True
        except FileExistsError:  # made before, or a reused pid's (whose counts go on)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 4, 0)
            used = struct.unpack("i", head)[0] if len(head) == 4 else 0  # prometheus_client's bytes in use
            wanted = max(used, 8) + entries * _ENTRY_BYTES
            os.posix_fallocate(fd, 0, -(-wanted // _STEP_BYTES) * _STEP_BYTES)
        finally:
            os.close(fd)
    except OSError as exc:
        if made:
            try:
                os.unlink(path)
            except OSError:
                pass
        return f"{path}: {exc.strerror or errno.errorcode.get(exc.errno, exc)}"
    return None


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
        # prometheus_client's metrics, made once this process's files are allocated (:meth:`_made`)
        self.attempts: Counter | None = None
        self.latency: Histogram | None = None
        self._in_flight: Gauge | None = None
        self._unallocated: str | None = None  # why the files are not allocated (logged once)
        self.in_flight = _LocalGauge()  # the HTTP layer's inc()/dec() around each attempt
        self._in_flight_published = 0

        self._lock = threading.Lock()  # attempts may finish on pool threads
        # key -> [count, published count, prometheus child]; with one process the child is made
        # with the first attempt of its key, so that its ``_created`` time is that attempt's;
        # with several, at the next publish, once its file has room (:meth:`_make_children`).
        self._counters: dict[tuple[str, str, str, bool], list] = {}
        self._histograms: dict[str, _LocalHistogram] = {}
        self._publish_lock = threading.Lock()
        self._publisher: threading.Thread | None = None
        self._stopped = threading.Event()
        self._made()

    def _made(self) -> bool:
        """Whether prometheus_client's metrics exist: made now if the in-flight gauge's file can
        be allocated (the gauge writes its entry when made)."""
        if self.attempts is not None:
            return True
        if not self._room("gauge_livesum", 1):
            return False
        kwargs = {"registry": self.registry}
        attempts = Counter("authgw_attempts", "Authentication attempts by outcome and deciding step",
                           ["outcome", "step", "front_door", "from_cache"], **kwargs)
        self.latency = Histogram("authgw_attempt_duration_seconds", "Time to decide an attempt",
                                 ["front_door"], buckets=_BUCKETS, **kwargs)
        self._in_flight = Gauge("authgw_attempts_in_flight", "Attempts being decided",
                                multiprocess_mode="livesum", **kwargs)
        self.attempts = attempts  # last: it says the others are made too
        return True

    def _room(self, prefix: str, entries: int) -> bool:
        """Whether this worker's value file of *prefix* has the blocks for *entries* more
        (:func:`_allocate`; always, with one process and no files). Says once when it has not,
        and when it has again."""
        if not self.multiprocess or not entries:
            return True
        problem = _allocate(os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid(), prefix, entries)
        if problem is not None:
            if self._unallocated is None:
                log.error("metrics: cannot allocate this worker's metric files (%s): its attempts are counted in "
                          "memory and are not in /metrics until the disk takes them (free space where "
                          "PROMETHEUS_MULTIPROC_DIR, TMPDIR, points)", problem)
            self._unallocated = problem
            return False
        if self._unallocated is not None:
            log.warning("metrics: this worker's metric files are allocated now; its attempts are in /metrics")
            self._unallocated = None
        return True

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        elapsed = time.monotonic() - attempt.started
        key = (decision.outcome.value, decision.step or "none", attempt.front_door, decision.from_cache)
        with self._lock:
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = [0, 0, self._counter_child(key)]
                if self.multiprocess and self._publisher is None:
                    self._start_publisher()
            counter[0] += 1
            histogram = self._histograms.get(attempt.front_door)
            if histogram is None:
                histogram = self._histograms[attempt.front_door] = _LocalHistogram(
                    self._histogram_child(attempt.front_door))
            histogram.counts[bisect_left(_BUCKETS, elapsed)] += 1  # the first bound >= elapsed
            histogram.sum += elapsed

    def _counter_child(self, key: tuple[str, str, str, bool]):
        # In several processes, made by :meth:`publish` once its file has room (:func:`_allocate`)
        if self.attempts is None or self.multiprocess:
            return None
        return self.attempts.labels(*key[:3], "true" if key[3] else "false")

    def _histogram_child(self, front_door: str):
        return None if self.latency is None or self.multiprocess else self.latency.labels(front_door)

    def _make_children(self) -> bool:
        """Make the prometheus children of the keys new since the last publish, their files'
        room allocated first (the lock is held); False when it could not be."""
        counters = [(key, c) for key, c in self._counters.items() if c[2] is None]
        histograms = [(door, h) for door, h in self._histograms.items() if h.child is None]
        if not (self._room("counter", len(counters))
                and self._room("histogram", _HISTOGRAM_ENTRIES * len(histograms))):
            return False
        for key, counter in counters:
            counter[2] = self.attempts.labels(*key[:3], "true" if key[3] else "false")
        for front_door, histogram in histograms:
            histogram.child = self.latency.labels(front_door)
        return True

    def publish(self) -> None:
        """Hand what changed since the last call to prometheus_client's store."""
        with self._publish_lock:
            if not self._made():
                return  # kept in memory until the files can be allocated
            with self._lock:
                if not self._make_children():
                    return
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
