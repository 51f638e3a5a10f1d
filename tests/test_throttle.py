"""Issue 9 items 4 and 5 through real ``authgw serve`` processes in front of a real slapd: one
identity whatever the spelling, throttling counted before the chain, shared by workers (SQLite)
and instances (Redis), keyed per (user, client). Directory binds are counted by slapd's
monitor (``Slapd.bind_count``)."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from pathlib import Path

import pytest

from support.fakead import FakeAD
from support.gateway import GatewayProcess, write_conf
from support.redis import RedisServer
from support.slapd import Slapd

TOKEN = secrets.token_urlsafe(32)
SPELLINGS = ["bob", " bob", "bob ", "bob\u00a0", "\uff42\uff4f\uff42", "\u3000bob", "b\u200bob", "BOB"]
#: slapd binds each of these as kim: it lowers U+0130 (capital I with a dot above) to i, while
#: str.casefold gives i and a combining dot (another key), also from I + U+0307 (NFKC composes it).
DOTTED = ["kim", "K\u0130M", "k\u0130m", "KI\u0307M"]


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("bob", "bob-Passw0rd", cn="Bob Builder", mail="bob@example.com")
    server.add_user("carol", "carol-Passw0rd", cn="Carol", mail="carol@example.com")
    server.add_user("kim", "kim-Passw0rd", cn="Kim", mail="kim@example.com")
    yield server
    server.stop()


@pytest.fixture
def directory(slapd):
    if not slapd.running:  # a test stopped it
        slapd.start()
    return slapd


def conf(path: Path, slapd: Slapd, *, throttle: dict, plugins: tuple = (), extra: dict | None = None,
         workers: int = 1, extra_core: dict | None = None) -> Path:
    core = {"chain": ["ldap"], "plugins": list(plugins), "trusted_proxies": ["127.0.0.1/32"], "throttle": throttle, "workers": workers,
            "api_tokens": [{"name": "portal", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}],
            "health": {"probe_interval": 3600},  # a periodic probe is a bind: these tests count them
            **(extra_core or {})}
    return write_conf(path, {"gateway.yaml": json.dumps(core),
                             "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=0)),
                             **(extra or {})})


def api(gw: GatewayProcess, username: str, password: str) -> dict:
    r = gw.post("/v1/authenticate", json.dumps({"username": username, "password": password}).encode(),
                {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status in (200, 429, 503), (r.status, r.body)
    return r.json()


def binds_per_attempt(gw: GatewayProcess, slapd: Slapd) -> int:
    """Directory binds one wrong password costs this gateway (user bind, service re-bind)."""
    before = slapd.bind_count()
    assert api(gw, "carol", "wrong")["outcome"] == "invalid_credentials"
    return slapd.bind_count() - before


def test_spellings_of_one_name_are_one_identity_for_the_throttle(tmp_path, directory, start_gateway):
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={"user_failures": 5, "window": 600}))
    per = binds_per_attempt(gw, directory)
    assert per >= 1
    before = directory.bind_count()
    outcomes = [api(gw, SPELLINGS[i % len(SPELLINGS)], f"guess-{i}")["outcome"] for i in range(200)]
    assert outcomes.count("invalid_credentials") == 5 and outcomes.count("throttled") == 195, outcomes[:12]
    assert directory.bind_count() - before <= 5 * per, "200 spellings of bob reached the directory"
    right = api(gw, "\uff42\uff4f\uff42", "bob-Passw0rd")
    assert right["outcome"] == "throttled", "the canonical user is the one that is throttled"
    assert {a["username"] for a in gw.audit()[-20:]} <= {"bob", "BOB"}, "audited canonically (case kept)"


def test_the_identity_is_the_directorys_name_and_the_offline_cache_keeps_one_row(tmp_path, directory,
                                                                                 start_gateway):
    """White space, NBSP, full-width and zero-width spellings are canonicalised by the core; case
    by the cache's `usernames: casefold` (slapd ignores case in uid)."""
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={"enabled": False}, plugins=("cache",),
                            extra={"cache.yaml": "cache: {usernames: casefold}\n"}))
    for spelling in SPELLINGS:
        answer = api(gw, spelling, "bob-Passw0rd")
        assert answer["outcome"] == "success", (spelling, answer)
        assert answer["identity"]["username"] == "bob"
    with sqlite3.connect(gw.state_dir / "cache.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 1, "one row, whatever the spelling"
    # A live refusal of the old password under one spelling forgets the user under every spelling.
    directory.set_password("bob", "bob-Newer-Passw0rd")
    try:
        assert api(gw, " bob", "bob-Passw0rd")["outcome"] == "invalid_credentials"
        directory.stop()
        for spelling in SPELLINGS:
            assert api(gw, spelling, "bob-Passw0rd")["outcome"] != "success", spelling
    finally:
        if not directory.running:
            directory.start()
        directory.set_password("bob", "bob-Passw0rd")


def test_a_dotted_capital_i_is_the_i_the_directory_reads_for_the_throttle_and_the_cache(tmp_path, directory,
                                                                                         start_gateway):
    """Review of the forward-auth door: each i of a name doubled the throttle's budget (`kİm` had
    one of its own), and a refusal seen under `kim` left the offline row of `kİm` answering the
    old password while the directory was down (a deleted account logged in from the cache)."""
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={"user_failures": 2, "window": 600},
                            plugins=("cache",)))
    for spelling in DOTTED:
        answer = api(gw, spelling, "kim-Passw0rd")
        assert (answer["outcome"], answer["identity"]["username"]) == ("success", "kim"), (spelling, answer)
    with sqlite3.connect(gw.state_dir / "cache.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 1, "one row, whatever the spelling"
    outcomes = [api(gw, DOTTED[i % len(DOTTED)], f"guess-{i}")["outcome"] for i in range(8)]
    assert outcomes == ["invalid_credentials"] * 2 + ["throttled"] * 6, outcomes

    refusing = start_gateway(conf(tmp_path / "d", directory, throttle={"enabled": False}, plugins=("cache",)))
    for spelling in DOTTED:
        assert api(refusing, spelling, "kim-Passw0rd")["outcome"] == "success"
    directory.set_password("kim", "kim-Newer-Passw0rd")
    try:
        assert api(refusing, "kim", "kim-Passw0rd")["outcome"] == "invalid_credentials"  # forgets every spelling
        directory.stop()
        for spelling in DOTTED:
            assert api(refusing, spelling, "kim-Passw0rd")["outcome"] != "success", spelling
    finally:
        if not directory.running:
            directory.start()
        directory.set_password("kim", "kim-Passw0rd")


def test_the_addresses_of_one_ipv6_network_are_one_client(tmp_path, directory, start_gateway):
    # A host is given a /64: counted by address, each of its 2**64 addresses had a budget of its own
    # (client_failures did not stop a spray, and new counters filled the memory store).
    throttle = {"user_failures": 100, "user_client_failures": 100, "client_failures": 5, "window": 600}
    gw = start_gateway(conf(tmp_path / "c", directory, throttle=throttle))
    statuses = [gw.auth(f"sprayed{i}", "guess", {"X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"}).status
                for i in range(8)]
    assert statuses == [401] * 5 + [429] * 3, statuses
    assert gw.auth("sprayed9", "guess", {"X-Forwarded-For": "2001:db8:1:3::1"}).status == 401  # another /64
    assert gw.auth("sprayed9", "guess", {"X-Forwarded-For": "::ffff:192.0.2.7"}).status == 401  # IPv4, mapped
    assert {a["client"] for a in gw.audit()[-3:]} >= {"2001:db8:1:3::1"}, "the audit keeps the address"
    by_address = start_gateway(conf(tmp_path / "d", directory, throttle={**throttle, "ipv6_prefix": 128}))
    statuses = [by_address.auth(f"sprayed{i}", "guess", {"X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"}).status
                for i in range(8)]
    assert statuses == [401] * 8, statuses


def concurrent(count: int, work) -> list:
    """*count* calls of *work* released together."""
    results: list = [None] * count
    gate = threading.Barrier(count)

    def run(i: int) -> None:
        gate.wait(timeout=30)
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_simultaneous_guesses_are_counted_before_the_chain(tmp_path, directory, start_gateway):
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={"user_failures": 5, "window": 600}))
    per = binds_per_attempt(gw, directory)
    before, connections = directory.bind_count(), directory.connection_count()
    outcomes = concurrent(100, lambda i: api(gw, "bob", f"guess-{i}")["outcome"])
    assert outcomes.count("invalid_credentials") <= 5, outcomes
    assert outcomes.count("throttled") >= 95
    # Concurrency grows the LDAP pool (and a health probe may run): each new connection makes
    # one service-account bind, which is not a guess.
    opened = directory.connection_count() - connections
    assert directory.bind_count() - before - opened <= 5 * per, "in-flight guesses were not counted"


