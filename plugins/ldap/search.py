"""``gateway_search_users`` and ``gateway_list_groups`` for the ``ldap`` plugin.

Decides what a directory search may cost and show. The query matches the login attribute by
prefix and the display-name attributes by substring, escaped by
:mod:`~gateway.plugins.ldap.escaping` (a ``*`` or ``(`` in the query is matched literally). The
work is bounded whatever the caller asks: at most :data:`MAX_LIMIT` users per page, at most
:data:`MAX_SCAN` entries read per call (the size limit sent to the server), read in pages of
``groups.page_size`` with the paged-results control (RFC 2696). The answer is sorted by login
name and the cursor is the last name returned, so a page never depends on a server-side cookie
(the pool may hand the next call another connection, and paged cookies die with theirs).

Users carry their account state as ``gateway_lookup_user`` answers do; their claims never hold
a password attribute, even one an operator mapped. Reads ``base_dn``, ``scope``, ``user_filter``,
``attributes`` and ``groups.page_size`` (through the resolved settings).
"""

from __future__ import annotations

import base64
import dataclasses

from gateway import Identity, UserPage
from gateway.logs import printable
from gateway.plugins.ldap.accountstate import account_state
from gateway.plugins.ldap.escaping import contains, fill_search
from gateway.plugins.ldap.link import TROUBLE_CODES, Entry, Link, ServerTrouble
from gateway.plugins.ldap.pool import SERVICE

__all__ = ["MAX_LIMIT", "MAX_SCAN", "UserSearch"]

#: The most users one page holds, whatever the caller asks.
MAX_LIMIT = 200
#: The most entries one search reads (sent as the size limit): a query matching more is
#: answered from the first MAX_SCAN the server returns, and says so in the log.
MAX_SCAN = 2000
#: Attributes never copied into a search answer's claims.
SECRET_ATTRIBUTES = frozenset({"userpassword", "unicodepwd", "authpassword", "sambantpassword",
                               "sambalmpassword", "krbprincipalkey", "ntpwdhistory", "lmpwdhistory",
                               "supplementalcredentials", "dbcspwd", "ipanthash"})
#: Longest query accepted (a login name is at most ``max_username_length`` anyway).
MAX_QUERY = 256


def encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a cursor this plugin issued") from None


class UserSearch:
    def __init__(self, directory) -> None:
        self.d = directory
        r = directory.r
        self._secret_claims = {claim for claim, attrs in r.claims if any(a.lower() in SECRET_ATTRIBUTES for a in attrs)}

    def filter(self, query: str) -> str:
        r = self.d.r
        if not query:
            return fill_search(r.user_filter, "")
        anyone = fill_search(r.user_filter, "")
        names = "".join(contains(attr, query) for attr in r.display_name_attrs)
        by_name = f"(&{anyone}(|{names}))" if names else ""
        return f"(|{fill_search(r.user_filter, query)}{by_name})"

    def _scan(self, link: Link, query: str) -> list[Entry]:
        s = self.d.s
        page = max(1, min(s.groups.page_size, MAX_SCAN))
        result, entries = link.search_pages(s.base_dn, query, self.d._attributes, scope=s.scope, size_limit=MAX_SCAN,
                                            page_size=page, limit=MAX_SCAN)
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"directory search answered {result.code}: {result.message}")
        if result.code == 4 or len(entries) >= MAX_SCAN:  # sizeLimitExceeded: bounded on purpose
            self.d.log.warning("directory search %s reached its bound of %d entries; answered from those",
                               printable(query), MAX_SCAN)
            return entries[:MAX_SCAN]
        if result.code != 0:
            self.d.log.warning("directory search under %s answered %d: %s", s.base_dn, result.code, result.message)
        return entries

    def search(self, query: str, limit: int, cursor: str | None, deadline: float) -> UserPage:
        if len(query) > MAX_QUERY:
            raise ValueError(f"query longer than {MAX_QUERY} characters")
        limit = max(1, min(int(limit), MAX_LIMIT))
        after = decode_cursor(cursor).lower() if cursor else None
        ldap_filter = self.filter(query)
        entries = self.d.pool.call(SERVICE, lambda link: self._scan(link, ldap_filter), deadline)
        users = sorted((self._identity(e, deadline) for e in entries), key=lambda i: (i.username.lower(), i.subject))
        if after is not None:
            users = [u for u in users if u.username.lower() > after]
        page = users[:limit]
        more = len(users) > limit
        return UserPage(tuple(page), encode_cursor(page[-1].username) if more and page else None)

    def _identity(self, entry: Entry, deadline: float) -> Identity:
        d = self.d
        identity = d.identity(entry, "", (), {})
        claims = {k: v for k, v in identity.claims.items() if k not in self._secret_claims}
        state, password_state = account_state(entry)
        unreadable = d.unreadable_state(entry)
        if unreadable and not state:
            state = "ldap.account_state_unreadable"  # as a lookup answers: never "enabled" unread
        if not state and not password_state:
            # ppolicy's password age, as a lookup judges it (one read per policy, cached).
            password_state = d.password_age(entry, deadline)
        return dataclasses.replace(identity, claims=claims, account_state=state, password_state=password_state)

    def list_groups(self, username: str, deadline: float) -> list[str] | None:
        d = self.d
        entry = d.search_user(username, deadline).one
        if entry is None or d.ambiguously_named(entry, username):  # unknown or ambiguous
            return None
        groups = d.groups.known(entry)
        if groups is None:
            groups = d.pool.call(SERVICE, lambda link: d.groups.resolve(link, entry, username), deadline)
        return sorted(groups)
