"""Active Directory bind failures: the sub-code in the diagnostic message, and what it means.

AD answers every failed simple bind with resultCode 49 (invalidCredentials, RFC 4511 section
4.1.9) and puts the reason into the diagnosticMessage, for example::

    80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 775, v4563

``data XXX`` is the Win32 error in hex (775 = ERROR_ACCOUNT_LOCKED_OUT, 0x775 = 1909). The
DSID and the trailing version vary by Windows release (``v1db1``, ``v2580``, ``v4563``...);
Samba AD prints the same text. Only the sub-code is read here, and only from a message of
exactly that shape, from its first character: ``data 532`` anywhere else (a bind DN a server
quotes) is not AD's word.

AD reports the state codes (530-533, 701, 773) only when the password was right; 52e is a
wrong password; 525 is an unknown user; 775 (locked) is reported whatever the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway import Outcome

__all__ = ["AD_CODES", "AdCode", "parse_data_code"]


@dataclass(frozen=True, slots=True)
class AdCode:
    code: str
    reason: str
    outcome: Outcome
    meaning: str
    #: The password was verified before AD refused (so an operator flag may let it through).
    password_ok: bool = False


AD_CODES: dict[str, AdCode] = {c.code: c for c in (
    AdCode("525", "ldap.user_not_found", Outcome.USER_NOT_FOUND, "user not found"),
    AdCode("52e", "ldap.invalid_password", Outcome.INVALID_CREDENTIALS, "invalid credentials"),
    AdCode("530", "ldap.logon_hours", Outcome.ACCOUNT_STATE, "not permitted to log on at this time", True),
    AdCode("531", "ldap.workstation", Outcome.ACCOUNT_STATE, "not permitted to log on at this workstation", True),
    AdCode("532", "ldap.password_expired", Outcome.ACCOUNT_STATE, "password expired", True),
    AdCode("533", "ldap.disabled", Outcome.ACCOUNT_STATE, "account disabled", True),
    AdCode("701", "ldap.account_expired", Outcome.ACCOUNT_STATE, "account expired", True),
    AdCode("773", "ldap.must_change_password", Outcome.ACCOUNT_STATE, "user must reset password", True),
    AdCode("775", "ldap.locked", Outcome.ACCOUNT_STATE, "account locked out"),
)}

# AD's and Samba's message from its start: the HRESULT in 8 hex digits, "LdapErr", the DSID, the
# comment, and the Win32 error after "data". Matched at the start only, not searched for: a
# server that quotes the bind DN in its message (a DN holding "data 532") must not turn a wrong
# password into a state that allow_expired_password or allow_must_change_password lets in.
_AD_MESSAGE = re.compile(r"[0-9A-Fa-f]{8}: LdapErr: DSID-[0-9A-Fa-f]+, "
                         r"comment: AcceptSecurityContext error, data ([0-9A-Fa-f]{1,8})\b")


def parse_data_code(message: str | None) -> AdCode | None:
    """The known AD sub-code of a bind diagnosticMessage in AD's exact shape, or ``None`` (other
    servers, other shapes, unknown codes)."""
    if not message:
        return None
    match = _AD_MESSAGE.match(message)
    if match is None:
        return None
    return AD_CODES.get(match.group(1).lower())