def test_workers_of_one_machine_share_the_counts(tmp_path, directory, start_gateway):
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={"user_failures": 5, "window": 600}, workers=2),
                       workers=2)
    per = binds_per_attempt(gw, directory)
    before = directory.bind_count()
    outcomes = [api(gw, "bob", f"guess-{i}")["outcome"] for i in range(40)]
    assert outcomes.count("invalid_credentials") == 5, outcomes
    # slapd counts every bind: besides the 5 guesses, the other worker's start-up probe (its
    # service bind may land after `before`) and its first pooled service connection, a few at
    # most; unshared counts would let all 40 guesses through (40 x per).
    assert directory.bind_count() - before <= 5 * per + 4
    assert (gw.state_dir / "throttle.sqlite3").stat().st_mode & 0o077 == 0


def test_instances_share_the_counts_through_redis(tmp_path, directory, start_gateway):
    redis = RedisServer(tmp_path / "redis", password="throttle-pw").start()
    try:
        (tmp_path / "redis.pw").write_text("throttle-pw\n")
        (tmp_path / "redis.pw").chmod(0o600)
        throttle = {"user_failures": 5, "window": 600, "store": "redis",
                    "redis": {"url": redis.url, "password": {"file": str(tmp_path / "redis.pw")}}}
        gws = [start_gateway(conf(tmp_path / f"c{n}", directory, throttle=throttle)) for n in range(2)]
        outcomes = [api(gws[i % 2], "bob", f"guess-{i}")["outcome"] for i in range(30)]
        assert outcomes.count("invalid_credentials") == 5, outcomes
        keys = redis.client().keys("*")
        assert keys and not any(b"bob" in key for key in keys), "keys are hashes, never usernames"
        assert api(gws[0], "carol", "carol-Passw0rd")["outcome"] == "success"
    finally:
        redis.stop()


