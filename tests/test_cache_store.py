"""The credential cache's stores, against a real SQLite file and a real redis-server."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gateway.plugins.cache.redis_store import RedisStore
from gateway.plugins.cache.store import AT_LIMIT, GONE, TAKEN, Entry, SQLiteStore, StoreError
from support.net import free_port, wait_for
from support.redis import RedisServer

DAY = 86400.0


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, redis_server):
    if request.param == "sqlite":
        made = SQLiteStore(tmp_path / "state" / "cache.sqlite3")
    else:
        made = RedisStore(redis_server.url, max_age=7 * DAY, key_prefix=f"t{free_port()}:")
    yield made
    made.purge()
    made.close()


def entry(n: int | str, at: float | None = None, failures: int = 0) -> Entry:
    key = f"{n:064x}" if isinstance(n, int) else n
    return Entry(key, "kid0", f"$argon2id$fake{n}", b"\x00sealed" + str(n).encode(), time.time() if at is None else at,
                 failures)


def test_put_get_replace_delete(store):
    first = entry(1)
    assert store.get(first.key) is None
    store.put(first)
    assert store.get(first.key) == first
    assert store.take_failure(first.key, 5) == TAKEN
    assert store.get(first.key).failures == 1
    second = Entry(first.key, "kid1", "$argon2id$other", b"other", first.stored_at + 1)
    store.put(second)  # a new live login replaces the entry and its failure count
    assert store.get(first.key) == second and store.get(first.key).failures == 0
    assert store.delete(first.key) is True
    assert store.delete(first.key) is False
    assert store.get(first.key) is None


def test_failures_are_counted_atomically_up_to_the_limit(store):
    store.put(entry(2))
    key = entry(2).key
    results: list[int] = []
    lock = threading.Lock()

    def guess() -> None:
        for _ in range(10):
            result = store.take_failure(key, 5)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=guess) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results.count(TAKEN) == 5 and results.count(AT_LIMIT) == 75
    assert store.get(key).failures == 5
    assert store.give_back_failure(key) is True
    assert store.get(key).failures == 4
    assert store.take_failure(key, 5) == TAKEN and store.take_failure(key, 5) == AT_LIMIT
    assert store.take_failure(entry(3).key, 5) == GONE
    assert store.give_back_failure(entry(3).key) is False  # gone, and never created
    assert store.get(entry(3).key) is None


def test_give_back_never_goes_below_zero(store):
    store.put(entry(4))
    assert store.give_back_failure(entry(4).key) is True  # still there, at zero
    assert store.get(entry(4).key).failures == 0


def test_scan_purge_and_probe(store):
    now = time.time()
    for n in range(10):
        store.put(entry(100 + n, at=now - n * 3600))
    assert "writable" in store.probe()
    assert sorted(e.key for e in store.scan()) == sorted(entry(100 + n).key for n in range(10))
    assert store.purge(older_than=now - 4.5 * 3600) == 5
    assert sorted(e.key for e in store.scan()) == sorted(entry(100 + n).key for n in range(5))
    assert store.purge() == 5
    assert list(store.scan()) == []


# -- SQLite --------------------------------------------------------------------------------------


def test_sqlite_files_are_private_and_in_wal_mode(tmp_path):
    path = tmp_path / "state" / "cache.sqlite3"
    store = SQLiteStore(path)
    store.put(entry(5))
    for suffix in ("", "-wal", "-shm"):
        mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
        assert mode == 0o600, f"{path}{suffix} has mode {mode:o}"
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_sqlite_tightens_a_database_file_others_can_read(tmp_path):
    path = tmp_path / "cache.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    store = SQLiteStore(path)
    store.put(entry(6))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store.close()


def test_sqlite_reports_errors_as_store_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = SQLiteStore(blocker / "cache.sqlite3")  # a path below a regular file
    with pytest.raises(StoreError):
        store.get("x")


_WRITER = textwrap.dedent("""
    import sys, time
    from gateway.plugins.cache.store import Entry, SQLiteStore
    path, worker, count, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    store = SQLiteStore(path, busy_timeout=30)
    taken = 0
    for n in range(count):
        key = f"{worker:08x}{n:056x}"
        store.put(Entry(key, "kid", "$argon2id$x", bytes(200), time.time()))
        assert store.get(key) is not None
        taken += store.take_failure(shared, 50) == 1
        if n % 10 == 0:
            store.delete(key)
            store.put(Entry(key, "kid", "$argon2id$y", bytes(200), time.time()))
    print(taken)
