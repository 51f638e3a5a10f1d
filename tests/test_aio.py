"""gateway.aio: blocking-style code on the event loop, in greenlets kept from call to call.

The greenlets are reused (a new one per call cost a frame stack's mmap and munmap each), so
these check what reuse could break: each call's own context, results and exceptions reaching
the caller, cancellation where the code waits, and nothing of a finished call kept alive.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import socket
import weakref

import greenlet
import pytest

from gateway import aio

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_aio_var", default="unset")


class Token:
    """Something a call holds, to see (by weak reference) whether it outlives the call."""


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request):
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return lambda coro: uvloop.run(coro)
    return asyncio.run


def test_results_exceptions_and_on_loop(run_loop):
    def add(a, b):
        assert aio.on_loop()
        return a + b

    def fails():
        raise LookupError("from the greenlet")

    async def main():
        assert not aio.on_loop()
        assert await aio.run(add, 2, 3) == 5
        with pytest.raises(LookupError, match="from the greenlet"):
            await aio.run(fails)
        assert await aio.run(add, "a", "b") == "ab"  # the greenlet that raised serves again

    run_loop(main())
    assert not aio.on_loop()


def test_a_greenlet_serves_one_call_after_another_and_concurrent_calls_get_their_own(run_loop):
    seen: list[greenlet.greenlet] = []

    def who(delay):
        seen.append(greenlet.getcurrent())
        if delay:
            aio.wait(asyncio.sleep(delay))
        return greenlet.getcurrent()

    async def main():
        first = await aio.run(who, 0)
        second = await aio.run(who, 0)
        assert first is second  # reused
        together = await asyncio.gather(*(aio.run(who, 0.01) for _ in range(5)))
        assert len({id(g) for g in together}) == 5  # each waiting call has its own
        again = await asyncio.gather(*(aio.run(who, 0.01) for _ in range(5)))
        assert {id(g) for g in again} == {id(g) for g in together}  # and they are kept

    run_loop(main())
    assert all(isinstance(g, greenlet.greenlet) for g in seen)


def test_each_call_sees_a_copy_of_its_callers_context_and_leaves_nothing_for_the_next(run_loop):
    def read_and_set(value):
        before = VAR.get()
        VAR.set(value)
        aio.wait(asyncio.sleep(0))
        return before, VAR.get()

    async def main():
        VAR.set("caller")
        assert await aio.run(read_and_set, "first") == ("caller", "first")
        assert VAR.get() == "caller"  # a copy: the call's change stays in it
        VAR.set("caller again")
        # the same greenlet, a fresh copy: neither the last call's value nor the old caller's
        assert await aio.run(read_and_set, "second") == ("caller again", "second")

    run_loop(main())


def test_a_finished_call_leaves_nothing_alive_in_the_kept_greenlet(run_loop):
    refs: list[weakref.ref] = []

    def holds(fail):
        token = Token()
        refs.append(weakref.ref(token))
        aio.wait(asyncio.sleep(0))
        if fail:
            raise ValueError("no")
        return token

    async def main():
        result = await aio.run(holds, False)
        assert refs[-1]() is result
        del result
        assert refs[-1]() is None  # the value was the call's only reference, and it is gone
        try:
            await aio.run(holds, True)
        except ValueError:
            pass
        gc.collect()  # a traceback and its frames form a cycle
        assert refs[-1]() is None

    run_loop(main())


def test_a_cancelled_call_is_interrupted_where_it_waits_runs_its_finally_and_the_greenlet_serves_on(run_loop):
    events: list[str] = []

    def waits(sock):
        try:
            aio.wait_io(sock, timeout=30)  # nothing will ever arrive
            events.append("woke")
        except asyncio.CancelledError:
            events.append("cancelled where it waited")
            raise
        finally:
            events.append("finally")

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            task = asyncio.ensure_future(aio.run(waits, a))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert events == ["cancelled where it waited", "finally"]
            assert await aio.run(lambda: VAR.get()) == "unset"
            # the reader was removed: data now arriving wakes nobody and breaks nothing
            b.send(b"x")
            await asyncio.sleep(0.01)
        finally:
            a.close()
            b.close()

    run_loop(main())


def test_wait_outside_run_is_an_error():
    pending = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="outside gateway.aio.run"):
        aio.wait(pending)
    pending.close()
