"""Kerberos principal to gateway username.

Two ways, tried in this order:

``rules``
    ``{match: REGEX, username: TEMPLATE}`` pairs for multi-realm forests. The regular expression
    must match the whole principal (``alice@EU.CORP.EXAMPLE``); the template is expanded as in
    :meth:`re.Match.expand` (``\\1``, ``\\g<user>``). The first matching rule wins.
``realms``
    the ``strip_realm`` allowlist: ``alice@CORP.EXAMPLE`` becomes ``alice`` when
    ``CORP.EXAMPLE`` is listed. Only single-component principals are stripped: a principal with
    an instance (``alice/admin@...``, ``HTTP/host@...``) is a different identity from ``alice``
    and needs a rule.

Realm names are compared exactly (they are case-sensitive, RFC 4120 section 6.1). Anything else
is not mapped, and the login is refused: a trusted realm is not a license to log in as anyone.

Before either, :class:`CrossRealmPolicy` checks that the realm whose key opened the ticket may
name a client of the client's realm at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from gateway import PluginSettings
from gateway.model import plainly_spelt

__all__ = ["CrossRealmPolicy", "MappingRule", "Mapped", "PrincipalMapper", "split_principal"]


class MappingRule(PluginSettings):
    """One ``rules:`` entry."""

    match: str = Field(min_length=1, description="regular expression matched against the whole principal")
    username: str = Field(min_length=1, description=r"template, e.g. \1 or \g<user>")

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


def split_principal(principal: str) -> tuple[list[str], str]:
    """``HTTP/host@REALM`` to (``["HTTP", "host"]``, ``"REALM"``), honouring MIT's ``\\`` escapes."""
    if "\\" not in principal:  # nearly every principal: the same split without the character loop
        name, _, realm = principal.partition("@")
        return name.split("/"), realm
    return _split_escaped(principal)


#: What MIT's display form (krb5_unparse_name) writes for the characters it cannot show, read
#: back as krb5_parse_name reads them: any other escaped character stands for itself.
_MIT_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", "0": "\0"}


def _split_escaped(principal: str) -> tuple[list[str], str]:
    components, current, realm, in_realm = [], [], [], False
    chars = iter(principal)
    for ch in chars:
        if ch == "\\":
            # ``\b`` is a backspace, not a b: dropping the backslash mapped the principal
            # backspace+``ob`` to bob (review of the Kerberos plugin). The control character
            # decoded here makes the name unusable (PrincipalMapper._finish).
            escaped = next(chars, "")
            (realm if in_realm else current).append(_MIT_ESCAPES.get(escaped, escaped))
        elif ch == "@" and not in_realm:
            in_realm = True
        elif ch == "/" and not in_realm:
            components.append("".join(current))
            current = []
        else:
            (realm if in_realm else current).append(ch)
    components.append("".join(current))
    return components, "".join(realm)


@dataclass(frozen=True, slots=True)
class Mapped:
    """The result: a username, or why there is none (a reason code suffix and a detail)."""

    username: str | None
    reason: str = ""
    detail: str = ""


class PrincipalMapper:
    def __init__(self, realms: list[str], rules: list[MappingRule], lowercase: bool) -> None:
        self.realms = frozenset(realms)
        self.rules = [(re.compile(rule.match), rule.username) for rule in rules]
        self.lowercase = lowercase

    def _finish(self, username: str, principal: str) -> Mapped:
        # The directory finds a user by this name as loosely as it matches strings (case,
        # compatibility forms, white space), while MIT principals are exact: ``ａｌｉｃｅ`` and
        # ``alice`` with a no-break space are principals of their own and logged in as alice
        # (review of the Kerberos plugin). Only a name in its one spelling maps to anyone; case
        # is checked against the directory's own spelling (KerberosPlugin._identity).
        if not username or not plainly_spelt(username):
            return Mapped(None, "principal_not_mapped", f"{principal} maps to an unusable username")
        if self.lowercase:
            username = username.lower()  # before and after: "fran\u212a" (Kelvin sign) lowers to frank
            if not plainly_spelt(username):
                return Mapped(None, "principal_not_mapped", f"{principal} maps to an unusable username")
        return Mapped(username)

    def map(self, principal: str) -> Mapped:
        for pattern, template in self.rules:
            match = pattern.fullmatch(principal)
            if match:
                return self._finish(match.expand(template), principal)
        components, realm = split_principal(principal)
        if realm not in self.realms:
            return Mapped(None, "realm_not_allowed",
                          f"realm {realm!r} of {principal} is not in kerberos.realms and no rule matches")
        if len(components) != 1:
            return Mapped(None, "principal_not_mapped",
                          f"{principal} has an instance; strip_realm maps only user principals (add a rule)")
        return self._finish(components[0], principal)


class CrossRealmPolicy:
    """Which service realms' KDCs may name clients of other realms.

    A service ticket is written by the KDC of the service's realm, client name and realm
    included, and a KDC holding a cross-realm key ``krbtgt/ITS.REALM@CLIENT.REALM`` names clients
    of CLIENT.REALM (RFC 4120 section 1.2). Whoever administers that KDC can create such a key and
    so name ``alice@CORP.EXAMPLE`` without CORP.EXAMPLE taking part. Any key in the keytab opens
    tickets when ``service_principal`` is unset, so a second realm's key would let that realm's
    administrator log in as CORP's users. Trusted to name clients of other realms (their cross-realm
    trusts, as in an AD forest) are the KDCs of the realms the operator named: the realm of
    ``service_principal`` (the only key then accepted) and the realms in ``realms`` (whose
    administrators can already mint any username through strip_realm). A key of any other realm
    carries only principals of its own realm.
    """

    def __init__(self, realms: list[str], service_principal_set: bool) -> None:
        self.realms = frozenset(realms)
        self.service_principal_set = service_principal_set

    def refusal(self, principal: str, service: str) -> Mapped | None:
        """``None`` when the KDC of *service*'s realm may name *principal*, else why not."""
        if self.service_principal_set:  # the only key accepted is that realm's (first: no parsing)
            return None
        _, client_realm = split_principal(principal)
        _, service_realm = split_principal(service)
        if client_realm == service_realm or service_realm in self.realms:
            return None
        return Mapped(None, "cross_realm_not_allowed",
                      f"{principal} was named by the KDC of {service_realm} (the ticket is for {service}); "
                      f"a realm neither kerberos.service_principal's nor in kerberos.realms may name only "
                      f"its own principals")
