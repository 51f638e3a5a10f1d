"""The threads that run the chain (plugins block: ldap3 sockets, gssapi, argon2).

Lighter than ``loop.run_in_executor`` on a ``ThreadPoolExecutor``: one ``SimpleQueue`` in, and
the thread resolves the attempt's asyncio future itself through ``call_soon_threadsafe``, with no
``concurrent.futures.Future`` in between. Measured alone, a hand-off and back costs ~23 µs of CPU
this way against ~46 µs (docs/performance.md).

Overload (issue 10): excess work is refused at once (:class:`Overloaded`, answered 503 on the
event loop) instead of waiting behind work that will miss its deadline. It is refused when the
queue holds ``limits.queue`` items, or sooner when the wait it would have, estimated from the
measured time per item (how fast the threads really finish work on this machine, now), exceeds
``limits.queue_wait`` or the attempt's deadline. Work is dropped unrun when a thread finds its
deadline passed or its client gone (the connection closed while it queued), so a burst does not
leave seconds of dead work behind it: the gateway answers normally again as soon as the burst ends.
A step that waits before costly work (a password check for its turn) asks :func:`check_wanted`
the same question when its turn comes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

__all__ = ["Abandoned", "ChainPool", "DeadlineExpired", "Overloaded", "check_wanted"]

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


class Overloaded(Exception):
    """The queue is full: the attempt is refused without waiting (``limits.queue``)."""


class DeadlineExpired(Exception):
    """The attempt's deadline passed before a thread took it; it was not run."""


class Abandoned(Exception):
    """The attempt's client went away before a thread took it; it was not run."""


def _unwanted(future: asyncio.Future | None, deadline: float | None,
              abandoned: Callable[[], bool] | None) -> Exception | None:
    """Why nobody will read this work's answer any more, or None while somebody will."""
    if deadline is not None and time.monotonic() >= deadline:
        return DeadlineExpired()
    if future is not None and (future.done() or (abandoned is not None and abandoned())):
        return Abandoned()
    return None


def check_wanted() -> None:
    """Raise :class:`DeadlineExpired` or :class:`Abandoned` when the attempt this pool thread
    runs is no longer wanted (its deadline passed, or its client hung up); elsewhere do nothing.

    For a step about to start costly work after a wait (a password hash after its turn in
    :class:`gateway.slots.FairSlots`): the chain answers the attempt ``deadline_exceeded`` or
    ``client_gone`` (:class:`gateway.chain.ChainFolder`), as if the pool had dropped it unrun.
    """
    wanted = getattr(current, "wanted", None)
    if wanted is not None:
        unwanted = _unwanted(*wanted)
        if unwanted is not None:
            raise unwanted


class ChainPool:
    """A fixed number of daemon threads taking work from one bounded queue."""

    def __init__(self, threads: int, name: str = "authgw-chain", max_queue: int | None = None,
                 max_wait: float | None = None) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.max_queue = max_queue if max_queue is not None else 4 * threads
        self.max_wait = max_wait  # seconds of estimated queue wait beyond which work is refused
        self.dropped = 0  # attempts not run: deadline passed or client gone (for tests, metrics)
        self._size = threads
        self._per_item: float | None = None  # moving average of seconds per item (None: unknown)
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

    def waiting(self) -> int:
        """Work queued and not yet taken by a thread (approximate, as any queue size is)."""
        return self._queue.qsize()

    def run(self, fn: Callable[[Any], Any], arg: Any, deadline: float | None = None,
            abandoned: Callable[[], bool] | None = None) -> asyncio.Future:
        """Run ``fn(arg)`` on a pool thread; the returned future (of the running loop) resolves
        with its result or exception. Raises :class:`Overloaded` at once when the queue is full
        or the estimated wait is too long; the future fails with :class:`DeadlineExpired` when
        *deadline* (``time.monotonic()``) passes before a thread takes the work, and with
        :class:`Abandoned` when *abandoned()* (called on the thread: it must be a cheap read,
        such as a transport's ``is_closing``) says the client has gone by then."""
        waiting = self._queue.qsize()
        if waiting >= self.max_queue:
            raise Overloaded(f"{self.max_queue} attempts already wait for a chain thread")
        per_item = self._per_item
        if per_item is not None and waiting:
            wait = (waiting + 1) * per_item / self._size
            if self.max_wait is not None and wait > self.max_wait:
                raise Overloaded(f"{waiting} attempts wait, ~{per_item:.2f}s each: ~{wait:.2f}s, over "
                                 f"limits.queue_wait ({self.max_wait:g}s)")
            if deadline is not None and wait > deadline - time.monotonic():
                raise Overloaded(f"{waiting} attempts wait, ~{per_item:.2f}s each: this one would miss its deadline")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put((loop, future, fn, arg, deadline, abandoned))
        return future

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Run ``fn(arg)`` on a pool thread and forget it (exceptions are logged). Not bounded:
        callers submit only small, already-decided work (a late notification)."""
        self._put((None, None, fn, arg, None, None))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)
            # An idle thread holds nothing of its last attempt (its request, its closed
            # connection) while it waits for the next one: after a burst, that was every thread's.
            item = None

    def _run(self, loop, future, fn, arg, deadline, abandoned) -> None:
        # Work nobody will read: its waiter has answered (or is about to answer) "deadline
        # exceeded", or its client closed the connection (a proxy that gave up, a load
        # generator that stopped). Running it would only delay the work queued behind it.
        unwanted = _unwanted(future, deadline, abandoned)
        if unwanted is not None:
            self.dropped += 1
            try:
                loop.call_soon_threadsafe(_resolve, future, None, unwanted)
            except RuntimeError:
                pass
            return
        current.arg = arg
        current.wanted = (future, deadline, abandoned) if future is not None else None
        started = time.monotonic()
        try:
            result, error = fn(arg), None
        except Exception as exc:  # handed to the waiter, which decides
            result, error = None, exc
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt re-raised in the event loop would end the
            # worker: the waiter gets an ordinary exception, and fails closed on it.
            result, error = None, RuntimeError(f"{exc.__class__.__name__} raised on a chain thread")
            error.__cause__ = exc
        finally:
            current.wanted = current.arg = None
        if loop is None:
            if error is not None:
                log.error("background work %r raised", fn, exc_info=error)
            return
        took = time.monotonic() - started  # an unlocked update may lose a sample, no more
        self._per_item = took if self._per_item is None else 0.9 * self._per_item + 0.1 * took
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