""")


def test_sqlite_is_safe_for_several_processes(tmp_path):
    path = tmp_path / "cache.sqlite3"
    shared = "f" * 64
    SQLiteStore(path).put(Entry(shared, "kid", "h", b"s", time.time()))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w), "150", shared],
                              stdout=subprocess.PIPE, text=True) for w in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert sum(int(out) for out in outputs) == 50  # the limit held across processes
    store = SQLiteStore(path)
    assert len(list(store.scan())) == 4 * 150 + 1
    assert store.get(shared).failures == 50
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


def test_sqlite_threads_keep_their_locks_while_another_process_comes_and_goes(tmp_path):
    # Regression: opening and closing a descriptor of the database file in a process drops
    # every POSIX lock of that process's SQLite connections; another process closing its last
    # connection then deletes the WAL under their feet ("disk I/O error").
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(path)
    errors: list[BaseException] = []

    def use(n: int) -> None:
        try:
            store.put(entry(1000 + n))
            assert store.get(entry(1000 + n).key) is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for round_ in range(2):
        threads = [threading.Thread(target=use, args=(round_ * 10 + n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        other = subprocess.run([sys.executable, "-c", _WRITER, str(path), str(90 + round_), "5", "e" * 64],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr
    assert errors == []
    assert len(list(store.scan())) == 12 + 10
    store.close()


_FOREVER = textwrap.dedent("""
    import sys, time
    from gateway.plugins.cache.store import Entry, SQLiteStore
    store = SQLiteStore(sys.argv[1])
    n = 0
    while True:
        store.put(Entry(f"{n:064x}", "kid", "$argon2id$x", bytes(4000), time.time()))
        n += 1
        if n == 200:
            print("ready", flush=True)
