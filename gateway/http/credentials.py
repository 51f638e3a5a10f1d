"""Reading credentials from an ``Authorization`` header, strictly.

Anything malformed (bad base64, no colon, a username or password that is not UTF-8, over the
length limits, an empty password, a username that is only white space) is refused here, before
the chain, with the same 401 as a wrong password. Usernames reach the chain canonicalised
(:func:`gateway.model.canonical_username`).
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode

from gateway.model import NegotiateCredential, PasswordCredential

__all__ = ["MalformedCredentials", "parse_authorization", "check_password_credential", "single_authorization",
           "cookie_values", "MAX_USERNAME_BYTES", "MAX_PASSWORD_BYTES"]

MAX_USERNAME_BYTES = 256
MAX_PASSWORD_BYTES = 1024
MAX_TOKEN_BYTES = 64 * 1024
#: A control character (C0, DEL or C1): never part of a username.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MalformedCredentials(ValueError):
    """The header carries credentials that can never be valid; ``reason`` is a stable code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_password_credential(username: str, password: str) -> PasswordCredential:
    try:  # JSON can carry lone surrogates, which no backend can encode
        username_bytes, password_bytes = username.encode("utf-8"), password.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedCredentials("malformed_encoding") from None
    if not username or len(username_bytes) > MAX_USERNAME_BYTES:
        raise MalformedCredentials("malformed_username")
    if _CONTROL.search(username):
        raise MalformedCredentials("malformed_username")
    if not password:
        # An empty password is an anonymous bind to LDAP; refuse it before any plugin sees it.
        raise MalformedCredentials("empty_password")
    if len(password_bytes) > MAX_PASSWORD_BYTES:
        raise MalformedCredentials("password_too_long")
    credential = PasswordCredential(username, password)
    # " " or a zero-width space: nothing left after canonicalising; or a name NFKC made longer
    # than the limit (U+FDFA is 18 characters, 33 bytes, in NFKC): the limit holds for the name
    # plugins see and logs write, not only for the one sent.
    if not credential.username or len(credential.username.encode("utf-8")) > MAX_USERNAME_BYTES:
        raise MalformedCredentials("malformed_username")
    return credential


def _b64(data: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 4:
        raise MalformedCredentials("credentials_too_long")
    try:
        return b64decode(data.strip(" \t"), validate=True)  # not str.strip(): NBSP is not HTTP's whitespace
    except (binascii.Error, ValueError):
        raise MalformedCredentials("malformed_authorization") from None


def single_authorization(headers) -> str | None:
    """The request's one ``Authorization`` header, ``None`` without one.

    It is not a list header (RFC 9110 section 11.6.2): two of them are refused
    (``duplicate_authorization``) rather than the first believed, which a proxy or an
    application behind authgw may not read the same way.
    """
    values = headers.getall("Authorization", ())
    if len(values) > 1:
        raise MalformedCredentials("duplicate_authorization")
    return values[0] if values else None


def parse_authorization(header: str | None) -> PasswordCredential | NegotiateCredential | None:
    """``Basic`` gives a password credential, ``Negotiate`` a token; other schemes are ignored."""
    if not header:
        return None
    scheme, _, data = header.strip(" \t").partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        raw = _b64(data, MAX_USERNAME_BYTES + MAX_PASSWORD_BYTES + 1)
        try:
            text = raw.decode("utf-8")  # RFC 7617 charset="UTF-8"
        except UnicodeDecodeError:
            raise MalformedCredentials("malformed_encoding") from None
        username, colon, password = text.partition(":")
        if not colon:
            raise MalformedCredentials("malformed_authorization")
        return check_password_credential(username, password)
    if scheme == "negotiate":
        token = _b64(data, MAX_TOKEN_BYTES)
        if not token:
            raise MalformedCredentials("malformed_authorization")
        return NegotiateCredential(token)
    return None


def cookie_values(headers, name: str) -> list[str]:
    """Every value of the cookie *name* in *headers*' ``Cookie`` fields, in order: each split at
    ``;`` only (RFC 6265 section 5.4), the name matched exactly, the value taken whole (its
    surrounding DQUOTEs dropped). aiohttp's ``request.cookies`` keeps one value of a name, and
    ends a value at white space: ``x=a __Host-authgw_session=ID``, a cookie a sibling host can set
    for the parent domain and browsers send as one, was read as the login door's session
    (review of the sessions)."""
    values = []
    for header in headers.getall("Cookie", ()):
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                values.append(value.strip().strip('"'))
    return values