def test_instances_whose_clocks_differ_count_on_redis_s_clock(tmp_path):
    """Two instances sharing Redis, one's clock an hour behind (open list of stop 35): each
    failure was scored by its instance's time, so the instance ahead dropped the other's as
    older than the window at its next guess, and each instance's guesses went uncounted by the
    other. Redis's own clock scores them now: three guesses in all, whoever takes them."""
    import time

    from gateway.model import Outcome
    from gateway.settings import ThrottleSettings
    from gateway.throttle import Throttle

    redis = RedisServer(tmp_path / "redis").start()
    try:
        settings = ThrottleSettings(store="redis", user_failures=3, user_client_failures=3, client_failures=100,
                                    window=600, redis={"url": redis.url})
        behind = Throttle(settings, clock=lambda: time.time() - 3600)
        ahead = Throttle(settings, clock=time.time)
        admitted = []
        for n in range(12):
            throttle = (behind, ahead)[n % 2]
            ticket = throttle.admit("bob", f"192.0.2.{n}")
            admitted.append(ticket is not None)
            if ticket is not None:
                throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
        assert admitted.count(True) == 3, admitted
        scores = [score for key in redis.client().keys("*") for _m, score in redis.client().zrange(key, 0, -1,
                                                                                                  withscores=True)]
        assert scores and all(abs(score / 1000 - time.time()) < 60 for score in scores), scores
        behind.close()
        ahead.close()
    finally:
        redis.stop()


def test_a_victim_keeps_logging_in_from_a_client_that_has_not_failed(tmp_path, directory, start_gateway):
    gw = start_gateway(conf(tmp_path / "c", directory, throttle={}))  # the defaults

    def from_client(address: str, password: str) -> int:
        return gw.auth("bob", password, {"X-Forwarded-For": address}).status

    attacker = [from_client("198.51.100.7", f"guess-{i}") for i in range(20)]
    assert attacker[:3] == [401, 401, 401] and set(attacker[3:]) == {429}, attacker
    assert from_client("203.0.113.5", "bob-Passw0rd") == 200, "the victim from another address"
    assert from_client("198.51.100.7", "guess-x") == 429, "the attacking address stays refused for bob"
    assert gw.auth("carol", "carol-Passw0rd", {"X-Forwarded-For": "198.51.100.7"}).status == 200, \
        "and other users behind the attacking address are not refused"