""")


def test_sqlite_survives_sigkill_mid_write(tmp_path):
    path = tmp_path / "cache.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", _FOREVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # let it be in the middle of more writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    store = SQLiteStore(path)
    assert "writable" in store.probe()  # runs quick_check too
    entries = list(store.scan())
    assert len(entries) >= 200
    assert all(e.sealed == bytes(4000) for e in entries)  # no torn entry
    fresh = entry(7)
    store.put(fresh)
    assert store.get(fresh.key) == fresh
    store.close()


# -- Redis ---------------------------------------------------------------------------------------


def test_redis_entries_expire_on_the_server(redis_server):
    store = RedisStore(redis_server.url, max_age=0.5, key_prefix="expiry:")
    store.put(entry(8))
    client = redis_server.client()
    name = b"expiry:" + entry(8).key.encode()
    assert 0 < client.pttl(name) <= 500
    wait_for(lambda: not client.exists(name), 10, interval=0.05, what="redis to expire the entry")
    assert store.get(entry(8).key) is None
    store.close()


def test_redis_keys_carry_the_prefix_and_no_usernames(redis_server):
    store = RedisStore(redis_server.url, max_age=DAY, key_prefix="gw1:{cache}:")
    other = RedisStore(redis_server.url, max_age=DAY, key_prefix="gw2:")
    store.put(entry(9))
    other.put(entry(10))
    names = redis_server.client().keys("gw1:*")
    assert names == [b"gw1:{cache}:" + entry(9).key.encode()]
    assert [e.key for e in store.scan()] == [entry(9).key]  # the other prefix is not ours
    assert store.purge() == 1 and [e.key for e in other.scan()] == [entry(10).key]
    other.purge()


def test_redis_password(tmp_path):
    with RedisServer(tmp_path / "redis", password="redis-pass-123") as server:
        good = RedisStore(server.url, max_age=DAY, password="redis-pass-123")
        stored = entry(11)
        good.put(stored)
        assert good.get(stored.key) == stored
        anonymous = RedisStore(server.url, max_age=DAY)
        with pytest.raises(StoreError):
            anonymous.get(entry(11).key)
        wrong = RedisStore(server.url, max_age=DAY, password="nope-nope")
        with pytest.raises(StoreError):
            wrong.get(entry(11).key)


def test_redis_down_is_a_store_error():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", max_age=DAY, timeout=0.5)
    for operation in (lambda: store.get("a" * 64), lambda: store.put(entry(12)), lambda: store.delete("a" * 64),
                      lambda: store.take_failure("a" * 64, 5), store.probe):
        with pytest.raises(StoreError):
            operation()


def test_rediss_verifies_the_server_certificate(tmp_path):
    from support.pki import CA

    with RedisServer(tmp_path / "redis", tls=CA.create()) as server:
        assert server.url.startswith("rediss://localhost:")
        trusted = RedisStore(server.url, max_age=DAY, ca_file=server.ca_file)
        stored = entry(13)
        trusted.put(stored)
        assert trusted.get(stored.key) == stored
        other_ca = tmp_path / "other-ca.crt"
        other_ca.write_bytes(CA.create("another CA").pem)
        untrusted = RedisStore(server.url, max_age=DAY, ca_file=other_ca)
        with pytest.raises(StoreError):
            untrusted.get(stored.key)
        system_only = RedisStore(server.url, max_age=DAY)  # no ca_file: system trust, still verified
        with pytest.raises(StoreError):
            system_only.get(stored.key)


# -- issue 9 item 4: the store's write is conditional on being newer ----------------------------------


def test_an_older_write_never_replaces_a_newer_entry(store):
    newer, older = entry(7, at=time.time()), entry(7, at=time.time() - 60)
    older = Entry(older.key, older.kid, "$argon2id$older", b"older", older.stored_at)
    assert store.put(newer) is True
    assert store.put(older) is False  # the worker that finished late stored an older login
    assert store.get(newer.key) == newer
    same = Entry(newer.key, "kid0", "$argon2id$same-time", b"same", newer.stored_at)
    assert store.put(same) is True and store.get(newer.key) == same  # not older: written


def test_concurrent_writers_leave_the_newest_timestamp(store):
    """8 threads store one user with 8 timestamps at the same moment, 40 rounds: the entry always
    ends with the newest (unconditional writes left an older one in most rounds)."""
    writers, rounds = 8, 40
    barrier = threading.Barrier(writers)
    wrong: list[tuple[int, float, float]] = []
    errors: list[BaseException] = []
    base = time.time()  # Redis expires entries max_age after stored_at: keep them current

    def write(w: int) -> None:
        try:
            for r in range(rounds):
                at = base + r * 10 + w * 0.001  # distinct, newest from the last writer
                barrier.wait(timeout=30)
                store.put(Entry(f"{r:064x}", "kid0", f"$argon2id$w{w}", f"w{w}".encode(), at))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(w,)) for w in reversed(range(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for r in range(rounds):
        held = store.get(f"{r:064x}")
        newest = base + r * 10 + (writers - 1) * 0.001
        if held is None or held.stored_at != newest or held.password_hash != f"$argon2id$w{writers - 1}":
            wrong.append((r, held and held.stored_at, newest))
    assert wrong == []


_RACER = textwrap.dedent("""
    import sys, time
    from gateway.plugins.cache.store import Entry, SQLiteStore
    store = SQLiteStore(sys.argv[1])
    w, start = int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    for r in range(200):
        store.put(Entry(f"{r:064x}", "kid0", f"$argon2id$w{w}", b"s", 1_700_000_000.0 + r + w * 0.001))
""")


def test_sqlite_writers_in_several_processes_leave_the_newest_timestamp(tmp_path):
    path = tmp_path / "cache.sqlite3"
    SQLiteStore(path).probe()  # create the file and schema before the race
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), str(w), str(start)])
             for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    store = SQLiteStore(path)
    held = {e.key: e.stored_at for e in store.scan()}
    assert held == {f"{r:064x}": 1_700_000_000.0 + r + 3 * 0.001 for r in range(200)}
    store.close()


def test_an_entry_from_a_clock_far_ahead_does_not_block_later_writes(store):
    """Review of issue 9.4: an entry stamped by a clock an hour ahead (another instance's, or ours
    before an NTP step back) refused every later write for that hour, so a changed password never
    reached the cache and the old one kept working offline. The offline path already ignores an
    entry more than 300 s in the future; the write now replaces it too. Within that tolerance the
    later timestamp still wins."""
    now = time.time()
    far = Entry(entry(8).key, "kid0", "$argon2id$old-password", b"old", now + 3600)
    fresh = Entry(far.key, "kid0", "$argon2id$new-password", b"new", now)
    assert store.put(far) is True
    assert store.put(fresh) is True and store.get(far.key) == fresh
    near = Entry(entry(9).key, "kid0", "$argon2id$near", b"near", now + 200)
    assert store.put(near) is True
    assert store.put(Entry(near.key, "kid0", "$argon2id$late", b"late", now)) is False
    assert store.get(near.key) == near
