"""The cache plugin around a real core, in-process, with test chain steps as the "directory".

A step named ``ldap`` (support.testplugins.Step) succeeds for any password, or is unavailable,
or refuses, as its settings say; runtimes built over one state directory share the cache, as
worker processes do. The slapd scenarios through ``authgw serve`` are in test_cache_slapd.py.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from gateway import Attempt, NegotiateCredential, Outcome, PasswordCredential
from gateway.plugins.cache.offline import identity_from
from gateway.plugins.cache.store import Entry
from support import testplugins
from support.chainhelp import attempt, build, decide
from support.redis import RedisServer

CACHE = "gateway.plugins.cache:CachePlugin"
USER, PASSWORD = "alice-7c1e", "correct horse 7c1e"


@pytest.fixture(autouse=True)
def _clear_calls():
    testplugins.CALLS.clear()
    yield
    testplugins.CALLS.clear()


def runtime(tmp_path: Path, action: str, cache: dict | None = None, chain: tuple[str, ...] = ("ldap",)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections = {name: {"action": action} for name in chain}
    return build(tmp_path, {"chain": list(chain), "plugins": ["cache"]}, {**sections, "cache": cache or {}},
                 targets={"cache": CACHE})


def login(rt, username: str = USER, password: str = PASSWORD):
    return decide(rt, attempt(username, password))


def plugin(rt):
    return rt.gateway.plugins["cache"]


def entries(rt) -> list[Entry]:
    return list(plugin(rt).offline.store.scan())


def age(rt, entry: Entry, at: float) -> None:
    """Rewrite *entry* as if its live login had been at *at*: the time in the row and the one
    sealed with it (an entry whose two times differ is not used)."""
    offline = plugin(rt).offline
    keys = offline.keys()
    document = keys.open(entry.key, entry.sealed)
    sealed = keys.seal(entry.key, identity_from(document, at), document["step"], at,
                       password_hash=entry.password_hash)
    offline.store.delete(entry.key)  # put never writes over a newer entry
    offline.store.put(Entry(entry.key, entry.kid, entry.password_hash, sealed, at))


def steps_called() -> list[str]:
    return [name for name, hook in testplugins.CALLS if hook == "gateway_authenticate"]


# -- offline logins --------------------------------------------------------------------------------


def test_a_live_success_is_answered_offline_with_the_right_password_only(tmp_path):
    live = runtime(tmp_path, "success")
    decision = login(live)
    assert decision.success and not decision.from_cache and decision.step == "ldap"
    assert len(entries(live)) == 1

    down = runtime(tmp_path, "unavailable")
    cached = login(down)
    assert (cached.outcome, cached.step, cached.reason, cached.from_cache) == (Outcome.SUCCESS, "cache",
                                                                              "cache.offline", True)
    assert cached.identity.username == USER and cached.identity.groups == ("g1", "g2")
    assert cached.identity.subject == f"ldap:{USER}" and cached.identity.method == "ldap"

    wrong = login(down, password="wrong")
    assert (wrong.outcome, wrong.step, wrong.reason, wrong.from_cache) == (Outcome.INVALID_CREDENTIALS, "cache",
                                                                           "cache.invalid_password", True)

    stranger = login(down, username="never-seen")
    assert (stranger.outcome, stranger.step, stranger.reason) == (Outcome.UNAVAILABLE, "ldap", "ldap.unreachable")


def test_the_store_reveals_no_username_password_or_profile(tmp_path):
    rt = runtime(tmp_path, "success")
    login(rt)
    plugin(rt).offline.close()  # reading the file in this process must not drop SQLite's locks
    files = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("cache.sqlite3")]
    assert files
    for path in files:
        data = path.read_bytes()
        # A group as the profile's JSON would spell it: a bare 2-byte "g1" turns up by chance in
        # the random bytes of salts, hashes and ciphertext (about 1 run in 30).
        for secret in (USER, PASSWORD, '"g1"', "ldap:"):
            assert secret.encode() not in data, f"{secret!r} found in {path.name}"


@pytest.mark.parametrize("refusal, password", [("invalid", PASSWORD), ("account_state", "whatever"),
                                               ("not_found", "whatever")])
def test_a_live_refusal_deletes_the_entry(tmp_path, refusal, password):
    login(runtime(tmp_path, "success"))
    refusing = runtime(tmp_path, refusal)
    refused = login(refusing, password=password)
    assert not refused.success
    assert plugin(refusing).offline.rechecked(30)
    down = runtime(tmp_path, "unavailable")
    assert entries(down) == []
    assert login(down).outcome is Outcome.UNAVAILABLE


def test_a_wrong_password_refused_live_keeps_the_entry(tmp_path):
    """Anyone's wrong guess deleted the entry, so one request before an outage took a user's
    offline login away (review). Only the directory refusing the cached password itself (changed
    since, or the account locked) forgets it; a wrong guess is compared with it and kept."""
    login(runtime(tmp_path, "success"))
    refusing = runtime(tmp_path, "invalid")
    for guess in ("guess", PASSWORD.upper(), PASSWORD + " "):
        assert login(refusing, password=guess).outcome is Outcome.INVALID_CREDENTIALS
    assert plugin(refusing).offline.rechecked(30)
    down = runtime(tmp_path, "unavailable")
    assert len(entries(down)) == 1
    assert login(down).from_cache and login(down).success

    assert login(refusing).outcome is Outcome.INVALID_CREDENTIALS  # now the cached password itself
    assert plugin(refusing).offline.rechecked(30)
    assert entries(down) == []
    assert login(down).outcome is Outcome.UNAVAILABLE


def test_a_flood_of_refused_passwords_forgets_rather_than_queues(tmp_path, monkeypatch):
    """The comparisons are bounded: past the queue's size an entry is forgotten at once, as
    every refusal did before the comparison (fail closed)."""
    from gateway.plugins.cache import offline as offline_module

    login(runtime(tmp_path, "success"))
    refusing = runtime(tmp_path, "invalid")
    monkeypatch.setattr(offline_module, "_RECHECKS_QUEUED", 0)
    assert login(refusing, password="guess").outcome is Outcome.INVALID_CREDENTIALS
    assert entries(runtime(tmp_path, "unavailable")) == []


def test_offline_failures_are_limited_until_the_next_live_login(tmp_path):
    login(runtime(tmp_path, "success"))
    down = runtime(tmp_path, "unavailable", {"max_offline_failures": 3})
    assert login(down).success  # a right password does not use up an attempt
    for _ in range(3):
        assert login(down, password="guess").reason == "cache.invalid_password"
    locked = login(down)
    assert (locked.outcome, locked.reason) == (Outcome.ACCOUNT_STATE, "cache.too_many_failures")
    assert login(down, password="guess").reason == "cache.too_many_failures"
    login(runtime(tmp_path, "success"))  # the directory is back: a live login resets the count
    assert login(down).success


def test_only_an_outage_of_the_directory_that_proved_the_user_is_answered(tmp_path):
    login(runtime(tmp_path, "success", chain=("ldap", "other")))
    # ldap answers "no such user" while another step is down: the fold is UNAVAILABLE, but the
    # directory that knows this user is up and has refused; the entry goes.
    folded = build(tmp_path, {"chain": ["ldap", "other"], "plugins": ["cache"]},
                   {"ldap": {"action": "not_found"}, "other": {"action": "unavailable"}, "cache": {}},
                   targets={"cache": CACHE})
    decision = login(folded)
    assert (decision.outcome, decision.step) == (Outcome.UNAVAILABLE, "other")
    assert entries(folded) == []

    login(runtime(tmp_path, "success", chain=("ldap", "other")))
    elsewhere = build(tmp_path, {"chain": ["other", "ldap"], "plugins": ["cache"]},
                      {"ldap": {"action": "abstain"}, "other": {"action": "unavailable"}, "cache": {}},
                      targets={"cache": CACHE})
    assert login(elsewhere).outcome is Outcome.UNAVAILABLE  # ldap was not down: not an outage of it
    assert len(entries(elsewhere)) == 1


def test_entries_older_than_max_age_are_not_used_and_are_deleted(tmp_path):
    live = runtime(tmp_path, "success")
    login(live)
    age(live, entries(live)[0], time.time() - 8 * 86400)
    down = runtime(tmp_path, "unavailable")
    assert login(down).outcome is Outcome.UNAVAILABLE
    assert entries(down) == []


def test_max_age_is_a_setting(tmp_path):
    login(runtime(tmp_path, "success"))
    assert login(runtime(tmp_path, "unavailable", {"max_age": "1d"})).success
    rt = runtime(tmp_path, "unavailable")
    age(rt, entries(rt)[0], time.time() - 7200)
    assert login(runtime(tmp_path, "unavailable", {"max_age": "1d"})).success
    assert login(runtime(tmp_path, "unavailable", {"max_age": "1h"})).outcome is Outcome.UNAVAILABLE


def test_enabled_false_neither_stores_nor_answers(tmp_path):
    assert login(runtime(tmp_path, "success", {"enabled": False})).success
    assert not (tmp_path / "state" / "cache.sqlite3").exists()
    login(runtime(tmp_path, "success"))
    assert login(runtime(tmp_path, "unavailable", {"enabled": False})).outcome is Outcome.UNAVAILABLE


def test_only_the_listed_methods_are_cached(tmp_path):
    rt = runtime(tmp_path, "success", {"methods": ["other"]}, chain=("ldap", "other"))
    assert login(rt).step == "ldap"
    assert entries(rt) == []
    rt = runtime(tmp_path, "success", {"methods": ["ldap"]})
    login(rt)
    assert len(entries(rt)) == 1
    # an entry made by a method no longer listed is not used
    assert login(runtime(tmp_path, "unavailable", {"methods": ["other"]}, chain=("ldap", "other"))).outcome \
        is Outcome.UNAVAILABLE


@pytest.mark.parametrize("method", ["kerberos", "client_cert"])
def test_kerberos_and_certificates_cannot_be_listed(tmp_path, method):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="never checks a password"):
        runtime(tmp_path, "success", {"methods": ["ldap", method]})


def test_attempts_without_a_password_are_never_cached(tmp_path):
    rt = runtime(tmp_path, "success")
    negotiate = Attempt(request_id=uuid.uuid4().hex, client=ipaddress.ip_address("192.0.2.10"), front_door="test",
                        deadline=time.monotonic() + 5, negotiate=NegotiateCredential(b"token"))
    assert decide(rt, negotiate).success
    assert entries(rt) == []


@pytest.mark.parametrize("mode, other_spelling_works", [("exact", False), ("casefold", True)])
def test_username_matching(tmp_path, mode, other_spelling_works):
    login(runtime(tmp_path, "success", {"usernames": mode}), username="Alice")
    down = runtime(tmp_path, "unavailable", {"usernames": mode})
    assert login(down, username="Alice").success
    outcome = login(down, username="ALICE").outcome
    assert (outcome is Outcome.SUCCESS) == other_spelling_works
    if not other_spelling_works:
        assert outcome is Outcome.UNAVAILABLE


def test_a_repeat_live_login_does_not_hash_again_until_refresh_after(tmp_path):
    rt = runtime(tmp_path, "success")
    login(rt)
    first = entries(rt)[0]
    login(rt)
    assert entries(rt)[0] == first  # same hash, same time: no argon2 spent
    login(rt, password="a new password")
    changed = entries(rt)[0]
    assert changed.password_hash != first.password_hash and changed.stored_at >= first.stored_at
    eager = runtime(tmp_path, "success", {"refresh_after": 0})
    login(eager, password="a new password")
    assert entries(eager)[0].password_hash != changed.password_hash


def test_two_workers_do_not_take_turns_hashing_the_same_login(tmp_path):
    one, two = runtime(tmp_path, "success"), runtime(tmp_path, "success")  # two processes' plugins
    login(one)
    login(two)  # two has not stored this login itself: it hashes once
    settled = entries(one)[0]
    for rt in (one, two, one, two):
        login(rt)
        assert entries(rt)[0] == settled  # neither hashes again while the other's entry is newer


def test_other_keys_make_entries_unusable_not_wrong(tmp_path, monkeypatch):
    login(runtime(tmp_path, "success"))
    (tmp_path / "state" / "cache-encryption.key").unlink()
    (tmp_path / "state" / "cache-pepper.key").unlink()
    decision = login(runtime(tmp_path, "unavailable"))
    assert decision.outcome is Outcome.UNAVAILABLE  # neither a success nor a wrong password


def test_two_installs_with_the_same_secrets_share_a_redis_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_PEPPER", "pepper-" + "x" * 40)
    monkeypatch.setenv("CACHE_KEY", "key-" + "y" * 40)
    with RedisServer(tmp_path / "redis") as server:
        settings = {"store": "redis", "redis": {"url": server.url, "key_prefix": "shared:"},
                    "pepper": {"env": "CACHE_PEPPER"}, "encryption_key": {"env": "CACHE_KEY"}}
        login(runtime(tmp_path / "one", "success", settings))
        assert not (tmp_path / "one" / "state" / "cache-pepper.key").exists()
        assert login(runtime(tmp_path / "two", "unavailable", settings)).from_cache
        assert [n.startswith(b"shared:") for n in server.client().keys("*")] == [True]

        server.stop()  # the store is down: live logins go on, offline answers cannot
        live = runtime(tmp_path / "two", "success", settings)
        assert login(live).success
        ready = plugin(live).gateway_readiness()[0]
        assert not ready.ready and "redis://127.0.0.1" in ready.detail
        assert ready.detail.count("redis://127.0.0.1") == 1, ready.detail  # the error names the store once
        assert login(runtime(tmp_path / "two", "unavailable", settings)).outcome is Outcome.UNAVAILABLE


def test_an_error_in_the_cache_never_changes_a_live_decision(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rt = runtime(tmp_path, "success", {"sqlite": {"path": str(blocker / "cache.sqlite3")}})
    decision = login(rt)
    assert decision.success and decision.step == "ldap"
    ready = plugin(rt).gateway_readiness()[0]
    assert not ready.ready and ready.detail.count(f"sqlite:{blocker / 'cache.sqlite3'}") == 1, ready.detail


def test_sqlite_store_passes_integrity_check_after_use(tmp_path):
    rt = runtime(tmp_path, "success")
    for n in range(3):
        login(rt, username=f"user{n}")
    with sqlite3.connect(tmp_path / "state" / "cache.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 3


# -- hot cache --------------------------------------------------------------------------------------


HOT = {"hot": {"enabled": True, "ttl": 60}}


def test_hot_hits_skip_the_chain(tmp_path):
    rt = runtime(tmp_path, "success", HOT)
    assert plugin(rt).precheck(attempt(USER, PASSWORD)) is None
    assert login(rt).step == "ldap"
    assert steps_called() == ["ldap"]
    testplugins.CALLS.clear()
    hit = login(rt)
    assert (hit.outcome, hit.step, hit.reason, hit.from_cache) == (Outcome.SUCCESS, "cache", "cache.hot", True)
    assert hit.identity.username == USER
    assert steps_called() == []  # the directory was not asked
    assert ("ldap", "gateway_auth_finished") in testplugins.CALLS  # but audit and metrics were told


def test_hot_misses_for_another_password_or_client(tmp_path):
    rt = runtime(tmp_path, "success", HOT)
    login(rt)
    assert plugin(rt).precheck(attempt(USER, "other password")) is None
    elsewhere = attempt(USER, PASSWORD)
    elsewhere = Attempt(request_id="x", client=ipaddress.ip_address("198.51.100.7"), front_door="test",
                        deadline=elsewhere.deadline, password=PasswordCredential(USER, PASSWORD))
    assert plugin(rt).precheck(elsewhere) is None
    assert plugin(rt).precheck(attempt(USER, PASSWORD)) is not None


def test_any_failure_for_the_user_clears_the_hot_entry(tmp_path):
    rt = runtime(tmp_path, "success", HOT)
    login(rt)
    cache = plugin(rt)
    assert cache.precheck(attempt(USER, PASSWORD)) is not None
    # a refusal seen by the cache's gateway_auth_finished, here a throttled attempt by the core
    from gateway.model import Decision

    cache.gateway_auth_finished(attempt(USER, "guess"), Decision.deny(Outcome.THROTTLED, step="gateway",
                                                                      reason="throttled"))
    assert cache.precheck(attempt(USER, PASSWORD)) is None


def test_a_wrong_password_through_the_chain_clears_the_hot_entry(tmp_path):
    hot = runtime(tmp_path, "success", HOT)
    login(hot)
    assert plugin(hot).precheck(attempt(USER, PASSWORD)) is not None
    # the same process, the directory now refusing: emulate by swapping the step's action
    hot.gateway.plugins["ldap"].settings = type(hot.gateway.plugins["ldap"].settings)(action="invalid")
    assert login(hot, password="guess").outcome is Outcome.INVALID_CREDENTIALS
    assert plugin(hot).precheck(attempt(USER, PASSWORD)) is None
    assert login(hot).outcome is Outcome.INVALID_CREDENTIALS  # asked the directory again


def test_a_wrong_password_clears_the_hot_entry_even_when_another_plugins_hook_raises(tmp_path):
    # A third party's gateway_auth_finished that raises, in the place pluggy calls before the
    # cache's: its exception used to end the call before the cache forgot the entry, so the
    # remembered password kept answering after the directory refused (this test, before the fix).
    hot = build(tmp_path, {"chain": ["ldap"], "plugins": ["broken", "cache"]},
                {"ldap": {"action": "success"}, "cache": HOT},
                targets={"cache": CACHE, "broken": "support.testplugins:BrokenNotify"})
    login(hot)
    assert plugin(hot).precheck(attempt(USER, PASSWORD)) is not None
    hot.gateway.plugins["ldap"].settings = type(hot.gateway.plugins["ldap"].settings)(action="invalid")
    assert login(hot, password="guess").outcome is Outcome.INVALID_CREDENTIALS
    assert ("broken", "gateway_auth_finished") in testplugins.CALLS
    assert plugin(hot).precheck(attempt(USER, PASSWORD)) is None  # forgotten all the same


def test_a_hot_hit_stands_for_the_step_that_decided_so_a_policy_before_it_is_asked(tmp_path):
    # A relay hub: `deny` (a policy) then `relay`, whose identities name the connector's step
    # (`ldap`, not in this chain). The hit used to stand for the whole chain: once the policy
    # refused mallory, her remembered password still got in for the hot cache's ttl.
    hub = build(tmp_path, {"chain": ["deny", "relay"], "plugins": ["cache"]},
                {"deny": {"action": "abstain"}, "relay": {}, "cache": {"methods": ["relay"], **HOT}},
                targets={"cache": CACHE, "relay": "support.testplugins:Relayed"})
    first = login(hub)
    assert (first.outcome, first.step, first.identity.method) == (Outcome.SUCCESS, "relay", "ldap")
    hit = login(hub)
    assert hit.reason == "cache.hot" and ("deny", "gateway_authenticate") in testplugins.CALLS
    hub.gateway.plugins["deny"].settings = type(hub.gateway.plugins["deny"].settings)(action="account_state")
    testplugins.CALLS.clear()
    refused = login(hub)
    assert (refused.outcome, refused.step) == (Outcome.ACCOUNT_STATE, "deny"), refused
    assert ("relay", "gateway_authenticate") not in testplugins.CALLS  # the policy answered first


def test_a_hit_for_no_step_of_the_chain_is_not_used(tmp_path):
    # An entry whose deciding step is not in this chain (an answer from a step since removed):
    # the chain decides, as without a hit, rather than the hit standing for every step.
    rt = runtime(tmp_path, "success", HOT)
    login(rt)
    cache = plugin(rt)
    token = cache._hot_token(attempt(USER, PASSWORD))
    hit = cache.hot.lookup(token)
    cache.hot.put(token, USER.casefold(), hit.identity, "gone")
    testplugins.CALLS.clear()
    decision = login(rt)
    assert (decision.step, decision.from_cache) == ("ldap", False)
    assert ("ldap", "gateway_authenticate") in testplugins.CALLS


def test_hot_cache_is_off_by_default_and_with_enabled_false(tmp_path):
    for settings in ({}, {"enabled": False, **HOT}):
        rt = runtime(tmp_path, "success", settings)
        login(rt)
        assert plugin(rt).hot is None and plugin(rt).precheck(attempt(USER, PASSWORD)) is None


def test_hot_cache_ignores_attempts_with_other_credentials(tmp_path):
    rt = runtime(tmp_path, "success", HOT)
    login(rt)
    both = attempt(USER, PASSWORD)
    both = Attempt(request_id="y", client=both.client, front_door="test", deadline=both.deadline,
                   password=PasswordCredential(USER, PASSWORD), negotiate=NegotiateCredential(b"t"))
    assert plugin(rt).precheck(both) is None


# -- answers resting on a backend revoked since ------------------------------------------------------


@pytest.fixture
def vouching():
    """:class:`support.testplugins.Vouching`'s backends, reset around the test."""
    state = testplugins.VOUCHING
    state.update(by="backend-1", revoked=set(), unknown=False)
    yield state
    state.update(by="backend-1", revoked=set(), unknown=False)