def test_a_success_from_the_cache_does_not_reset_the_count(tmp_path, directory, start_gateway):
    """Only a live success resets the user's count (the directory's own count was reset by the
    bind); an answer from the cache reached no directory, so guessers get no fresh budget."""
    gw = start_gateway(conf(tmp_path / "c", directory, plugins=("cache",), extra={"cache.yaml": "cache: {}\n"},
                            throttle={"user_failures": 4, "user_client_failures": 3, "window": 600}))

    def status(client: str, password: str) -> int:
        return gw.auth("bob", password, {"X-Forwarded-For": client}).status

    assert status("203.0.113.5", "bob-Passw0rd") == 200  # live: cached for offline use
    directory.stop()
    try:
        assert [status("198.51.100.7", f"guess-{i}") for i in range(3)] == [401, 401, 401]
        r = gw.auth("bob", "bob-Passw0rd", {"X-Forwarded-For": "203.0.113.5"})
        assert (r.status, r.header("Remote-Auth-Source")) == (200, "cache")
        assert status("198.51.100.8", "guess-x") == 401
        assert status("198.51.100.9", "guess-y") == 429, "the cached success handed out a fresh budget"
    finally:
        directory.start()


def test_a_spray_of_new_addresses_never_wipes_a_users_count_from_the_memory_store(monkeypatch, caplog):
    # The memory store (one worker's) holds a bounded number of counters. Full of live ones, it
    # used to drop the oldest tenth, a victim's count among them: 33,332 requests from new
    # addresses gave a guesser 4 more guesses at alice, and again. Then it refused every
    # reservation that needed a new counter until counters expired: a spray of ~50,000 guesses
    # from new names and networks refused every login for the whole window (review). Now it
    # drops counters of a single failure, the spray's, and keeps counts of two or more.
    import logging

    import gateway.throttle_stores as stores
    from gateway.model import Outcome
    from gateway.settings import ThrottleSettings
    from gateway.throttle import Throttle

    monkeypatch.setattr(stores, "_MAX_KEYS", 300)
    now = [1_000_000.0]
    throttle = Throttle(ThrottleSettings(store="memory"), clock=lambda: now[0])

    def guess(user: str, client: str, outcome: Outcome = Outcome.INVALID_CREDENTIALS) -> bool:
        ticket = throttle.admit(user, client)
        if ticket is None:
            return False
        throttle.settle(ticket, outcome)
        return True

    def login(user: str, client: str) -> bool:
        ticket = throttle.admit(user, client)
        if ticket is None:
            return False
        throttle.settle(ticket, Outcome.SUCCESS)
        return True

    def budget(user: str) -> int:
        return sum(guess(user, f"198.51.100.{n}") for n in range(1, 9))  # a new client each time

    assert budget("alice") == 4  # user_failures
    # Bob's first wrong guess: the oldest counter of one failure when the spray fills the store.
    # Dropping it gave a guesser one more guess at bob per spray, again and again (review).
    assert guess("bob", "203.0.113.9")
    refused = 0
    with caplog.at_level(logging.WARNING, logger="authgw.throttle"):
        # A new name from a new /64 each time, three new counters a guess, 5 a second: a tenth of
        # the store freed each second keeps up (with 100,000 counters: 3,333 guesses a second).
        for n in range(2000):
            now[0] += 0.2
            refused += not guess(f"spray{n}", f"2001:db8:{n:x}::1", Outcome.USER_NOT_FOUND)
            if n % 100 == 99:
                # Meanwhile a user who never failed logs in, from an address never seen.
                assert login(f"user{n}", f"192.0.2.{n // 100}"), n
    assert refused < 200, refused  # the spray goes on too: the store is not stuck full
    assert any("dropped the" in r.getMessage() and "single failure" in r.getMessage() for r in caplog.records)
    assert budget("alice") == 0  # her four guesses are still counted
    assert budget("bob") == 3  # and bob's one
    now[0] += 1801  # the window passes: counters expire and are swept, new ones are taken again
    assert guess("carol", "192.0.2.1") and budget("alice") == 4


def test_a_memory_store_full_of_existing_users_single_failures_refuses_rather_than_forgets(monkeypatch):
    """A user's count is dropped only when its name is unknown to every directory: a spray of
    names that exist (an employee list) fills the store with counts that stay, and then a new
    counter is refused, as before, rather than wipe one."""
    import gateway.throttle_stores as stores
    from gateway.model import Outcome
    from gateway.settings import ThrottleSettings
    from gateway.throttle import Throttle

    monkeypatch.setattr(stores, "_MAX_KEYS", 300)
    now = [1_000_000.0]
    throttle = Throttle(ThrottleSettings(store="memory"), clock=lambda: now[0])
    ticket = throttle.admit("victim", "198.51.100.1")
    throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
    admitted = 0
    for n in range(400):
        now[0] += 1.5  # a sweep each time
        ticket = throttle.admit(f"employee{n}", None)  # no client: one counter a guess
        if ticket is not None:
            admitted += 1
            throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
    assert admitted < 300  # full of counts that stay: the rest refused
    assert len(throttle.store._keys[throttle.ticket("victim", None).user]) == 1  # the victim's first guess kept


