"""Review of the credential cache (third round): real ``authgw serve`` gateways with
``plugins: [cache]`` in front of a real slapd (and a real redis-server).

A. One account, several login names. A directory that takes more than one name for an account
   (Active Directory's preset: ``sAMAccountName`` or ``userPrincipalName``; here slapd with
   ``uid`` or ``mail``) had one offline row per name given, and one hot entry indexed by the name
   given only. A refusal seen under one name (the account locked, or the old password after a
   change) forgot that name's row and hot entries only: the other name kept answering the
   refused password with 200, from the hot cache at once and offline once the directory was
   down; each name also had its own budget of offline guesses. Now the entry is the account's,
   under the directory's username, and another name's row only points at it; hot entries are
   forgotten under both names.

B. The same through a refusal the store did not take: a refusal under another name while Redis
   was frozen is kept and retried; the retry now follows that name's row to the account's.

Waits are bounded (:data:`HANG`) and wait for events, never for a time to pass.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from support.cacheenv import TWO_NAMES, cache_conf, directory, lock, slapd_fixture  # noqa: F401 - fixtures
from support.gateway import authgw
from support.net import wait_for
from support.redis import RedisServer
from test_cache_slapd import new_user, source

slapd = slapd_fixture(ppolicy=True)  # ppolicy: accounts can be locked

#: How long a test waits for something that should happen (a guard against a hang, never a bound
#: on how fast anything runs).
HANG = 60
OLD, NEW = "first-Passw0rd", "second-Passw0rd"


def cache_yaml(kind: str, redis_server=None, extra: str = "") -> str:
    if kind == "sqlite":
        return f"cache: {{{extra}}}\n"
    redis = f'{{url: "{redis_server.url}", key_prefix: "r3-{next(_PREFIXES)}:", timeout: 0.5}}'
    return f"cache: {{store: redis, redis: {redis}, {extra}}}\n"


_PREFIXES = iter(range(1, 1_000_000))


def conf(tmp_path, slapd, cache: str = "cache: {}\n", name: str = "conf.d"):
    return cache_conf(tmp_path, slapd, cache, name=name, user_filter=TWO_NAMES)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_password_changed_under_one_name_no_longer_works_offline_under_the_other(tmp_path, directory,
                                                                                   start_gateway, kind, request):
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    gateway = start_gateway(conf(tmp_path, directory, cache_yaml(kind, redis_server)))
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(mail, OLD)) == "live"
    assert source(gateway.auth(uid, OLD)) == "live"
    directory.set_password(uid, NEW)
    refused = gateway.auth(uid, OLD)  # the directory refuses the old password under one name
    assert refused.status == 401
    assert source(gateway.auth(uid, NEW)) == "live"
    directory.stop()
    for name in (uid, mail):
        offline = gateway.auth(name, OLD)
        assert offline.status in (401, 503), (name, offline.status, offline.body)
        assert offline.header("Remote-User") is None


def test_an_account_locked_under_one_name_is_not_answered_under_the_other(tmp_path, directory, start_gateway):
    gateway = start_gateway(conf(tmp_path, directory, "cache: {hot: {enabled: true, ttl: 600}}\n"))
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(mail, OLD)) == "live"
    assert source(gateway.auth(mail, OLD)) == "cache"  # a hot hit
    lock(directory, uid)
    refused = gateway.auth(uid, OLD)  # the directory refuses the account under its uid
    assert refused.status == 401
    hot = gateway.auth(mail, OLD)
    assert hot.status == 401 and hot.header("Remote-User") is None, (hot.status, source(hot))
    directory.stop()
    for name in (uid, mail):
        offline = gateway.auth(name, OLD)
        assert offline.status in (401, 503), (name, offline.status, offline.body)
        assert offline.header("Remote-User") is None


def test_another_name_logs_in_offline_and_shares_the_accounts_budget_of_offline_guesses(tmp_path, directory,
                                                                                       start_gateway):
    gateway = start_gateway(conf(tmp_path, directory, "cache: {max_offline_failures: 2}\n"))
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(mail, OLD)) == "live"
    directory.stop()
    for name in (mail, uid):  # the account's entry answers under each of its names
        offline = gateway.auth(name, OLD)
        assert (offline.status, source(offline), offline.header("Remote-User")) == (200, "cache", uid)
    assert gateway.auth(mail, "wrong-1").status == 401
    assert gateway.auth(uid, "wrong-2").status == 401
    for name in (mail, uid):  # two wrong guesses for the account, whichever names they came under
        refused = gateway.auth(name, OLD)
        assert refused.status == 401 and refused.header("Remote-User") is None


def test_purging_another_name_purges_the_account(tmp_path, directory, start_gateway):
    conf_dir = conf(tmp_path, directory)
    gateway = start_gateway(conf_dir)
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(mail, OLD)) == "live"
    listed = authgw("cache", "list", "--config", str(conf_dir), "--state-dir", str(gateway.state_dir))
    assert listed.returncode == 0, listed.stderr
    assert f"another name of {uid}" in listed.stdout and "usable offline" in listed.stdout
    purged = authgw("cache", "purge", mail, "--config", str(conf_dir), "--state-dir", str(gateway.state_dir))
    assert purged.returncode == 0, purged.stdout + purged.stderr
    directory.stop()
    for name in (mail, uid):
        offline = gateway.auth(name, OLD)
        assert offline.status == 503 and offline.header("Remote-User") is None, (name, offline.status)


def test_a_refusal_under_another_name_kept_while_redis_was_frozen_reaches_the_account(tmp_path, directory,
                                                                                     start_gateway):
    with RedisServer(tmp_path / "redis") as redis:
        gateway = start_gateway(conf(tmp_path, directory, cache_yaml("redis", redis)))
        uid, _ = new_user(directory, OLD)
        mail = f"{uid}@example.com"
        for name in (uid, mail):
            assert source(gateway.auth(name, OLD)) == "live"
        directory.set_password(uid, NEW)
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            assert gateway.auth(mail, OLD).status == 401  # live: the directory refuses the old password
            wait_for(lambda: "deleting an entry the directory refused" in gateway.output(), HANG, interval=0.05,
                     what="the cache's delete to fail", log=gateway.output)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        wait_for(lambda: "deletions of refused entries, which the store had not taken, landed" in gateway.output(),
                 HANG, interval=0.05, what="the kept refusal to land", log=gateway.output)
        directory.stop()
        for name in (uid, mail):
            offline = gateway.auth(name, OLD)
            assert offline.status in (401, 503) and offline.header("Remote-User") is None, (name, offline.status)


def test_a_refusal_under_another_name_while_its_login_hashes_leaves_no_entry_of_the_account(tmp_path):
    """A live success under `alice@example.org` (the account `alice`) is hashing its entry when
    another worker handles a refusal of that name (the account was just locked). The refusal
    found no pointer yet, so it marked the name's row alone; the pointer was then refused by that
    mark, but the account's entry was written under `alice` and answered offline after the lock
    (review of this stop's diff). A refused pointer now writes no entry, and forgets what the
    account's row held from before the login. Real OfflineCache and SQLite store; the refusal
    runs from inside the real hashing (the window)."""
    import ipaddress

    from gateway import Attempt, Decision, Identity, Outcome, PasswordCredential
    from gateway.plugins.cache.offline import OfflineCache
    from gateway.plugins.cache.settings import CacheSettings

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cache = OfflineCache(CacheSettings(methods=["ldap"]), state)
    identity = Identity(subject="s-1", username="alice", method="ldap")

    def attempt(name: str) -> Attempt:
        return Attempt(request_id=name, client=ipaddress.ip_address("127.0.0.1"), front_door="api",
                       deadline=time.monotonic() + 30, password=PasswordCredential(name, "Passw0rd-1"))

    # An entry of the account from an earlier login under its own name (an earlier password).
    assert cache.remember(attempt("alice"), PasswordCredential("alice", "Earlier-pw-0"), identity, "ldap")

    class RefusedMeanwhile:
        def __init__(self, real):
            self.real = real

        def hash(self, secret):
            digest = self.real.hash(secret)
            cache.forget("alice@example.org")  # another worker: the directory refuses the name now
            return digest

        def __getattr__(self, name):
            return getattr(self.real, name)

    real, cache.hasher = cache.hasher, RefusedMeanwhile(cache.hasher)
    try:
        credential = PasswordCredential("alice@example.org", "Passw0rd-1")
        assert cache.remember(attempt("alice@example.org"), credential, identity, "ldap") is False
    finally:
        cache.hasher = real
    keys = cache.keys()
    assert cache.store.get(keys.row_key(cache.user_key("alice"))) is None
    for name in ("alice", "alice@example.org"):
        offline = attempt(name)
        offline.note(Outcome.UNAVAILABLE, step="ldap", reason="ldap.unavailable")
        decision = cache.after_chain(offline, Decision.deny(Outcome.UNAVAILABLE, step="ldap", reason="ldap.unavailable"))
        assert decision.outcome is Outcome.UNAVAILABLE, (name, decision)
    cache.close()
