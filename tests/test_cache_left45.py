"""Names that only fold alike (``ß`` and ``ss``, ``ς`` and ``σ``) are different accounts in the
directory; the credential cache gave them one offline row. A real ``authgw serve`` with
``plugins: [cache]`` in front of a real slapd, with the SQLite store and a real redis-server.

1. One account's live login replaced the other's offline entry: ``straße-N`` logged in live,
   then ``strasse-N``; with the directory down, ``straße-N`` got no offline answer (503).
2. A refusal for account state (a disabled ``straße-N``) deleted the offline entry of
   ``strasse-N``, another account.

Each account now has its own row (the row key lowers case letter by letter, as directories
match names); a spelling that differs only in case still meets the account's row, and one
account's password never opens another's entry.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

from support.cacheenv import cache_conf, directory, disable, slapd_fixture, source, user, write_secrets  # noqa: F401
from support.redis import RedisServer

_N = itertools.count(os.getpid() * 100)

slapd = slapd_fixture()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def cache_yaml(tmp_path, store: str, redis) -> str:
    if store == "sqlite":
        return "cache: {}\n"
    pepper, encryption = write_secrets(tmp_path)
    prefix = f"t{next(_N)}:"
    return json.dumps({"cache": {"store": "redis", "redis": {"url": redis.url, "key_prefix": prefix},
                                 "pepper": {"file": str(pepper)},
                                 "encryption_key": {"file": str(encryption)}}})


def start(tmp_path, directory, start_gateway, store, redis):
    return start_gateway(cache_conf(tmp_path, directory, cache_yaml(tmp_path, store, redis)))


STORES = ["sqlite", "redis"]


@pytest.mark.parametrize("store", STORES)
def test_accounts_whose_names_only_fold_alike_keep_their_own_offline_entries(tmp_path, directory, start_gateway,
                                                                             store, redis):
    gateway = start(tmp_path, directory, start_gateway, store, redis)
    n = next(_N)
    # (uid, password, other spellings slapd takes for it: case only; its tables lower no ẞ)
    accounts = [(f"straße-{n}", "sharp-Passw0rd", [f"STRAßE-{n}", f"Straße-{n}"]),
                (f"strasse-{n}", "plain-Passw0rd", [f"STRASSE-{n}"]),
                (f"νικοσ-{n}", "sigma-Passw0rd", [f"ΝΙΚΟΣ-{n}"]),
                (f"νικος-{n}", "final-Passw0rd", [])]
    for uid, password, _ in accounts:
        directory.add_user(uid, password)
    for uid, password, spellings in accounts:  # each live login after the other's: before, the later one took the row
        for name in (*spellings, uid):  # slapd takes each spelling for the account
            live = gateway.auth(name, password)
            assert (live.status, source(live), user(live)) == (200, "live", uid), (name, live.status)
    directory.stop()
    for uid, password, spellings in accounts:
        for name in (uid, *spellings):
            offline = gateway.auth(name, password)
            assert (offline.status, source(offline), user(offline)) == (200, "cache", uid), \
                (name, offline.status, gateway.output()[-3000:])
    # One account's password never opens the other's entry, under any spelling.
    for (uid, _, spellings), (other, other_password, _) in itertools.permutations(accounts, 2):
        for name in (uid, *spellings):
            crossed = gateway.auth(name, other_password)
            assert crossed.status != 200 and user(crossed) is None, (name, other, crossed.status)


@pytest.mark.parametrize("store", STORES)
def test_a_refused_account_forgets_only_its_own_entry_not_one_that_folds_like_it(tmp_path, directory, start_gateway,
                                                                               store, redis):
    gateway = start(tmp_path, directory, start_gateway, store, redis)
    n = next(_N)
    kept, refused = f"strasse-{n}", f"straße-{n}"
    directory.add_user(kept, "kept-Passw0rd")
    directory.add_user(refused, "refused-Passw0rd")
    # the refused account first: before, the later login took the row (the first test's case)
    for uid, password in ((refused, "refused-Passw0rd"), (kept, "kept-Passw0rd")):
        assert source(gateway.auth(uid, password)) == "live", uid
    disable(directory, refused)
    # The directory refuses the disabled account (its right password, under two spellings).
    for name in (refused, f"STRAßE-{n}"):
        answer = gateway.auth(name, "refused-Passw0rd")
        assert answer.status in (401, 403) and user(answer) is None, (name, answer.status)
    directory.stop()
    offline = gateway.auth(kept, "kept-Passw0rd")
    assert (offline.status, source(offline), user(offline)) == (200, "cache", kept), \
        (offline.status, gateway.output()[-3000:])
    for name in (refused, f"Straße-{n}"):  # and the refused account is not answered offline
        gone = gateway.auth(name, "refused-Passw0rd")
        assert gone.status == 503 and user(gone) is None, (name, gone.status)


# -- rows an older version keyed by the full case fold (in-process, a real SQLite store) -----------


def test_a_pointer_row_written_under_the_old_full_fold_answers_no_other_name(tmp_path):
    """Before, ``jeßica-1@example.com``'s pointer row was keyed by its full fold,
    ``jessica-1@example.com``: after the upgrade that is the row of the name ``jessica-1@…``
    (another mail, maybe another user's), and it led to ``jeßica-1``'s entry. Its sealed name
    now has to be the name typed, up to case."""
    from gateway import Outcome
    from support.cacheenv import old_fold_pointer, runtime
    from support.chainhelp import attempt, decide

    account, mail, password = "jeßica-1", "jeßica-1@example.com", "right-Passw0rd"
    live = runtime(tmp_path, {"action": "success", "success_as": account})
    assert decide(live, attempt(mail, password)).success  # the account's entry, and its mail's pointer
    old_fold_pointer(live, mail, account, "jessica-1@example.com")  # what the full fold made of the mail

    down = runtime(tmp_path, {"action": "unavailable", "success_as": account})
    answered = decide(down, attempt(mail, password))
    assert answered.success and answered.from_cache and answered.identity.username == account
    for other in ("jessica-1@example.com", "JESSICA-1@example.com"):
        refused = decide(down, attempt(other, password))
        assert not refused.success and refused.outcome is Outcome.UNAVAILABLE, (other, refused)


def test_a_refusal_seen_by_a_lookup_forgets_only_the_refused_account(tmp_path):
    """The other path of a refusal: ``gateway_lookup_user`` (Kerberos, certificates) finds
    ``straße-2`` disabled. Before, that deleted ``strasse-2``'s entry too (one row)."""
    from support.cacheenv import runtime as cache_runtime
    from support.chainhelp import attempt, decide

    def runtime(ldap: dict):
        return cache_runtime(tmp_path, ldap, ldap_target="support.testplugins:Directory")

    # the refused account first: before, the later login took the row (the first test's case)
    accounts = {"straße-2": "sharp-Passw0rd", "strasse-2": "plain-Passw0rd"}
    live = runtime({"action": "success"})
    for name, password in accounts.items():
        assert decide(live, attempt(name, password)).success
    runtime({"action": "abstain", "lookup": "disabled"}).gateway.pm.hook.gateway_lookup_user(username="STRAßE-2")
    down = runtime({"action": "unavailable", "lookup": "unavailable"})
    kept = decide(down, attempt("strasse-2", accounts["strasse-2"]))
    assert kept.success and kept.from_cache and kept.identity.username == "strasse-2", kept
    gone = decide(down, attempt("straße-2", accounts["straße-2"]))
    assert not gone.success and not gone.from_cache, gone