def test_a_memory_store_full_of_counts_of_two_refuses_rather_than_forgets(monkeypatch, caplog):
    """Counters of two failures or more are never dropped to make room: full of them, a new
    counter is refused (throttled) until they expire, as the store did before."""
    import logging

    import gateway.throttle_stores as stores

    monkeypatch.setattr(stores, "_MAX_KEYS", 100)
    store = stores.MemoryStore()
    now = 1_000_000.0
    for n in range(100):
        for _ in range(2):
            assert store.reserve([(f"k{n}", 10)], f"t{n}", now, 1800)
    with caplog.at_level(logging.WARNING, logger="authgw.throttle"):
        assert not store.reserve([("new", 10)], "t", now + 2, 1800)
    assert "counters of two failures or more" in caplog.text
    assert all(len(store._keys[f"k{n}"]) == 2 for n in range(100))
    assert store.reserve([("new", 10)], "t", now + 1801, 1800)  # expired: swept


def test_reservation_ids_are_unique_in_a_process_and_across_forked_workers():
    # Workers sharing a Redis store must never reuse each other's reservation ids: settling one
    # attempt would give back another's reservation. Ids are a per-process prefix and a counter
    # (no getrandom per attempt), and a forked worker draws a prefix of its own.
    import os

    from gateway.throttle import _TICKET_IDS

    mine = {_TICKET_IDS.next() for _ in range(1000)}
    assert len(mine) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, " ".join(_TICKET_IDS.next() for _ in range(1000)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split())
    assert os.waitpid(pid, 0)[1] == 0
    assert len(theirs) == 1000 and not theirs & mine
    assert {i[:16] for i in theirs} != {i[:16] for i in mine}  # another prefix, not just later numbers


# -- one account, several spellings (Active Directory) ------------------------------------------

AD_BASE = "DC=corp,DC=example,DC=com"
AD_SERVICE = f"CN=svc-authgw,OU=Service,{AD_BASE}"
AD_USERS = {
    AD_SERVICE: {"objectClass": ["user"], "sAMAccountName": ["svc-authgw"], "password": ["svc-pw"]},
    f"CN=Alice Archer,OU=Staff,{AD_BASE}": {
        "objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"],
        "sAMAccountName": ["alice"], "userPrincipalName": ["alice@corp.example.com"], "password": ["alice-pw"]},
}


@pytest.fixture(scope="module")
def ad():
    directory = FakeAD(AD_USERS)
    yield directory
    directory.stop()


@pytest.mark.parametrize("user_domains", [[], ["corp.example.com", "CORP"]])
def test_the_spellings_active_directory_takes_for_one_account_share_its_budget(tmp_path, ad, start_gateway,
                                                                               user_domains):
    """The active_directory preset finds alice by her sAMAccountName and by her UPN: each
    spelling had a budget of its own, so 3 guesses per user reached the directory as 6 (more
    with more UPN suffixes), enough to cross a lockout threshold set just above the gateway's
    limit. With ``user_domains`` they are one budget; without, as before (the control)."""
    secret = tmp_path / "bind-password"
    secret.write_text("svc-pw")
    secret.chmod(0o600)
    ldap = {"preset": "active_directory", "servers": [ad.url], "insecure": True, "base_dn": AD_BASE,
            "bind_dn": AD_SERVICE, "bind_password": {"file": str(secret)},
            "groups": {"source": "memberof", "nested": False}, "backoff": 0}
    core = {"chain": ["ldap"], "health": {"probe_interval": 3600},
            "throttle": {"user_failures": 3, "window": 600, "user_domains": user_domains},
            "api_tokens": [{"name": "portal", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    gw = start_gateway(write_conf(tmp_path / "c", {"gateway.yaml": json.dumps(core),
                                                   "ldap.yaml": "ldap: " + json.dumps(ldap)}))
    spellings = ["alice", "alice@corp.example.com", "Alice@CORP.example.com"]
    outcomes = [api(gw, spellings[i % 3], f"guess-{i}")["outcome"] for i in range(12)]
    refused = outcomes.count("invalid_credentials")
    if user_domains:
        assert (refused, outcomes.count("throttled")) == (3, 9), outcomes
        assert api(gw, "alice", "alice-pw")["outcome"] == "throttled", "the account's budget is spent"
    else:
        assert refused == 6, outcomes  # alice's budget, and her UPN's (case folded)
    gw.stop()
