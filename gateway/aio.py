"""Blocking-style plugin code run on the event loop, through greenlets.

A chain step written as ordinary blocking code (the LDAP plugin: send a request, wait for its
answer) hands each attempt to a chain thread and back: with one worker, a fifth of an LDAP
login's CPU, the GIL passed between the loop and the threads (docs/performance.md). Such a step
can instead run on the event loop when its waits go through this module: :func:`run`, a
coroutine, starts the code in a greenlet; inside it, :func:`wait_io` and :func:`wait` park the
greenlet until the socket is ready or the awaitable is done, and the loop serves other requests
meanwhile. The same code called on a chain thread, or with no loop at all (``authgw`` commands),
takes its ordinary blocking path: :func:`on_loop` tells which. So one implementation serves both, rather than a second, asynchronous copy of the
LDAP code; SQLAlchemy's asyncio support is built the same way, on the same library.

Rules for code that runs here (``loop_capable`` steps, docs/plugins.md): every wait goes through
this module (or :func:`blocking`, which runs a blocking call on a thread), and no lock is held
across a wait, since another greenlet on the same thread would then block the whole loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable, TypeVar

import greenlet

__all__ = ["blocking", "expire", "in_loop_thread", "on_loop", "run", "running_on", "wait", "wait_io"]

T = TypeVar("T")


#: What a :class:`_Spawned` greenlet hands its driver when the call is over (the outcome waits
#: on the greenlet, taken by :func:`run`: a parked greenlet keeps nothing of a finished call).
_FINISHED = object()


class _Spawned(greenlet.greenlet):
    """The greenlet that runs :func:`run`'s calls, one after another, each driven by the
    coroutine's greenlet (``driver``) that awaits for it.

    Kept for the next call rather than made per call: in CPython 3.11 a greenlet's first
    Python frame takes a frame stack of its own (a 16 KiB ``mmap``, its page faults, and a
    ``munmap`` when the greenlet ends), 15-25 µs of each call (docs/performance.md)."""

    def __init__(self) -> None:
        super().__init__(self._serve)
        self.driver: greenlet.greenlet | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def _serve(self, fn: Callable[..., Any], args: tuple) -> None:
        while True:
            try:
                self.value = fn(*args)
            except greenlet.GreenletExit:  # killed (collected mid-call): end, as any greenlet
                raise
            except BaseException as exc:  # noqa: BLE001 - raised again by run(), in the driver
                self.error = exc
            fn = args = None  # type: ignore[assignment] - nothing of this call outlives it
            fn, args = self.driver.switch(_FINISHED)


#: Idle :class:`_Spawned` greenlets of this thread (a greenlet runs only on its own thread):
#: as many as calls have run at once here, up to :data:`_KEEP`.
_idle = threading.local()
_KEEP = 64


async def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a greenlet on this loop, its :func:`wait` calls awaited here.

    The greenlet sees the caller's context variables (a copy, as a task would). When the task
    is cancelled while the greenlet waits, the greenlet gets the ``CancelledError`` where it
    waits (so its ``finally`` blocks run and its sockets are closed) and is run to its end; then
    the cancellation goes on.
    """
    idle = getattr(_idle, "greenlets", None)
    if idle is None:
        idle = _idle.greenlets = []
    child = idle.pop() if idle else _Spawned()
    child.driver = greenlet.getcurrent()
    child.gr_context = contextvars.copy_context()
    cancelled: asyncio.CancelledError | None = None
    pending = child.switch(fn, args)
    while pending is not _FINISHED:
        try:
            value = await pending
        except asyncio.CancelledError as exc:
            cancelled = exc
            pending = child.throw(exc)
        except BaseException as exc:  # noqa: BLE001 - the waiting code decides what it means
            pending = child.throw(exc)
        else:
            pending = child.switch(value)
    value, error = child.value, child.error
    child.driver = child.value = child.error = child.gr_context = None
    if len(idle) < _KEEP:
        idle.append(child)
    if cancelled is not None:
        raise cancelled
    if error is not None:
        raise error
    return value


def on_loop() -> bool:
    """Whether this code runs in a greenlet of :func:`run` (so it must not block)."""
    return isinstance(greenlet.getcurrent(), _Spawned)


def in_loop_thread() -> bool:
    """Whether this thread runs an event loop now (a call here must not wait on a lock)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def running_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether *loop* is the loop running in this thread."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def wait(awaitable: Awaitable[T]) -> T:
    """The result of *awaitable*, awaited by the loop while this greenlet is parked."""
    current = greenlet.getcurrent()
    if not isinstance(current, _Spawned):
        raise RuntimeError("gateway.aio.wait outside gateway.aio.run")
    return current.driver.switch(awaitable)


def expire(future: asyncio.Future) -> None:
    """Fail *future* with :class:`TimeoutError` unless it is done: a wait's timer."""
    if not future.done():
        future.set_exception(TimeoutError("timed out"))


def _ready(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def wait_io(sock: socket.socket, *, write: bool = False, timeout: float) -> None:
    """Park until *sock* is readable (writable with *write*); :class:`TimeoutError` after
    *timeout* seconds, as a blocking socket with that timeout would raise."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    fd = sock.fileno()
    if write:
        loop.add_writer(fd, _ready, future)
    else:
        loop.add_reader(fd, _ready, future)
    timer = loop.call_later(timeout, expire, future)
    try:
        wait(future)
    finally:
        timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def blocking(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """``fn(*args)``: on *executor* (the loop's default one when None), waited for, when on the
    loop (it would block the loop); called here otherwise. A caller whose calls may hang (a
    connect to a dead server) brings its own executor, so that they cannot fill the default
    one that other work shares."""
    if not on_loop():
        return fn(*args)
    return wait(asyncio.get_running_loop().run_in_executor(executor, fn, *args))
