"""A user's groups: from ``memberOf`` or a group search, nested, cached, paged.

Nesting is resolved by the server where it can be: Active Directory's in-chain matching rule
(``member:1.2.840.113556.1.4.1941:=DN``, MS-ADTS 3.1.1.3.4.4.3) returns every group that holds
the user directly or through other groups, in one query. Other directories are expanded level
by level (breadth first), at most ``max_depth`` levels and ``max_groups`` groups, with a visited
set so that membership cycles end. Group searches use RFC 2696 paged results, so a user in
thousands of groups does not hit the server's size limit.

The cache keeps each user's group names for ``cache_ttl`` seconds (keyed by the user's DN). It
holds no credentials; a login still binds every time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from gateway.plugins.ldap.escaping import fill, first_rdn_value
from gateway.plugins.ldap.link import TROUBLE_CODES, Entry, Link, ServerTrouble
from gateway.plugins.ldap.settings import GroupSettings, Resolved

__all__ = ["GroupCache", "GroupResolver"]

#: Group DNs put into one ``(|(member=a)(member=b)...)`` query while expanding a level.
_CHUNK = 40


class GroupCache:
    """User DN -> group names, with a TTL and a size bound (oldest entry evicted). Thread-safe."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._data: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, ...] | None:
        if not self.ttl or not self.size:
            return None
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] < time.monotonic():
                del self._data[key]
                return None
            return item[1]

    def put(self, key: str, groups: tuple[str, ...]) -> None:
        if not self.ttl or not self.size:
            return
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl, groups)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class GroupResolver:
    def __init__(self, resolved: Resolved, settings: GroupSettings, log) -> None:
        self.r = resolved
        self.s = settings
        self.log = log
        self.cache = GroupCache(settings.cache_ttl, settings.cache_size)
        self._name_attr = settings.name_attribute
        self._warned_depth = False

    @property
    def enabled(self) -> bool:
        return self.r.group_source != "none"

    def known(self, user: Entry) -> tuple[str, ...] | None:
        """Groups known without a query (none, direct memberOf, or cached), else ``None``."""
        if not self.enabled:
            return ()
        if self.r.group_source == "memberof" and not self.s.nested:
            return tuple(sorted({first_rdn_value(_text(v)) for v in user.get("memberOf")}))
        return self.cache.get(user.dn.lower())

    def resolve(self, link: Link, user: Entry, username: str) -> tuple[str, ...]:
        """Query the directory for *user*'s groups (raises LinkBroken/ServerTrouble on trouble)."""
        names: dict[str, str] = {}
        frontier: list[str] = []
        if self.r.group_source == "memberof":
            for raw in user.get("memberOf"):
                dn = _text(raw)
                if dn.lower() not in names:
                    names[dn.lower()] = first_rdn_value(dn)
                    frontier.append(dn)
        if self.r.group_source == "search" or self.r.in_chain:
            # The name as the entry spells it, not as typed: memberUid is case-exact where uid is
            # not, so "ALICE" found alice's entry and fewer of her groups, and that list was
            # cached for her (review of the LDAP plugin).
            spelt = user.login_name(self.r.username_attr, username)
            query = fill(self.r.group_filter, dn=user.dn, username=spelt if spelt is not None else username)
            for entry in self._search(link, query):
                if entry.dn.lower() not in names:
                    names[entry.dn.lower()] = self._name(entry)
                    frontier.append(entry.dn)
        complete = True
        if self.s.nested and not self.r.in_chain:
            complete = self._expand(link, frontier, names)
        groups = tuple(sorted(set(names.values())))
        if complete:
            self.cache.put(user.dn.lower(), groups)
        return groups

    def _expand(self, link: Link, frontier: list[str], names: dict[str, str]) -> bool:
        depth = 1
        while frontier:
            if depth >= self.s.max_depth or len(names) >= self.s.max_groups:
                if not self._warned_depth:
                    self._warned_depth = True
                    self.log.warning("group nesting deeper than max_depth=%d or more than max_groups=%d "
                                     "groups; the rest is not followed", self.s.max_depth, self.s.max_groups)
                return False
            found: list[str] = []
            for start in range(0, len(frontier), _CHUNK):
                chunk = frontier[start:start + _CHUNK]
                query = "(|" + "".join(fill(self.r.group_nested_filter, dn=dn, username="") for dn in chunk) + ")"
                for entry in self._search(link, query):
                    key = entry.dn.lower()
                    if key not in names:
                        names[key] = self._name(entry)
                        found.append(entry.dn)
            frontier = found
            depth += 1
        return True

    def _search(self, link: Link, query: str) -> list[Entry]:
        full = f"(&{self.r.group_object_filter}{query})"
        result, entries = link.search_pages(self.r.group_base, full, (self._name_attr,),
                                            page_size=self.s.page_size, limit=self.s.max_groups)
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"group search answered {result.code}: {result.message}")
        if not result.ok:
            self.log.warning("group search under %s answered %d (%s); groups may be incomplete",
                             self.r.group_base, result.code, result.message)
        return entries

    def _name(self, entry: Entry) -> str:
        values = entry.get(self._name_attr)
        return _text(values[0]) if values else first_rdn_value(entry.dn)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else value
