"""The credential cache's refusal paths when the refused name is another name of the account:
a real ``authgw serve`` (``chain: [ldap]``, ``plugins: [cache]``) in front of a real slapd
(ppolicy overlay), whose ``user_filter`` takes an account's uid or its mail.

An account's offline entry is its uid's row; another name gets a row only when it has logged
in (a pointer to the account's). A refusal under a name that never logged in (the mail) forgot
only that name's row, which does not exist: the account's entry stayed answerable offline until
``max_age``. With the directory down, then:

1. a disabled account (refused ``ldap.disabled`` under its mail) logged in by its uid (200 from
   the cache), and, directory up, the uid's hot entry answered it live (200, ``cache.hot``);
2. a ppolicy-locked account (its right password refused as wrong under its mail) logged in by
   its uid;
3. the same for an account whose ppolicy ``pwdEndTime`` passed;
4. the old password, refused under the mail after a change at the directory, logged in by the uid.

The cache now asks the step that refused which account the name is (its own
``gateway_lookup_user``) and forgets that account's own entry: at once for account state, and for
a refused password only when the entry holds that password (a wrong guess under the mail deletes
nothing).

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import json
import sqlite3

import ldap3

from support.cacheenv import TWO_NAMES, cache_conf, directory, disable, lock, slapd_fixture  # noqa: F401 - fixtures
from support.gateway import GatewayProcess
from support.net import wait_for
from support.slapd import Slapd
from test_cache_slapd import new_user, source

OLD, NEW = "first-Passw0rd", "second-Passw0rd"
#: How long a test waits for something that should happen (a guard against a hang, never a bound
#: on how fast anything runs).
HANG = 60

slapd = slapd_fixture(ppolicy=True)  # ppolicy: accounts can be locked


def start(tmp_path, directory: Slapd, start_gateway, hot: bool = False) -> GatewayProcess:
    cache = {"cache": {"hot": {"enabled": True, "ttl": 600}}} if hot else {"cache": {}}
    return start_gateway(cache_conf(tmp_path, directory, json.dumps(cache), user_filter=TWO_NAMES))


def rows(gateway: GatewayProcess) -> int:
    with sqlite3.connect(gateway.state_dir / "cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


def expire(directory: Slapd, uid: str) -> None:
    directory.modify(directory.user_dn(uid), {"pwdEndTime": [(ldap3.MODIFY_REPLACE, ["20000101000000Z"])]})


def change_password(directory: Slapd, uid: str) -> None:
    directory.set_password(uid, NEW)


def reason(gateway: GatewayProcess, response) -> tuple:
    line = gateway.audit_for(response.header("X-Request-Id"))
    return line["outcome"], line["reason"]


def refused_under_the_mail_then_offline_by_the_uid(tmp_path, directory, start_gateway, refuse, expected):
    gateway = start(tmp_path, directory, start_gateway)
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(uid, OLD)) == "live"
    assert rows(gateway) == 1  # the account's row; the mail never logged in, so it has none
    refuse(directory, uid)
    refused = gateway.auth(mail, OLD)  # the directory refuses the account under its mail
    assert refused.status == 401 and reason(gateway, refused) == expected
    # The account's entry goes (for a refused password, after the answer, on the cache's thread).
    wait_for(lambda: rows(gateway) == 0, HANG, what="the account's offline entry forgotten",
             log=lambda: gateway.output()[-3000:])
    directory.stop()
    for name in (uid, mail):
        offline = gateway.auth(name, OLD)
        assert offline.status == 503 and offline.header("Remote-User") is None, (name, offline.status, source(offline))


def test_an_account_disabled_and_refused_under_its_mail_is_not_answered_offline_under_its_uid(
        tmp_path, directory, start_gateway):
    refused_under_the_mail_then_offline_by_the_uid(tmp_path, directory, start_gateway, disable,
                                                   ("account_state", "ldap.disabled"))


def test_an_account_locked_and_refused_under_its_mail_is_not_answered_offline_under_its_uid(
        tmp_path, directory, start_gateway):
    # ppolicy answers a locked account's right password as a wrong one
    refused_under_the_mail_then_offline_by_the_uid(tmp_path, directory, start_gateway, lock,
                                                   ("invalid_credentials", "ldap.invalid_password"))


def test_an_account_expired_and_refused_under_its_mail_is_not_answered_offline_under_its_uid(
        tmp_path, directory, start_gateway):
    # ppolicy's pwdEndTime passed: the bind is refused as a wrong password
    refused_under_the_mail_then_offline_by_the_uid(tmp_path, directory, start_gateway, expire,
                                                   ("invalid_credentials", "ldap.invalid_password"))


def test_an_old_password_refused_under_the_mail_no_longer_works_offline_under_the_uid(
        tmp_path, directory, start_gateway):
    refused_under_the_mail_then_offline_by_the_uid(tmp_path, directory, start_gateway, change_password,
                                                   ("invalid_credentials", "ldap.invalid_password"))


def test_an_account_disabled_and_refused_under_its_mail_loses_its_hot_entries(tmp_path, directory, start_gateway):
    gateway = start(tmp_path, directory, start_gateway, hot=True)
    uid, _ = new_user(directory, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(uid, OLD)) == "live"
    assert source(gateway.auth(uid, OLD)) == "cache"  # a hot hit
    disable(directory, uid)
    refused = gateway.auth(mail, OLD)
    assert refused.status == 401 and reason(gateway, refused) == ("account_state", "ldap.disabled")
    again = gateway.auth(uid, OLD)  # the directory is asked again, and refuses
    assert again.status == 401 and again.header("Remote-User") is None, (again.status, source(again))
    assert reason(gateway, again) == ("account_state", "ldap.disabled")


def test_a_wrong_guess_under_the_mail_keeps_the_accounts_offline_entry(tmp_path, directory, start_gateway):
    """The comparison is with the account's entry: a guess under another name that is not the
    cached password deletes nothing (else anyone could wipe a user's offline login by mail)."""
    gateway = start(tmp_path, directory, start_gateway)
    uid, _ = new_user(directory, OLD)
    other, _ = new_user(directory, OLD)
    for name in (uid, other):
        assert source(gateway.auth(name, OLD)) == "live"
    wrong = gateway.auth(f"{uid}@example.com", "a-wrong-guess")
    assert wrong.status == 401 and reason(gateway, wrong) == ("invalid_credentials", "ldap.invalid_password")
    # A refusal compared after the guess (one thread, in order) that does forget: the guess's
    # comparison is over once this one's entry is gone.
    change_password(directory, other)
    assert gateway.auth(f"{other}@example.com", OLD).status == 401
    wait_for(lambda: rows(gateway) == 1, HANG, what="the other account's offline entry forgotten",
             log=lambda: gateway.output()[-3000:])
    directory.stop()
    offline = gateway.auth(uid, OLD)
    assert (offline.status, source(offline), offline.header("Remote-User")) == (200, "cache", uid), \
        (offline.status, gateway.output()[-3000:])