def vouched(tmp_path: Path, cache: dict | None = None):
    return build(tmp_path, {"chain": ["vouch"], "plugins": ["cache"]},
                 {"vouch": {"action": "success"}, "cache": {"methods": ["vouch"], **(cache or {})}},
                 targets={"cache": CACHE, "vouch": "support.testplugins:Vouching"})


def set_action(rt, action: str) -> None:
    step = rt.gateway.plugins["vouch"]
    step.settings = type(step.settings)(action=action)


def test_an_offline_entry_resting_on_a_revoked_backend_is_deleted_not_answered(tmp_path, vouching):
    # A relay's connector that vouched falsely (a compromised one) and was revoked for it went
    # on vouching through the relay's cache: its link closed, but the passwords it had vouched
    # for were answered offline until max_age.
    rt = vouched(tmp_path)
    live = login(rt)
    assert (live.outcome, live.answered_by) == (Outcome.SUCCESS, "backend-1")
    vouching["by"] = "backend-2"
    assert login(rt, "bob", "bob-pw").answered_by == "backend-2"
    set_action(rt, "unavailable")
    offline = login(rt)
    # the cache's answer names the backend whose word it repeats, for the audit line
    assert (offline.outcome, offline.reason, offline.from_cache, offline.answered_by) == \
        (Outcome.SUCCESS, "cache.offline", True, "backend-1")

    vouching["unknown"] = True  # cannot tell (the list of revocations not read yet): no answer, nothing lost
    assert login(rt).outcome is Outcome.UNAVAILABLE
    assert len(entries(rt)) == 2
    vouching["unknown"] = False

    vouching["revoked"] = {"backend-1"}
    refused = login(rt)
    assert (refused.outcome, refused.from_cache) == (Outcome.UNAVAILABLE, False)
    assert len(entries(rt)) == 1  # deleted, for every worker sharing the store
    vouching["revoked"] = set()
    assert login(rt).outcome is Outcome.UNAVAILABLE  # gone, not hidden
    other = login(rt, "bob", "bob-pw")  # what another backend vouched for stands
    assert (other.outcome, other.from_cache, other.answered_by) == (Outcome.SUCCESS, True, "backend-2")


