"""The chain's thread pool: results, exceptions, and answers that come after the deadline."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.pool import ChainPool
from support.net import wait_for


@pytest.fixture
def pool():
    p = ChainPool(2)
    yield p
    p.shutdown()


def test_results_and_exceptions_reach_the_waiter(pool):
    async def main():
        assert await pool.run(lambda x: x * 2, 21) == 42
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda x: 1 / x, 0)
        return threading.current_thread().name

    assert asyncio.run(main()) == "MainThread"


def test_an_answer_after_the_deadline_is_dropped_quietly(pool):
    release = threading.Event()
    finished = threading.Event()

    def slow(_):
        release.wait(10)
        finished.set()
        return "late"

    async def main():
        future = pool.run(slow, None)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(future, timeout=0.05)
        assert future.cancelled()
        release.set()
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, 10)
        await asyncio.sleep(0.05)  # let the late call_soon_threadsafe run: it must not raise
        return await pool.run(lambda x: x, "still works")

    assert asyncio.run(main()) == "still works"


def test_background_work_runs_and_its_errors_are_logged(pool, caplog):
    done = threading.Event()
    pool.submit(lambda _: done.set(), None)
    assert done.wait(10)
    pool.submit(lambda _: 1 / 0, None)
    for _ in range(200):  # bounded: up to 10 s for a pool thread to run it
        if any("background work" in r.getMessage() for r in caplog.records):
            break
        threading.Event().wait(0.05)
    assert any("background work" in r.getMessage() and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_a_full_queue_refuses_at_once_and_expired_work_is_dropped():
    import time

    from gateway.pool import DeadlineExpired, Overloaded

    pool = ChainPool(1, max_queue=2)
    release = threading.Event()
    try:
        async def main():
            blocker = pool.run(lambda _: release.wait(10), None)
            await asyncio.sleep(0.1)  # the thread holds the blocker; the queue is empty
            expired = pool.run(lambda _: "ran", None, deadline=time.monotonic() - 1)
            queued = pool.run(lambda _: "ran", None)
            with pytest.raises(Overloaded):
                pool.run(lambda _: "ran", None)
            release.set()
            assert await blocker is True
            with pytest.raises(DeadlineExpired):
                await expired
            assert await queued == "ran"
            assert pool.dropped == 1

        asyncio.run(main())
    finally:
        release.set()
        pool.shutdown()


def test_work_that_would_miss_its_deadline_is_refused_from_the_measured_pace():
    import time

    from gateway.pool import Overloaded

    pool = ChainPool(1, max_queue=100)
    release = threading.Event()
    try:
        async def main():
            await pool.run(time.sleep, 0.3)  # measured: ~0.3 s per item on one thread
            blocker = pool.run(lambda _: release.wait(10), None)
            await asyncio.sleep(0.1)
            first = pool.run(lambda _: "ran", None, deadline=time.monotonic() + 5)  # waits 0
            with pytest.raises(Overloaded):  # 2 x ~0.3 s of queue ahead, 0.4 s left
                pool.run(lambda _: "ran", None, deadline=time.monotonic() + 0.4)
            release.set()
            await blocker
            assert await first == "ran"

        asyncio.run(main())
    finally:
        release.set()
        pool.shutdown()


def test_a_wait_beyond_the_target_is_refused_and_work_of_a_gone_client_is_dropped():
    import time

    from gateway.pool import Abandoned, Overloaded

    pool = ChainPool(1, max_queue=100, max_wait=0.5)
    release = threading.Event()
    ran: list[str] = []
    try:
        async def main():
            await pool.run(time.sleep, 0.3)  # measured: ~0.3 s per item on one thread
            blocker = pool.run(lambda _: release.wait(10), None)
            await asyncio.sleep(0.1)
            gone = pool.run(ran.append, "gone", deadline=time.monotonic() + 60, abandoned=lambda: True)
            with pytest.raises(Overloaded, match="queue_wait"):  # ~0.6 s > 0.5 s, deadline far
                pool.run(ran.append, "refused", deadline=time.monotonic() + 60)
            release.set()
            await blocker
            with pytest.raises(Abandoned):
                await gone
            assert await pool.run(ran.append, "kept", abandoned=lambda: False) is None

        asyncio.run(main())
    finally:
        release.set()
        pool.shutdown()
    assert ran == ["kept"]


class _Work:
    """Stands for an attempt: something a finished thread must not keep alive."""


@pytest.mark.parametrize("kind", ["answered", "failed", "background", "dropped"])
def test_an_idle_thread_keeps_nothing_of_its_last_work(pool, kind):
    # After a burst every chain thread used to hold its last attempt (its request, its closed
    # connection) until the next one came: memory a burst left behind (issue 10).
    import gc
    import time
    import weakref

    work = _Work()
    ref = weakref.ref(work)
    done = threading.Event()

    def fn(arg):
        done.set()
        if kind == "failed":
            raise ValueError("no")
        return arg

    async def main():
        if kind == "background":
            pool.submit(fn, work)
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)
        elif kind == "dropped":  # its deadline passed before a thread took it
            with pytest.raises(Exception):
                await pool.run(fn, work, deadline=time.monotonic() - 1)
        else:
            try:
                await pool.run(fn, work)
            except ValueError:
                pass

    asyncio.run(main())
    del work
    # the thread lets go right after it hands the answer over
    wait_for(lambda: gc.collect() is not None and ref() is None, timeout=10, interval=0.02,
             what="the thread to let go of its last work")
