"""The login throttle's stores when what they stand on moves (items left by the reviews of the
throttle): a reader that keeps SQLite from checkpointing, and a Redis whose clock steps forward.

* The SQLite store's WAL had no bound. SQLite cannot checkpoint past a reader's snapshot (a
  backup, an operator's ``sqlite3`` shell inside a transaction), so each transaction was appended
  to ``throttle.sqlite3-wal``: a flood of new names grew it by some 28 KB a guess (1.4 GB for
  50,000 guesses, the database 27 MB), past the cap on the file, on to a full disk. Now past
  ``MAX_WAL_BYTES`` a checkpoint is tried and, when the reader stops it, the attempt is refused.
* The Redis store dated failures by Redis's ``TIME`` and let keys expire on Redis's clock: a step
  of that clock forward by a window freed every count at once. Now each instance measures Redis's
  clock against its own boot clock, a step is taken out of the store's time, counters outlive
  their window by a margin, and a step past that margin refuses every reservation for a window.

Real SQLite files and a real redis-server; Redis's wall clock is stepped by a small
``LD_PRELOAD`` library built here (libfaketime deadlocks in jemalloc's start-up), the gateway's
boot clock only where a window must pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import struct
import subprocess
import time

import pytest
from support.gateway import static_users, write_conf
from support.redis import RedisServer

import gateway.throttle_stores as stores
from gateway.model import Outcome
from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle
from gateway.throttle_stores import SQLiteStore, StoreUnavailable

CLIENT = "198.51.100.7"

# -- the SQLite store's WAL ---------------------------------------------------------------------------

WAL_CAP = 1024 * 1024


@pytest.fixture
def sqlite_throttle(tmp_path, monkeypatch):
    # raising=False: the store had no bound on its WAL before this review
    monkeypatch.setattr(SQLiteStore, "MAX_WAL_BYTES", WAL_CAP, raising=False)
    monkeypatch.setattr(SQLiteStore, "_CHECKPOINT_EVERY", 0.0, raising=False)  # each attempt tries
    settings = ThrottleSettings(store="sqlite", user_failures=3, user_client_failures=3, client_failures=30,
                                window=600)
    throttle = Throttle(settings, state_dir=tmp_path, workers=2)
    assert throttle.kind == "sqlite"
    yield throttle
    throttle.close()


def guess(throttle: Throttle, user: str, client: str = CLIENT) -> bool:
    """One wrong password: whether it was let through to the chain."""
    ticket = throttle.admit(user, client)
    if ticket is None:
        return False
    throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
    return True


def flood(throttle: Throttle, start: int, count: int) -> int:
    """Guesses at new names from new addresses: how many were let through."""
    return sum(guess(throttle, f"spray-{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
               for i in range(start, start + count))


def wal_size(path) -> int:
    return os.path.getsize(f"{path}-wal")


def test_a_reader_holding_a_snapshot_cannot_grow_the_sqlite_wal_past_its_bound(tmp_path, sqlite_throttle, caplog):
    path = tmp_path / "throttle.sqlite3"
    victim = sqlite_throttle.ticket("alice", CLIENT)
    assert [guess(sqlite_throttle, "alice") for _ in range(2)] == [True, True]

    reader = sqlite3.connect(path, isolation_level=None)  # a backup, a sqlite3 shell mid-transaction
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM failure").fetchone()
        with caplog.at_level(logging.WARNING, logger="authgw.throttle"):
            let_through = flood(sqlite_throttle, 0, 2000)
        size = wal_size(path)
        # one transaction past the bound at most (a few pages), never a guess's worth each
        assert size <= WAL_CAP + 256 * 1024, f"{let_through} guesses grew the WAL to {size} bytes past {WAL_CAP}"
        assert let_through < 2000, "nothing was refused while the WAL could not be checkpointed"
        assert "WAL" in caplog.text and "cannot be checkpointed" in caplog.text
        assert not guess(sqlite_throttle, "alice"), "a refused store let the victim's guesser through"
    finally:
        reader.execute("COMMIT")
        reader.close()

    # the reader let go: the next reservation checkpoints and empties the WAL; no count was lost
    assert guess(sqlite_throttle, "alice"), "the store kept refusing after the reader let go"
    assert not guess(sqlite_throttle, "alice"), "the victim's count was forgotten"
    assert wal_size(path) <= WAL_CAP
    db = sqlite3.connect(path)
    try:
        (rows,) = db.execute("SELECT count(*) FROM failure WHERE key = ?", (victim.pair,)).fetchone()
    finally:
        db.close()
    assert rows == 3


# -- Redis's clock stepped forward ------------------------------------------------------------------

_STEP_SOURCE = r"""
/* CLOCK_REALTIME plus the milliseconds held in the 8-byte file $CLOCK_STEP_FILE, read at each
   call; raw system calls only (jemalloc asks the time before anything else is set up). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *step_ms;

static int64_t step(void) {
    if (!step_ms) {
        const char *name = getenv("CLOCK_STEP_FILE");
        int fd = name ? open(name, O_RDONLY) : -1;
        if (fd < 0) return 0;
        void *p = mmap(0, 8, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) return 0;
        step_ms = p;
    }
    return *step_ms;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    long rc = syscall(SYS_clock_gettime, id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        int64_t ns = (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec + step() * 1000000;
        ts->tv_sec = ns / 1000000000;
        ts->tv_nsec = ns % 1000000000;
    }
    return (int)rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


@pytest.fixture(scope="module")
def step_library(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the clock-stepping library")
    directory = tmp_path_factory.mktemp("clockstep")
    (directory / "step.c").write_text(_STEP_SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(directory / "step.so"), str(directory / "step.c")],
                   check=True, timeout=120, capture_output=True)
    return directory / "step.so"


class SteppedRedis:
    """A real redis-server whose wall clock (``TIME``, key expiry) is stepped by :meth:`step`."""

    def __init__(self, directory, library, monkeypatch) -> None:
        self.file = directory / "clock-step"
        directory.mkdir(parents=True, exist_ok=True)
        self.file.write_bytes(struct.pack("<q", 0))
        self.server = RedisServer(directory / "redis")
        with monkeypatch.context() as env:  # only the redis-server started here inherits these
            env.setenv("LD_PRELOAD", str(library))
            env.setenv("CLOCK_STEP_FILE", str(self.file))
            self.server.start()
        self.stepped = 0.0

    def step(self, seconds: float) -> None:
        self.stepped += seconds
        with open(self.file, "r+b") as f:
            f.write(struct.pack("<q", int(self.stepped * 1000)))

    def time(self) -> float:
        seconds, micros = self.server.client().time()
        return seconds + micros / 1e6


@pytest.fixture
def stepped_redis(tmp_path, step_library, monkeypatch):
    redis = SteppedRedis(tmp_path / "stepped", step_library, monkeypatch)
    try:
        before = redis.time()
        redis.step(86400)
        assert redis.time() - before > 86000, "the library does not step redis-server's clock"
        redis.step(-86400)
        yield redis
    finally:
        redis.server.stop()


@pytest.fixture
def boot_clock(monkeypatch):
    """The gateway's boot clock, moved on by hand as ``boot_clock[0]`` seconds (with real time)."""
    extra = [0.0]
    real = stores._uptime if hasattr(stores, "_uptime") else time.monotonic
    monkeypatch.setattr(stores, "_uptime", lambda: real() + extra[0], raising=False)
    return extra


WINDOW = 60.0


def redis_throttle(redis: SteppedRedis) -> Throttle:
    settings = ThrottleSettings(store="redis", user_failures=3, user_client_failures=3, client_failures=30,
                                window=WINDOW, redis={"url": redis.server.url, "timeout": 2})
    return Throttle(settings)


def admitted(throttle: Throttle, user: str) -> bool | str:
    """A wrong password's fate: True let through, False throttled (429), "503" the store refused."""
    try:
        return guess(throttle, user)
    except StoreUnavailable:
        return "503"


def test_a_step_of_redis_s_clock_forward_by_a_window_frees_no_guess(stepped_redis, boot_clock):
    throttle = redis_throttle(stepped_redis)
    try:
        assert [admitted(throttle, "alice") for _ in range(4)] == [True, True, True, False]
        reloaded = redis_throttle(stepped_redis)  # a reload: the new store has not asked Redis yet
        reloaded.carry_over(throttle)
        throttle.close()
        throttle = reloaded
        stepped_redis.step(WINDOW * 2)  # more than a window, less than the counters' margin
        assert admitted(throttle, "alice") is False, "Redis's clock stepped forward freed the guesser"
        assert admitted(throttle, "bob") is True, "a step taken out of the store's time refused a fresh user"
        # and the counts still expire with time: a window on both clocks
        stepped_redis.step(WINDOW + 1)
        boot_clock[0] += WINDOW + 1
        assert admitted(throttle, "alice") is True, "the counts outlived their window after a step"
    finally:
        throttle.close()


def test_a_step_past_the_counters_margin_refuses_for_a_window_rather_than_frees(stepped_redis, boot_clock):
    throttle = redis_throttle(stepped_redis)
    other = redis_throttle(stepped_redis)  # another instance, which saw the store before the step too
    try:
        assert [admitted(throttle, "alice") for _ in range(4)] == [True, True, True, False]
        assert admitted(other, "carol") is True
        stepped_redis.step(86400)  # a day: Redis has expired every counter
        assert admitted(throttle, "alice") == "503", "counts lost to a step of Redis's clock let guesses through"
        assert admitted(other, "alice") == "503"
        assert admitted(other, "dave") == "503", "the other instance took the store's time as it was"
        stepped_redis.step(WINDOW + 1)
        boot_clock[0] += WINDOW + 1
        assert admitted(other, "dave") is True, "the store refused past a window after the step"
    finally:
        throttle.close()
        other.close()


def test_a_gateway_refuses_a_guess_redis_s_clock_step_would_have_freed(tmp_path, demo_hash, stepped_redis,
                                                                        start_gateway):
    """End to end through ``authgw serve``: three wrong passwords, then Redis's clock jumps
    forward past the window. The fourth guess reached the directory (401) before; it is 429, a
    right password still 200, and after a step of a day, 503 until a window passes."""
    window = 600
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "health": {"probe_interval": 3600},
                                    "throttle": {"store": "redis", "window": window,
                                                 "redis": {"url": stepped_redis.server.url, "timeout": 2}}}),
        **static_users({"alice": demo_hash, "bob": demo_hash})})
    gw = start_gateway(directory)
    assert [gw.auth("alice", f"wrong-{i}").status for i in range(4)] == [401, 401, 401, 429]
    stepped_redis.step(window + 100)
    assert gw.auth("alice", "wrong-4").status == 429, "a step of Redis's clock handed the guesser a new budget"
    assert gw.auth("bob", "demo-password").status == 200
    stepped_redis.step(86400)
    assert [gw.auth(name, "wrong-5").status for name in ("alice", "bob")] == [503, 503]
    assert "jumped ahead" in gw.output()
