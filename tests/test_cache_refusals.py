"""The credential cache forgets an account the directory refuses, on every path (issue 9 items 2
and 4), through a real ``authgw serve`` (chain ``[kerberos, client_cert, ldap]``, ``plugins:
[cache]``) in front of a real slapd (ppolicy overlay) and a real MIT KDC.

A Kerberos or certificate login refused for account state carries no password username, so the
cache used to keep the user's offline row and hot entries: with the directory down, the disabled
user logged in with the cached password. The cache now forgets the user as soon as the
directory's ``gateway_lookup_user`` answer reports the account refused. Usernames are case-folded
by default, so every spelling of one name shares one row that one refusal forgets.
"""

from __future__ import annotations

import json
import sqlite3

import ldap3
import pytest

from support.gateway import GatewayProcess
from support.threedoors import by_certificate, by_kerberos, by_password, start_three_door_gateway, three_door_world

USERS = ("krbuser", "certuser", "caseuser")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with three_door_world(tmp_path_factory.mktemp("refusals"), USERS, "cache refusals CA") as world:
        yield world


@pytest.fixture
def gateway(world, tmp_path):
    if not world["slapd"].running:
        world["slapd"].start()
    process = start_three_door_gateway(
        world, tmp_path, core={"plugins": ["cache"], "workers": 1},
        ldap=world["slapd"].plugin_settings(mode="plain", backoff=0),
        # The hot cache too: its entries must go with the offline row.
        files={"cache.yaml": json.dumps({"cache": {"hot": {"enabled": True, "ttl": 600}}})})
    yield process
    process.stop()


def record(gateway: GatewayProcess, response) -> tuple:
    line = gateway.audit_for(response.header("X-Request-Id"))
    return response.status, line["outcome"], line["reason"], line["from_cache"]


def rows(gateway: GatewayProcess) -> int:
    with sqlite3.connect(gateway.state_dir / "cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


def lock(world, user: str) -> None:
    world["slapd"].modify(world["dns"][user], {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]})


def unlock(world, user: str) -> None:
    world["slapd"].modify(world["dns"][user], {"pwdAccountLockedTime": [(ldap3.MODIFY_DELETE, [])]})


def _refused_path_forgets(world, gateway, user, refuse, spellings) -> None:
    for spelling in spellings:
        live = by_password(gateway, user, spelling)
        assert record(gateway, live) == (200, "success", "", False), live.body
    assert rows(gateway) == 1  # every spelling of one name: one offline row
    assert by_password(gateway, user, spellings[-1]).header("Remote-Auth-Source") == "cache"  # a hot hit

    lock(world, user)
    try:
        refused = refuse(world, gateway, user)
        assert refused.status == 401
        assert record(gateway, refused)[1:3] == ("account_state", "ldap.locked")
        assert rows(gateway) == 0
        # The directory goes down before any password attempt: neither the hot entries nor the
        # offline row may answer for any spelling (503: nobody can tell; never a 200).
        world["slapd"].stop()
        for spelling in spellings:
            offline = by_password(gateway, user, spelling)
            assert offline.status in (401, 503) and offline.header("Remote-User") is None
            assert record(gateway, offline)[3] is False  # never answered from the cache
    finally:
        if not world["slapd"].running:
            world["slapd"].start()
        unlock(world, user)


def test_a_kerberos_refusal_forgets_the_cached_password(world, gateway):
    _refused_path_forgets(world, gateway, "krbuser", by_kerberos, ["krbuser"])


def test_a_certificate_refusal_forgets_the_cached_password(world, gateway):
    _refused_path_forgets(world, gateway, "certuser", by_certificate, ["certuser"])


def test_spellings_share_one_row_and_one_refusal_forgets_them_all(world, gateway):
    _refused_path_forgets(world, gateway, "caseuser", by_kerberos, ["caseuser", "CaseUser", "CASEUSER"])


def test_without_a_refusal_the_cached_password_still_works_offline(world, gateway):
    """The reference for the tests above: the same steps minus the refusal log in from the cache."""
    live = by_password(gateway, "krbuser", "KRBUSER")
    assert live.status == 200
    world["slapd"].stop()
    offline = by_password(gateway, "krbuser")
    assert record(gateway, offline) == (200, "success", "cache.offline", True)
