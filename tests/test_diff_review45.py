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
import os

from support.cacheenv import cache_conf, directory, disable, slapd_fixture, source, user  # noqa: F401 - fixtures

_N = itertools.count(os.getpid() * 100 + 45)

slapd = slapd_fixture()


def _start_cached(tmp_path, directory, start_gateway):
    return start_gateway(cache_conf(tmp_path, directory))


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
            assert (live.status, source(live), user(live)) == (200, "live", uid), (uid, live.status)
        disable(directory, refused)
        answer = gateway.auth(refused, "refused-Passw0rd")
        assert answer.status in (401, 403) and user(answer) is None, (refused, answer.status)
    directory.stop()
    for kept, refused in pairs:
        offline = gateway.auth(kept, "kept-Passw0rd")
        assert (offline.status, source(offline), user(offline)) == (200, "cache", kept), \
            (kept, offline.status, gateway.output()[-2000:])
        gone = gateway.auth(refused, "refused-Passw0rd")
        assert gone.status == 503 and user(gone) is None, (refused, gone.status)


# -- 2. a pointer row an older version keyed by the full case fold ----------------------------------


def test_a_refusal_under_a_name_an_old_pointer_row_is_keyed_by_keeps_the_other_accounts_entry(tmp_path):
    """Before the upgrade, ``jeßica-3@…``'s pointer row was keyed by its full fold,
    ``jessica-3@…``. After it, that is the row of another name; ``_resolve`` no longer follows
    it, but a refusal of that other name (any wrong password, an account-state refusal, the
    operator's purge) still did, and deleted ``jeßica-3``'s entry."""
    from support.cacheenv import old_fold_pointer, runtime as cache_runtime
    from support.chainhelp import attempt, decide

    account, mail, password = "jeßica-3", "jeßica-3@example.com", "right-Passw0rd"
    other = "jessica-3@example.com"  # another user's mail, which the old fold made the row of `mail`

    def runtime(action: str):
        return cache_runtime(tmp_path, {"action": action, "success_as": account})

    live = runtime("success")
    assert decide(live, attempt(mail, password)).success  # the account's entry, and its mail's pointer
    old_fold_pointer(live, mail, account, "jessica-3@example.com")

    for action in ("invalid", "account_state"):
        refusing = runtime(action)
        assert not decide(refusing, attempt(other, "a-wrong-Passw0rd")).success
        assert refusing.gateway.plugins["cache"].offline.rechecked(10.0)
    down = runtime("unavailable")
    for name in (account, mail):
        answered = decide(down, attempt(name, password))
        assert answered.success and answered.from_cache and answered.identity.username == account, (name, answered)
    assert not decide(down, attempt(other, password)).success
