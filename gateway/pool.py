"""The threads that run the chain (plugins block: ldap3 sockets, gssapi, argon2).

Lighter than ``loop.run_in_executor`` on a ``ThreadPoolExecutor``: one ``SimpleQueue`` in, and
the thread resolves the attempt's asyncio future itself through ``call_soon_threadsafe``, with no
``concurrent.futures.Future`` in between. Measured alone, a hand-off and back costs ~23 µs of CPU
this way against ~46 µs (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

__all__ = ["ChainPool"]

log = logging.getLogger("authgw.chain")


#: What a pool thread is working on (``current.arg``): the service log's JSON lines take the
#: request id of the attempt from it (:mod:`gateway.logs`).
current = threading.local()


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the attempt's deadline passed and its waiter gave up
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ChainPool:
    """A fixed number of daemon threads taking work from one queue."""

    def __init__(self, threads: int, name: str = "authgw-chain") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        self._started = False
        self._lock = threading.Lock()

    def _put(self, item: tuple) -> None:
        # Threads start with the first work, so a process that only validated the configuration
        # (the master, before it forks its workers) never has any.
        if not self._started:
            with self._lock:
                if not self._started:
                    for thread in self._threads:
                        thread.start()
                    self._started = True
        self._queue.put(item)

    def run(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future:
        """Run ``fn(arg)`` on a pool thread; the returned future (of the running loop) resolves
        with its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put((loop, future, fn, arg))
        return future

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Run ``fn(arg)`` on a pool thread and forget it (exceptions are logged)."""
        self._put((None, None, fn, arg))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            loop, future, fn, arg = item
            current.arg = arg
            try:
                result, error = fn(arg), None
            except BaseException as exc:  # handed to the waiter, which decides
                result, error = None, exc
            if loop is None:
                if error is not None:
                    log.error("background work %r raised", fn, exc_info=error)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:  # the loop closed while the plugin ran (shutting down)
                pass

    def shutdown(self) -> None:
        """Let the threads finish what they hold and exit; queued work is dropped."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._started:
            for _ in self._threads:
                self._queue.put(None)
