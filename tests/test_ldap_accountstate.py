"""Account-state attributes in shapes a real directory's schema would not produce (a custom
schema, a multi-valued copy, a value written by a script), read by
:func:`gateway.plugins.ldap.accountstate.account_state`.

A focused unit test is the honest level here: slapd's schema (and AD's) refuses most of these
values, so no server can send them to the gateway in a test; but a directory with a looser
schema can, and the answer must then fail closed (docs/security.md, "account state on every
path"). The well-formed shapes go through real servers in test_account_state.py.
"""

from __future__ import annotations

import calendar

import pytest

from gateway.plugins.ldap.accountstate import account_state
from gateway.plugins.ldap.link import Entry

NOW = calendar.timegm((2026, 6, 1, 12, 0, 0))


def state(**attributes: list[str]) -> tuple[str, str]:
    return account_state(Entry("uid=u,dc=example,dc=com",
                               {name.replace("_", "-"): [v.encode() for v in values]
                                for name, values in attributes.items()}), now=NOW)


@pytest.mark.parametrize("attributes, expected", [
    # Every value counts: a harmless first value does not hide a flag in a second one.
    ({"userAccountControl": ["512", "514"]}, "ldap.disabled"),
    ({"nsAccountLock": ["false", "TRUE"]}, "ldap.disabled"),
    ({"nsAccountLock": ["true"]}, "ldap.disabled"),
    ({"nsAccountLock": [" True "]}, "ldap.disabled"),
    ({"msDS_User_Account_Control_Computed": ["0", "16"]}, "ldap.locked"),
    ({"accountExpires": ["0", "10000000"]}, "ldap.account_expired"),
    # A value that does not parse is not a usable account.
    ({"userAccountControl": ["0x202"]}, "ldap.disabled"),
    ({"userAccountControl": [""]}, "ldap.disabled"),
    ({"msDS_User_Account_Control_Computed": ["locked"]}, "ldap.locked"),
    ({"accountExpires": ["never"]}, "ldap.account_expired"),
    ({"pwdEndTime": ["soon"]}, "ldap.account_expired"),
    ({"pwdEndTime": ["20261301000000Z"]}, "ldap.account_expired"),  # month 13
    ({"pwdStartTime": ["000001010000Z"]}, "ldap.account_expired"),
    # Generalized time: fractions of the last unit, offsets, minutes and seconds optional.
    ({"pwdEndTime": ["20260601115959.9Z"]}, "ldap.account_expired"),
    ({"pwdEndTime": ["2026060112Z"]}, "ldap.account_expired"),  # 12:00Z is now: ended
    ({"pwdEndTime": ["2026060112.5Z"]}, ""),  # 12:30Z
    ({"pwdEndTime": ["20260601133000+0100"]}, ""),  # 12:30Z
    ({"pwdEndTime": ["20260601123000+0100"]}, "ldap.account_expired"),  # 11:30Z
    ({"pwdEndTime": ["202606011130-0100"]}, ""),  # 12:30Z
    ({"pwdStartTime": ["20260601113000-0100"]}, "ldap.account_expired"),  # 12:30Z, not yet
    ({"pwdStartTime": ["20260601113000Z"], "pwdEndTime": ["99991231235959Z"]}, ""),
    ({"pwdEndTime": ["99991231230000-0200"]}, "ldap.account_expired"),  # past year 9999: unreadable
    # Names are matched as LDAP matches them, whatever their case (the entry's own spelling).
    ({"USERACCOUNTCONTROL": ["514"]}, "ldap.disabled"),
    ({"nsaccountlock": ["TRUE"]}, "ldap.disabled"),
    ({"PWDACCOUNTLOCKEDTIME": ["000001010000Z"]}, "ldap.locked"),
    # Well-formed shapes, for reference.
    ({"userAccountControl": ["512"], "accountExpires": ["9223372036854775807"]}, ""),
    ({}, ""),
    ({"cn": ["Alice"], "mail": ["alice@example.com"], "memberOf": ["cn=staff,dc=example,dc=com"]}, ""),
])
def test_unexpected_shapes_fail_closed(attributes, expected):
    assert state(**attributes)[0] == expected


@pytest.mark.parametrize("attributes, expected", [
    ({"pwdLastSet": ["132000000000000000", "0"]}, "ldap.must_change_password"),
    ({"pwdLastSet": ["yesterday"]}, "ldap.must_change_password"),
    ({"pwdReset": ["FALSE", "true"]}, "ldap.must_change_password"),
    ({"msDS_User_Account_Control_Computed": ["8388608"]}, "ldap.password_expired"),
    ({"pwdLastSet": ["132000000000000000"], "pwdReset": ["FALSE"]}, ""),
])
def test_password_state_shapes(attributes, expected):
    assert state(**attributes)[1] == expected