def test_a_hot_hit_resting_on_a_revoked_backend_is_asked_live(tmp_path, vouching):
    rt = vouched(tmp_path, HOT)
    login(rt)
    hit = login(rt)
    assert (hit.reason, hit.from_cache, hit.answered_by) == ("cache.hot", True, "backend-1")

    vouching["unknown"] = True  # cannot tell: the chain answers, live
    testplugins.CALLS.clear()
    assert login(rt).from_cache is False and ("vouch", "gateway_authenticate") in testplugins.CALLS
    vouching["unknown"] = False

    vouching["revoked"], vouching["by"] = {"backend-1"}, "backend-2"
    testplugins.CALLS.clear()
    live = login(rt)
    assert (live.from_cache, live.answered_by) == (False, "backend-2")
    assert ("vouch", "gateway_authenticate") in testplugins.CALLS
    hit = login(rt)  # what the backend still trusted vouched for is remembered again
    assert (hit.reason, hit.answered_by) == ("cache.hot", "backend-2")


def test_a_hit_that_names_no_backend_asks_nobody(tmp_path, vouching):
    # The check costs a hook call only where a step names its backends (the relay): an LDAP
    # hot hit, the forward-auth hot path, is not slowed by it.
    rt = build(tmp_path, {"chain": ["ldap", "vouch"], "plugins": ["cache"]},
               {"ldap": {"action": "success"}, "vouch": {"action": "success"}, "cache": {"methods": ["ldap"], **HOT}},
               targets={"cache": CACHE, "vouch": "support.testplugins:Vouching"})
    login(rt)
    testplugins.CALLS.clear()
    hit = login(rt)
    assert (hit.reason, hit.answered_by) == ("cache.hot", "")
    assert ("vouch", "gateway_answerer_revoked") not in testplugins.CALLS
