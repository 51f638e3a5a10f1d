"""A bounded HTTP/1.1 keep-alive load generator for the benchmarks (loopback only).

``run(url, requests_fn, concurrency, seconds)`` opens ``concurrency`` persistent connections
(raw asyncio streams, so the client costs less than the server it measures) and sends GET
requests whose headers come from ``requests_fn(i)`` until ``seconds`` pass or ``max_requests``
were sent. It returns counts by status, the rate and latency percentiles.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

__all__ = ["LoadResult", "children", "cpu_seconds", "measure", "run"]


@dataclass
class LoadResult:
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self, label: str) -> str:
        return (f"{label:<34} {self.rate:>9.0f} req/s  p50 {self.percentile(0.50) * 1000:6.2f} ms  "
                f"p99 {self.percentile(0.99) * 1000:6.2f} ms  statuses {dict(sorted(self.statuses.items()))}")


async def _worker(host: str, port: int, path: str, headers_fn: Callable[[int], dict[str, str]],
                  counter: list[int], stop_at: float, max_requests: int, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at and counter[0] < max_requests:
            i = counter[0]
            counter[0] += 1
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers_fn(i).items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
            started = time.perf_counter()
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - started)
            status = int(status_line.split()[1])
            result.statuses[status] = result.statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _run(url: str, headers_fn, concurrency: int, seconds: float, max_requests: int) -> LoadResult:
    parts = urlsplit(url)
    assert parts.hostname in ("127.0.0.1", "::1", "localhost"), "benchmarks only talk to loopback"
    result = LoadResult(seconds=0.0)
    started = time.perf_counter()
    stop_at = started + seconds
    counter = [0]
    await asyncio.gather(*(_worker(parts.hostname, parts.port, parts.path or "/", headers_fn, counter, stop_at,
                                   max_requests, result) for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


def run(url: str, headers_fn: Callable[[int], dict[str, str]] = lambda i: {}, *, concurrency: int = 32,
        seconds: float = 10.0, max_requests: int = 2_000_000) -> LoadResult:
    return asyncio.run(_run(url, headers_fn, concurrency, seconds, max_requests))


def measure(label: str, url: str, headers_fn: Callable[[int], dict[str, str]], pids: list[int], *,
            concurrency: int, seconds: float) -> LoadResult:
    """Run a load against *url*, print its summary with the CPU *pids* spent per request."""
    before = cpu_seconds(pids)
    result = run(url, headers_fn, concurrency=concurrency, seconds=seconds)
    cpu = cpu_seconds(pids) - before
    print(result.summary(label) + f"  server CPU/request {cpu / max(result.count, 1) * 1e6:7.0f} us")
    return result


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds of *pids* and their reaped children, from /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def median(values: list[float]) -> float:
    return statistics.median(values)
