"""A lookup that finds no user forgets the user's offline entry (review of the cache plugin,
item 3), as a password attempt's ``USER_NOT_FOUND`` does.

``gateway_lookup_user`` (Kerberos and certificate logins, mapping rules) used to forget only on
an answer reporting the account refused: an account deleted from the directory kept its row,
and its cached password answered offline until ``max_age``. ``None`` from every plugin, the
step that proved the entry among them, now forgets it; a directory that cannot answer
(``BackendUnavailable``) forgets nothing, and neither does "unknown" from plugins other than the
one that proved the user.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import BackendUnavailable, Outcome
from support.chainhelp import attempt, build, decide

CACHE = "gateway.plugins.cache:CachePlugin"
DIRECTORY = "support.testplugins:Directory"
PASSWORD = "correct horse 3b9f"


def runtime(tmp_path: Path, ldap: dict, other: str = "abstain"):
    """``ldap`` answers lookups (support.testplugins.Directory); ``other`` is a step without one."""
    return build(tmp_path, {"chain": ["ldap", "other"], "plugins": ["cache"]},
                 {"ldap": ldap, "other": {"action": other}, "cache": {"methods": ["ldap", "other"]}},
                 targets={"cache": CACHE, "ldap": DIRECTORY})


def offline(tmp_path: Path, username: str):
    """The answer for *username* with both steps down."""
    down = runtime(tmp_path, {"action": "unavailable", "lookup": "unavailable"}, other="unavailable")
    return decide(down, attempt(username, PASSWORD))


def test_a_lookup_no_directory_answers_forgets_the_entry_of_the_step_that_was_asked(tmp_path):
    assert decide(runtime(tmp_path, {"action": "success"}), attempt("gone", PASSWORD)).step == "ldap"
    assert decide(runtime(tmp_path, {"action": "abstain"}, other="success"),
                  attempt("elsewhere", PASSWORD)).step == "other"

    # The directory cannot answer: that is no "no such user", nothing is forgotten.
    down = runtime(tmp_path, {"action": "unavailable", "lookup": "unavailable"})
    with pytest.raises(BackendUnavailable):
        down.gateway.pm.hook.gateway_lookup_user(username="gone")
    assert offline(tmp_path, "gone").reason == "cache.offline"

    # The directory that proved "gone" answers and knows no such user: the entry goes. "other"
    # proved "elsewhere" and answers no lookups, so nobody said that user is gone.
    deleted = runtime(tmp_path, {"action": "abstain", "lookup": "unknown"})
    for name in ("Gone", "elsewhere"):
        assert deleted.gateway.pm.hook.gateway_lookup_user(username=name) is None
    assert offline(tmp_path, "elsewhere").reason == "cache.offline"
    decision = offline(tmp_path, "gone")
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)
    assert len(list(deleted.gateway.plugins["cache"].offline.store.scan())) == 1
