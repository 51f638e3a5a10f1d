"""Review of the credential cache (fourth round): a real ``authgw serve`` with ``plugins: [cache]``
in front of a real slapd.

A name no directory knows whose full case fold is a cached user's (``ß`` folds to ``ss``, ``ς`` to
``σ``): slapd keeps ``strasse`` and ``straße`` apart, the cache's row key does not. A live
``USER_NOT_FOUND`` for ``roß-1`` deleted ``ross-1``'s offline entry, and one for
``roß-1@example.com`` followed the pointer row of ``ross-1@example.com`` to it: one request by
anyone, no password needed, took a user's offline login away for the next outage (a wrong
password no longer does). The row now says for which name it was written, and a name the
directory does not take for that one forgets nothing; a spelling it does take (case) still does.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

from support.cacheenv import TWO_NAMES, cache_conf, slapd_fixture
from test_cache_slapd import source

PASSWORD = "first-Passw0rd"

slapd = slapd_fixture()


def conf(tmp_path, slapd):
    return cache_conf(tmp_path, slapd, user_filter=TWO_NAMES)


def test_a_name_that_only_folds_like_a_users_does_not_take_away_their_offline_login(tmp_path, slapd,
                                                                                    start_gateway):
    gateway = start_gateway(conf(tmp_path, slapd))
    slapd.add_user("ross-1", PASSWORD, mail="ross-1@example.com")
    slapd.add_user("νικοσ-1", PASSWORD, mail="nikos-1@example.com")
    slapd.add_user("gone-1", PASSWORD, mail="gone-1@example.com")  # deleted below: still forgotten
    for name in ("ross-1", "ross-1@example.com", "νικοσ-1", "gone-1@example.com"):
        assert source(gateway.auth(name, PASSWORD)) == "live", name
    # Names slapd does not know (it keeps ß from ss, ς from σ), any password, no account needed.
    for stranger in ("roß-1", "roß-1@example.com", "νικος-1"):
        refused = gateway.auth(stranger, "anything")
        assert refused.status == 401 and refused.header("Remote-User") is None, stranger
    # The deleted account, under a spelling slapd does take for its mail (case): forgotten.
    slapd.delete(slapd.user_dn("gone-1"))
    assert gateway.auth("GONE-1@Example.COM", PASSWORD).status == 401
    slapd.stop()
    for name, account in (("ross-1", "ross-1"), ("ross-1@example.com", "ross-1"), ("νικοσ-1", "νικοσ-1")):
        offline = gateway.auth(name, PASSWORD)
        assert (offline.status, source(offline)) == (200, "cache"), (name, offline.status, gateway.output()[-2000:])
        assert offline.header("Remote-User").encode("latin-1").decode() == account
    for name in ("gone-1", "gone-1@example.com"):
        offline = gateway.auth(name, PASSWORD)
        assert offline.status == 503 and offline.header("Remote-User") is None, (name, offline.status)
