"""A small LDAP server that answers as Active Directory does where slapd cannot (tests only).

slapd binds DNs only. Active Directory also binds a userPrincipalName (``jdoe@corp.example.com``),
and a name of the form ``sAMAccountName@dns.domain`` when no account has that UPN (its "implicit
UPN"); its "Who am I?" (RFC 4532) names the bound identity ``u:CORP\\sAMAccountName``. The direct
bind tests need exactly that, and servers that page wrongly; every other LDAP test runs against
slapd. Answers are written with ldap3's pyasn1 definitions of RFC 4511; requests are read by
a small BER reader (pyasn1 0.6 cannot decode ldap3's definition of an ``and`` filter).

Runs in the test process, one thread per connection, on 127.0.0.1; :meth:`FakeAD.stop` closes
every socket. ``requests`` counts what was asked, by operation. :class:`DroppingAD` closes
connections after reading a bind, unanswered.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

from ldap3.protocol.rfc2696 import paged_search_control
from ldap3.protocol.rfc4511 import (
    LDAPMessage, BindResponse, Controls, ExtendedResponse, MessageID, PartialAttribute, PartialAttributeList,
    ProtocolOp, ResponseValue, ResultCode, SearchResultDone, SearchResultEntry, Vals,
)
from pyasn1.codec.ber import encoder

WHO_AM_I = "1.3.6.1.4.1.4203.1.11.3"
PAGED = "1.2.840.113556.1.4.319"
#: AD's answer to a wrong password (sub-code 52e).
WRONG_PASSWORD = "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563"


class FakeAD:
    """*users*: DN -> attributes (name -> list of str); ``password`` is the bind password and is
    never returned. *hidden*: DNs a user may not read, even their own entry. *who_am_i*:
    ``"u"`` (AD), ``"dn"``, ``"anonymous"`` (an empty authzId) or ``"unsupported"``.
    *group_pages*: how group searches page: ``None`` as asked (one page), ``"empty"`` an empty
    page with a new cookie forever, ``"slow"`` one new group per page after *page_delay* seconds,
    forever. *refuse*: DN -> an AD sub-code (``"533"`` disabled, ``"775"`` locked...) its bind is
    refused with (49) when the password is right, as AD refuses an account for its state; a
    wrong password is ``data 52e`` still. Tests may change it while the server runs."""

    def __init__(self, users: dict[str, dict[str, list[str]]], *, domain: str = "CORP",
                 dns_domain: str = "corp.example.com", hidden: set[str] = frozenset(), who_am_i: str = "u",
                 group_pages: str | None = None, page_delay: float = 0.2,
                 refuse: dict[str, str] | None = None) -> None:
        self.refuse: dict[str, str] = dict(refuse or {})
        self.users = {dn: {k.lower(): v for k, v in attrs.items()} for dn, attrs in users.items()}
        self.domain, self.dns_domain = domain, dns_domain
        self.hidden = {dn.lower() for dn in hidden}
        self.who_am_i = who_am_i
        self.group_pages, self.page_delay = group_pages, page_delay
        self.requests: collections.Counter = collections.Counter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"ldap://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                conn.close()

    # -- the directory's answers ------------------------------------------------------------------

    def _account(self, name: str) -> str | None:
        """The DN a bind name opens, as AD resolves it: a DN, an explicit UPN, then the implicit one."""
        lowered = name.lower()
        for dn, attrs in self.users.items():
            if dn.lower() == lowered or lowered in (v.lower() for v in attrs.get("userprincipalname", [])):
                return dn
        local, _, domain = lowered.rpartition("@")
        if domain == self.dns_domain:
            for dn, attrs in self.users.items():
                if local in (v.lower() for v in attrs.get("samaccountname", [])):
                    return dn
        return None

    def _matches(self, data: bytes, tag: int, start: int, end: int, attrs: dict[str, list[str]]) -> bool:
        if tag == 0xA0:  # and
            return all(self._matches(data, *child, attrs) for child in _children(data, start, end))
        if tag == 0xA1:  # or
            return any(self._matches(data, *child, attrs) for child in _children(data, start, end))
        if tag == 0xA2:  # not
            return not self._matches(data, *_children(data, start, end)[0], attrs)
        if tag == 0x87:  # present
            return data[start:end].decode().lower() in attrs
        parts = {t: data[a:b].decode() for t, a, b in _children(data, start, end)}
        if tag == 0xA3:  # equalityMatch: attribute, value
            name, value = [data[a:b].decode() for _, a, b in _children(data, start, end)]
        elif tag == 0xA9:  # extensibleMatch (AD's LDAP_MATCHING_RULE_IN_CHAIN, one level deep here)
            name, value = parts.get(0x82, ""), parts.get(0x83, "")
        else:
            return False
        return value.lower() in (v.lower() for v in attrs.get(name.lower(), []))

    def _search(self, bound: str | None, request: dict) -> tuple[list[tuple[str, dict]], int]:
        base = request["base"].lower()
        found = []
        for dn, attrs in self.users.items():
            lowered = dn.lower()
            if lowered in self.hidden or bound is None:
                continue
            if (lowered != base) if request["scope"] == 0 else not lowered.endswith(base):
                continue
            if self._matches(request["data"], *request["filter"], attrs):
                found.append((dn, attrs))
        limit = request["size_limit"]
        if limit and len(found) > limit:
            return found[:limit], 4
        return found, 0

    # -- the protocol ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _drops(self, kind: str, request: dict, seen: collections.Counter) -> bool:
        """Whether to close the connection instead of answering this request (*seen*: this
        connection's requests so far, this one included). Subclasses play servers that reset."""
        return False

    def _serve(self, conn: socket.socket) -> None:
        buffer, bound, pages = b"", None, 0
        seen: collections.Counter = collections.Counter()
        try:
            while True:
                size = _framed(buffer)
                if size is None:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                    continue
                mid, kind, request, paged = _read(buffer[:size])
                buffer = buffer[size:]
                self.requests[kind] += 1
                seen[kind] += 1
                if kind == "unbindRequest" or self._drops(kind, request, seen):
                    return
                if kind == "bindRequest":
                    dn = self._account(request["name"])
                    right = (dn is not None and request["password"]
                             and request["password"] in self.users[dn].get("password", []))
                    if right and dn in self.refuse:
                        bound = None
                        refused = WRONG_PASSWORD.replace("data 52e", f"data {self.refuse[dn]}")
                        conn.sendall(_answer(mid, "bindResponse", _result(BindResponse(), 49, refused)))
                    elif right:
                        bound = dn
                        conn.sendall(_answer(mid, "bindResponse", _result(BindResponse(), 0)))
                    else:
                        bound = None
                        conn.sendall(_answer(mid, "bindResponse", _result(BindResponse(), 49, WRONG_PASSWORD)))
                elif kind == "extendedReq" and request["oid"] == WHO_AM_I:
                    conn.sendall(_answer(mid, "extendedResp", self._who(bound)))
                elif kind == "searchRequest":
                    if paged and self.group_pages and "group" in request["data"].lower().decode(errors="replace"):
                        pages += 1
                        if self.group_pages == "slow":
                            time.sleep(self.page_delay)
                            group = {"cn": [f"group{pages}"], "objectclass": ["group"]}
                            conn.sendall(_answer(mid, "searchResEntry", _entry(f"CN=group{pages}", group, set())))
                        conn.sendall(_answer(mid, "searchResDone", _result(SearchResultDone(), 0),
                                             cookie=b"page-%d" % pages))
                        continue
                    found, code = self._search(bound, request)
                    for dn, attrs in found:
                        conn.sendall(_answer(mid, "searchResEntry", _entry(dn, attrs, request["attributes"])))
                    conn.sendall(_answer(mid, "searchResDone", _result(SearchResultDone(), code),
                                         cookie=b"" if paged else None))
                else:
                    conn.sendall(_answer(mid, "extendedResp", _result(ExtendedResponse(), 2, "unsupported")))
        except OSError:
            return
        finally:
            conn.close()

    def _who(self, bound: str | None) -> ExtendedResponse:
        if self.who_am_i == "unsupported":
            return _result(ExtendedResponse(), 2, "unsupported extended operation")
        response = _result(ExtendedResponse(), 0)
        if bound is None or self.who_am_i == "anonymous":
            authz = ""
        elif self.who_am_i == "dn":
            authz = f"dn:{bound}"
        else:
            authz = f"u:{self.domain}\\{self.users[bound]['samaccountname'][0]}"
        response["responseValue"] = ResponseValue(authz.encode())
        return response


class DroppingAD(FakeAD):
    """A FakeAD that reads the *drop_at*-th bind of each connection, then closes the connection
    without answering it, as a domain controller or a load balancer that resets a connection
    after the password was checked. ``binds`` counts the binds read, by bind name, those
    dropped included (what AD would count against the account)."""

    def __init__(self, users: dict[str, dict[str, list[str]]], *, drop_at: int, **kwargs) -> None:
        self.drop_at = drop_at
        self.binds: collections.Counter = collections.Counter()
        self.dropped = 0
        super().__init__(users, **kwargs)

    def _drops(self, kind: str, request: dict, seen: collections.Counter) -> bool:
        if kind != "bindRequest":
            return False
        with self._lock:
            self.binds[request["name"].lower()] += 1
            if seen[kind] != self.drop_at:
                return False
            self.dropped += 1
        return True


def _framed(buffer: bytes) -> int | None:
    """The size of the whole message at the start of *buffer*, or None until it has all come."""
    if len(buffer) < 2:
        return None
    if buffer[1] < 0x80:
        size = 2 + buffer[1]
    else:
        count = buffer[1] & 0x7F
        if len(buffer) < 2 + count:
            return None
        size = 2 + count + int.from_bytes(buffer[2:2 + count], "big")
    return size if len(buffer) >= size else None


def _result(op, code: int, message: str = ""):
    op["resultCode"] = ResultCode(code)
    op["matchedDN"] = ""
    op["diagnosticMessage"] = message
    return op


def _entry(dn: str, attrs: dict[str, list[str]], wanted: set[str]) -> SearchResultEntry:
    entry = SearchResultEntry()
    entry["object"] = dn
    attributes = PartialAttributeList()
    for name, values in attrs.items():
        if name == "password" or (wanted and name not in wanted):
            continue
        attribute = PartialAttribute()
        attribute["type"] = name
        vals = Vals()
        for i, value in enumerate(values):
            vals.setComponentByPosition(i, value.encode())
        attribute["vals"] = vals
        attributes.setComponentByPosition(len(attributes), attribute)
    entry["attributes"] = attributes
    return entry


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the BER element at *pos*."""
    first = data[pos + 1]
    if first < 0x80:
        return data[pos], pos + 2, pos + 2 + first
    count = first & 0x7F
    start = pos + 2 + count
    return data[pos], start, start + int.from_bytes(data[pos + 2:start], "big")


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    found = []
    while start < end:
        found.append(_tlv(data, start))
        start = found[-1][2]
    return found


def _read(data: bytes) -> tuple[int, str, dict, bool]:
    """(message id, operation, its fields, paged?) of one request. Read by hand: pyasn1 0.6
    cannot decode ldap3's definition of an ``and`` filter."""
    _, start, end = _tlv(data, 0)
    parts = _children(data, start, end)
    mid = int.from_bytes(data[parts[0][1]:parts[0][2]], "big")
    tag, start, end = parts[1]
    fields = _children(data, start, end) if tag & 0x20 else []
    paged = any(data[a:b] == PAGED.encode() for t, s, e in parts[2:] if t == 0xA0
                for _, cs, ce in _children(data, s, e) for _, a, b in _children(data, cs, ce)[:1])
    text = lambda i: data[fields[i][1]:fields[i][2]].decode()  # noqa: E731
    if tag == 0x60:
        return mid, "bindRequest", {"name": text(1), "password": text(2)}, paged
    if tag == 0x42:
        return mid, "unbindRequest", {}, paged
    if tag == 0x77:
        return mid, "extendedReq", {"oid": text(0)}, paged
    if tag == 0x63:
        names = {data[a:b].decode().lower() for _, a, b in _children(data, fields[7][1], fields[7][2])}
        return mid, "searchRequest", {
            "base": text(0), "scope": int.from_bytes(data[fields[1][1]:fields[1][2]], "big"),
            "size_limit": int.from_bytes(data[fields[3][1]:fields[3][2]], "big"), "filter": fields[6],
            "data": data, "attributes": names - {"1.1"}}, paged
    return mid, f"operation {tag:#x}", {}, paged


def _answer(mid: int, name: str, op, *, cookie: bytes | None = None) -> bytes:
    message = LDAPMessage()
    message["messageID"] = MessageID(mid)
    message["protocolOp"] = ProtocolOp().setComponentByName(name, op)
    if cookie is not None:
        controls = Controls()
        controls.setComponentByPosition(0, paged_search_control(False, 0, cookie))
        message["controls"] = controls
    return encoder.encode(message)
