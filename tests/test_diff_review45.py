"""Review of this session's changes (git diff aa83244..HEAD), against real components.

1. The offline cache's row key (``plugins/cache/offline.py``, :func:`lowered`) lowered every
   letter Python lowers; slapd lowers only those of its own (older) Unicode tables, and keeps
   ``straße`` and ``STRAẞE``, ``ⱥnna`` and ``Ⱥnna`` as two users: they shared one offline row,
   the round-5 bug again for these letters (one's refusal deleted the other's entry).
2. A pointer row an older version keyed by the full case fold (``jeßica@…``'s, in the row of
   ``jessica@…``) is no longer followed to answer, but a refusal of the name whose row it now
   is (any wrong password, an account-state refusal) still followed it and deleted the other
   account's offline entry.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import ldap3
import pytest

from support.gateway import write_conf
from support.slapd import Slapd

_N = itertools.count(os.getpid() * 100 + 45)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    yield server
    if server.running:
        server.stop()


@pytest.fixture
def directory(slapd):
    if not slapd.running:
        slapd.start()
    return slapd


def _start_cached(tmp_path, directory, start_gateway):
    conf_dir = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": """\
            chain: [ldap]
            plugins: [cache]
            throttle: {enabled: false}
            health: {probe_interval: 3600}
            workers: 1
            deadline: 5
        """,
        "ldap.yaml": "ldap: " + json.dumps(directory.plugin_settings("plain", backoff=0)),
        "cache.yaml": "cache: {}\n",
    })
    return start_gateway(conf_dir)


def _source(response) -> str | None:
    return response.header("Remote-Auth-Source")


def _user(response) -> str | None:
    name = response.header("Remote-User")
    return name.encode("latin-1").decode() if name is not None else None


def _disable(directory: Slapd, uid: str) -> None:
    directory.modify(directory.user_dn(uid), {"objectClass": [(ldap3.MODIFY_ADD, ["authgwAccountState"])],
                                              "nsAccountLock": [(ldap3.MODIFY_REPLACE, ["TRUE"])]})


# -- 1. letters Python lowers and slapd does not -----------------------------------------------------


def test_accounts_slapd_keeps_apart_by_a_letter_it_does_not_lower_keep_their_own_offline_rows(
        tmp_path, directory, start_gateway):
    gateway = _start_cached(tmp_path, directory, start_gateway)
    n = next(_N)
    # (kept, refused): slapd has both as users (its case tables have no ẞ, Ⱥ, Cherokee capitals).
    pairs = [(f"straße-{n}", f"STRAẞE-{n}"), (f"ⱥnna-{n}", f"Ⱥnna-{n}"), (f"ꭰa-{n}", f"Ꭰa-{n}")]
    for kept, refused in pairs:
        directory.add_user(kept, "kept-Passw0rd")
        directory.add_user(refused, "refused-Passw0rd")
        for uid, password in ((kept, "kept-Passw0rd"), (refused, "refused-Passw0rd")):
            live = gateway.auth(uid, password)
            assert (live.status, _source(live), _user(live)) == (200, "live", uid), (uid, live.status)
        _disable(directory, refused)
        answer = gateway.auth(refused, "refused-Passw0rd")
        assert answer.status in (401, 403) and _user(answer) is None, (refused, answer.status)
    directory.stop()
    for kept, refused in pairs:
        offline = gateway.auth(kept, "kept-Passw0rd")
        assert (offline.status, _source(offline), _user(offline)) == (200, "cache", kept), \
            (kept, offline.status, gateway.output()[-2000:])
        gone = gateway.auth(refused, "refused-Passw0rd")
        assert gone.status == 503 and _user(gone) is None, (refused, gone.status)


# -- 2. a pointer row an older version keyed by the full case fold ----------------------------------


def test_a_refusal_under_a_name_an_old_pointer_row_is_keyed_by_keeps_the_other_accounts_entry(tmp_path):
    """Before the upgrade, ``jeßica-3@…``'s pointer row was keyed by its full fold,
    ``jessica-3@…``. After it, that is the row of another name; ``_resolve`` no longer follows
    it, but a refusal of that other name (any wrong password, an account-state refusal, the
    operator's purge) still did, and deleted ``jeßica-3``'s entry."""
    from gateway.plugins.cache.offline import ALIAS_HASH
    from gateway.plugins.cache.store import Entry
    from support.chainhelp import attempt, build, decide

    account, mail, password = "jeßica-3", "jeßica-3@example.com", "right-Passw0rd"
    other = "jessica-3@example.com"  # another user's mail, which the old fold made the row of `mail`

    def runtime(action: str):
        return build(tmp_path, {"chain": ["ldap"], "plugins": ["cache"]},
                     {"ldap": {"action": action, "success_as": account}, "cache": {}},
                     targets={"cache": "gateway.plugins.cache:CachePlugin"})

    live = runtime("success")
    assert decide(live, attempt(mail, password)).success  # the account's entry, and its mail's pointer
    offline = live.gateway.plugins["cache"].offline
    keys = offline.keys()
    old_row = keys.row_key("jessica-3@example.com")
    now = time.time()
    offline.store.put(Entry(old_row, keys.kid, ALIAS_HASH,
                            keys.seal_alias(old_row, account, "ldap", now, password_hash=ALIAS_HASH, name=mail), now))

    for action in ("invalid", "account_state"):
        refusing = runtime(action)
        assert not decide(refusing, attempt(other, "a-wrong-Passw0rd")).success
        assert refusing.gateway.plugins["cache"].offline.rechecked(10.0)
    down = runtime("unavailable")
    for name in (account, mail):
        answered = decide(down, attempt(name, password))
        assert answered.success and answered.from_cache and answered.identity.username == account, (name, answered)
    assert not decide(down, attempt(other, password)).success
