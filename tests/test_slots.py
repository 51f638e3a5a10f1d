"""FairSlots: password checks run at most N at once, waiters served in arrival order, and a check
whose attempt was given up while it waited is not run (issue 10, recovery after a burst)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway import passwords
from gateway.pool import Abandoned, ChainPool, DeadlineExpired
from gateway.slots import FairSlots
from support.net import wait_for


def _queue_up(slots: FairSlots, names: list[str], order: list[str]) -> list[threading.Thread]:
    """Start one thread per name, each once the previous one is waiting for a slot."""
    threads = []
    for name in names:
        def take(name=name):
            with slots.held():
                order.append(name)
        thread = threading.Thread(target=take)
        waiting = slots.waiting()
        thread.start()
        wait_for(lambda: slots.waiting() == waiting + 1, 10, interval=0.001, what=f"{name} waiting")
        threads.append(thread)
    return threads


def test_waiters_get_the_slot_in_arrival_order():
    slots = FairSlots(1)
    slots.acquire()
    order: list[str] = []
    threads = _queue_up(slots, [f"t{i}" for i in range(8)], order)
    slots.release()
    for thread in threads:
        thread.join(10)
    assert order == [f"t{i}" for i in range(8)]
    assert slots.acquire(timeout=0) and not slots.waiting()  # every slot given back
    slots.release()


def test_a_released_slot_goes_to_the_waiter_not_to_a_newcomer():
    slots = FairSlots(1)
    slots.acquire()
    got, leave = threading.Event(), threading.Event()

    def waiter():
        with slots.held():
            got.set()
            leave.wait(30)
    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: slots.waiting() == 1, 10, interval=0.001, what="the waiter")
    slots.release()
    assert not slots.acquire(timeout=0)  # handed over, even if the waiter has not run yet
    assert got.wait(10)
    leave.set()
    thread.join(10)
    assert slots.acquire(timeout=0)
    slots.release()


def test_at_most_size_holders_and_a_timed_out_waiter_leaves_the_line():
    slots = FairSlots(2)
    assert slots.acquire(timeout=0) and slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0.01)
    assert slots.waiting() == 0  # gave up and left: a later release is not handed to nobody
    slots.release()
    assert slots.acquire(timeout=0)
    slots.release()
    slots.release()
    with pytest.raises(RuntimeError):
        slots.release()
    with pytest.raises(ValueError):
        FairSlots(0)


def _blocked(slots: FairSlots) -> threading.Event:
    """Hold *slots*' only slot from a thread until the returned event is set."""
    held, done = threading.Event(), threading.Event()

    def hold():
        with slots.held():
            held.set()
            done.wait(30)
    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    return done


@pytest.mark.parametrize("given_up", ["client_gone", "deadline"])
def test_a_check_given_up_while_it_waited_for_a_slot_is_not_run(monkeypatch, given_up):
    # Real pool threads and the real verify_password: one slot, held; an attempt reaches the
    # check and waits. Its client hangs up (or its deadline passes) meanwhile: when the slot
    # comes, the check raises instead of hashing, and the pool's waiter learns why.
    hashed: list[str] = []
    real = passwords._HASHER

    class Recording:  # argon2's PasswordHasher has slots: wrap it to see what is hashed
        def verify(self, encoded, password):
            hashed.append(password)
            return real.verify(encoded, password)
    monkeypatch.setattr(passwords, "_HASHER", Recording())
    monkeypatch.setattr(passwords, "_slots", FairSlots(1))
    release = _blocked(passwords._slots)
    encoded = real.hash("pw")
    gone = threading.Event()

    async def main():
        pool = ChainPool(2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.3 if given_up == "deadline" else 60)
        future = pool.run(lambda arg: passwords.verify_password(encoded, arg), "pw",
                          deadline=deadline, abandoned=gone.is_set)
        await asyncio.to_thread(wait_for, lambda: passwords._slots.waiting() == 1, 10, interval=0.005,
                                what="the check waiting for its slot")
        if given_up == "client_gone":
            gone.set()
        else:
            await asyncio.sleep(0.4)
        release.set()
        try:
            return await asyncio.wait_for(future, 10)
        except (Abandoned, DeadlineExpired) as exc:
            return exc
        finally:
            pool.shutdown()

    result = asyncio.run(main())
    assert isinstance(result, Abandoned if given_up == "client_gone" else DeadlineExpired), result
    assert hashed == []
    # Off the pool's threads nothing is given up: the check runs.
    assert passwords.verify_password(encoded, "pw") and hashed == ["pw"]
