"""The two LDAP operations of the hot path, encoded and decoded directly (RFC 4511 section 5.1 BER).

Why: a login is one search and one bind. Through ldap3's generic machinery (pyasn1 encoding,
request dictionaries, result copies) those cost about a millisecond of CPU per login, several
times the gateway's own work; written out here they cost a few dozen microseconds. ldap3 still
opens every connection (TCP, LDAPS, StartTLS and certificate verification) and closes it; only
BindRequest/SearchRequest and their responses go through this module.

What is covered, and nothing more: simple BindRequest with the Password Policy request control
(draft-behera-ldap-password-policy-10 section 6), SearchRequest with the RFC 2696 paged results
control, string filters (RFC 4515) of every kind, and the responses to them
(BindResponse and its password policy response control, SearchResultEntry,
SearchResultReference, SearchResultDone), plus the Notice of Disconnection (RFC 4511 section
4.4.1). LDAP allows only definite lengths (section 5.1).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["FilterError", "PasswordPolicy", "ProtocolError", "Reader", "bind_request", "compile_filter",
           "paged_cookie", "parse_entry", "parse_result", "password_policy", "search_request"]

PAGED_OID = b"1.2.840.113556.1.4.319"
PPOLICY_OID = b"1.3.6.1.4.1.42.2.27.8.5.1"
WHO_AM_I_OID = b"1.3.6.1.4.1.4203.1.11.3"  # RFC 4532
#: The largest message the reader buffers: a user entry with its groups is kilobytes; a server
#: announcing more is broken or hostile, and must not make the gateway allocate gigabytes.
MAX_MESSAGE = 16 * 1024 * 1024
#: The most attributes and values one entry may carry, together. Each costs Python work: a 16 MB
#: entry of 8 million empty values held the worker's event loop 2 s (and 170 MB) to decode, per
#: entry (review of the LDAP plugin). A user's entry has dozens; AD sends at most 1,500 values
#: of an attribute at once (MaxValRange: ranged retrieval).
MAX_ENTRY_VALUES = 100_000
SCOPES = {"base": 0, "one": 1, "subtree": 2}

# protocolOp tags (RFC 4511 section 4.2 ff.), [APPLICATION n]
BIND_RESPONSE = 0x61
SEARCH_ENTRY = 0x64
SEARCH_DONE = 0x65
SEARCH_REFERENCE = 0x73
EXTENDED_RESPONSE = 0x78


class FilterError(ValueError):
    """A string filter that RFC 4515 does not allow."""


class ProtocolError(Exception):
    """The server sent something this module cannot read, or disconnected."""


# -- BER encoding ----------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:  # the short form, as most elements of a login's requests are
        return bytes((tag, n)) + content
    return bytes((tag,)) + _length(n) + content


#: The password policy request control: controlType only, criticality FALSE (the default, so left
#: out) and no value. Non-critical: a server without the overlay ignores it (RFC 4511 4.1.11).
_PPOLICY_REQUEST = _tlv(0x30, _tlv(0x04, PPOLICY_OID))


def _int(tag: int, value: int) -> bytes:
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    return _tlv(0x30, _int(0x02, message_id) + op + (_tlv(0xA0, controls) if controls else b""))


#: The password policy request control in its ``[0] Controls`` wrapper, as every bind sends it.
_PPOLICY_CONTROLS = _tlv(0xA0, _PPOLICY_REQUEST)


def bind_request(message_id: int, dn: str, password: str, *, ppolicy: bool = True) -> bytes:
    """BindRequest, LDAPv3, simple authentication (RFC 4511 section 4.2), asking for the
    password policy response control (OpenLDAP's ppolicy says why it refused in it)."""
    body = b"\x02\x01\x03" + _tlv(0x04, dn.encode("utf-8")) + _tlv(0x80, password.encode("utf-8"))
    return _tlv(0x30, _int(0x02, message_id) + _tlv(0x60, body) + (_PPOLICY_CONTROLS if ppolicy else b""))


def extended_request(message_id: int, oid: bytes) -> bytes:
    """ExtendedRequest (RFC 4511 section 4.12) without a value, as "Who am I?" is."""
    return _message(message_id, _tlv(0x77, _tlv(0x80, oid)))


@functools.lru_cache(maxsize=64)
def _selection(attributes: tuple[str, ...]) -> bytes:
    """The attribute selection of a search, encoded once per list: a directory asks for the same
    few lists on every login (about 20 names, as many encodings and TLVs, each login before)."""
    # no attribute wanted: the special name "1.1" (RFC 4511 section 4.5.1.8)
    return _tlv(0x30, b"".join(_tlv(0x04, a.encode("ascii")) for a in attributes) if attributes
                else b"\x04\x031.1")


@functools.lru_cache(maxsize=64)
def _search_head(base: str, scope: str, size_limit: int) -> bytes:
    """What a SearchRequest holds before its filter: the base, the scope, aliases never
    dereferenced, the size limit, no time limit, types and values. A login's user search asks
    the same each time (five TLVs a login before); base reads of other entries are few."""
    return (_tlv(0x04, base.encode("utf-8")) + _int(0x0A, SCOPES[scope]) + b"\x0a\x01\x00"
            + _int(0x02, size_limit) + b"\x02\x01\x00" + b"\x01\x01\x00")


def search_request(message_id: int, base: str, scope: str, filter_ber: bytes, attributes: Sequence[str],
                   size_limit: int = 0, paged_size: int | None = None, cookie: bytes = b"") -> bytes:
    """SearchRequest (RFC 4511 section 4.5.1), aliases never dereferenced, no time limit.
    *attributes* are names (ASCII, RFC 4512 section 2.5)."""
    body = _search_head(base, scope, size_limit) + filter_ber + _selection(tuple(attributes))
    controls = b""
    if paged_size:
        value = _tlv(0x30, _int(0x02, paged_size) + _tlv(0x04, cookie))
        controls = _tlv(0x30, _tlv(0x04, PAGED_OID) + _tlv(0x04, value))
    return _message(message_id, _tlv(0x63, body), controls)


# -- RFC 4515 string filters to BER (RFC 4511 section 4.5.1.7) -----------------------------------


def compile_filter(text: str) -> bytes:
    """Parse a string filter and return its BER encoding; raises :class:`FilterError`."""
    try:
        ber, end = _filter(text, 0)
    except RecursionError:  # nested deeper than Python recurses: a FilterError, as callers catch
        raise FilterError("filter nested too deeply") from None
    if end != len(text):
        raise FilterError(f"text after the filter at offset {end}")
    return ber


def _filter(text: str, pos: int) -> tuple[bytes, int]:
    if pos >= len(text) or text[pos] != "(":
        raise FilterError(f"'(' expected at offset {pos}")
    pos += 1
    if pos >= len(text):
        raise FilterError("unterminated filter")
    kind = text[pos]
    if kind in "&|":
        pos += 1
        parts = []
        while pos < len(text) and text[pos] == "(":
            part, pos = _filter(text, pos)
            parts.append(part)
        if not parts:
            raise FilterError("an AND/OR needs at least one filter")  # RFC 4526 absolute true/false: not used
        ber = _tlv(0xA0 if kind == "&" else 0xA1, b"".join(parts))
    elif kind == "!":
        inner, pos = _filter(text, pos + 1)
        ber = _tlv(0xA2, inner)
    else:
        end = text.find(")", pos)
        if end < 0:
            raise FilterError("unterminated filter")
        ber = _item(text[pos:end])
        pos = end
    if pos >= len(text) or text[pos] != ")":
        raise FilterError(f"')' expected at offset {pos}")
    return ber, pos + 1


def _item(item: str) -> bytes:
    eq = item.find("=")
    if eq <= 0:
        raise FilterError(f"no attribute and '=' in {item!r}")
    op = item[eq - 1]
    value = item[eq + 1:]
    if op in "<>~":
        attr = item[:eq - 1]
        _check_attr(attr)
        tag = {">": 0xA5, "<": 0xA6, "~": 0xA8}[op]
        return _tlv(tag, _tlv(0x04, attr.encode()) + _tlv(0x04, _unescape(value)))
    if op == ":":
        return _extensible(item[:eq - 1], value)
    attr = item[:eq]
    _check_attr(attr)
    if value == "*":
        return _tlv(0x87, attr.encode())
    if "*" in value:
        pieces = value.split("*")
        subs = b""
        if pieces[0]:
            subs += _tlv(0x80, _unescape(pieces[0]))
        for middle in pieces[1:-1]:
            if not middle:
                raise FilterError(f"empty substring in {item!r}")
            subs += _tlv(0x81, _unescape(middle))
        if pieces[-1]:
            subs += _tlv(0x82, _unescape(pieces[-1]))
        return _tlv(0xA4, _tlv(0x04, attr.encode()) + _tlv(0x30, subs))
    return _tlv(0xA3, _tlv(0x04, attr.encode()) + _tlv(0x04, _unescape(value)))


def _extensible(left: str, value: str) -> bytes:
    # attr[:dn][:rule]:=value  or  [:dn]:rule:=value
    parts = left.split(":")
    attr, rest = parts[0], parts[1:]
    dn_attrs = False
    if rest and rest[0].lower() == "dn":
        dn_attrs, rest = True, rest[1:]
    rule = rest[0] if rest else ""
    if len(rest) > 1 or (not attr and not rule):
        raise FilterError(f"bad extensible match {left!r}")
    if attr:
        _check_attr(attr)
    if rule:
        _check_attr(rule)
    body = (_tlv(0x81, rule.encode()) if rule else b"") + (_tlv(0x82, attr.encode()) if attr else b"")
    body += _tlv(0x83, _unescape(value)) + (b"\x84\x01\xff" if dn_attrs else b"")
    return _tlv(0xA9, body)


#: RFC 4512 section 2.5: descr or numericoid, plus options (";lang-en"), loosely: the letters,
#: digits and punctuation they are made of (ASCII only: the server judges the rest).
_ATTRIBUTE_DESCRIPTION = re.compile(r"[A-Za-z0-9.;-]+")


def _check_attr(attr: str) -> None:
    if _ATTRIBUTE_DESCRIPTION.fullmatch(attr) is None:
        raise FilterError(f"bad attribute description {attr!r}")


def _unescape(value: str) -> bytes:
    """An assertion value's octets: ``\\XX`` pairs decoded, the rest UTF-8 (RFC 4515 section 3)."""
    if "(" in value or ")" in value or "*" in value:
        raise FilterError(f"unescaped special character in value {value!r}")
    if "\\" not in value:
        return value.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            pair = value[i + 1:i + 3]
            if len(pair) != 2:
                raise FilterError(f"a backslash must start two hex digits in {value!r}")
            try:
                out.append(int(pair, 16))
            except ValueError:
                raise FilterError(f"a backslash must start two hex digits in {value!r}") from None
            i += 3
        else:
            out += ch.encode("utf-8")
            i += 1
    return bytes(out)


# -- BER decoding ------------------------------------------------------------------------------------


def _header(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at *pos*."""
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ProtocolError("indefinite or oversized BER length")
    length = int.from_bytes(data[pos + 2:pos + 2 + count], "big")
    start = pos + 2 + count
    return tag, start, start + length


def parse_result(body: bytes) -> tuple[int, str]:
    """(resultCode, diagnosticMessage) of an LDAPResult body (RFC 4511 section 4.1.9)."""
    # _header's short form inlined for the three elements (two results a login); the long
    # form (a diagnostic message of 128 bytes or more) goes through _header, as before.
    tag, first = body[0], body[1]
    if first < 0x80:
        start, end = 2, 2 + first
    else:
        tag, start, end = _header(body, 0)
    if tag != 0x0A:
        raise ProtocolError("LDAPResult without a resultCode")
    code = int.from_bytes(body[start:end], "big")
    first = body[end + 1]                       # matchedDN
    end = end + 2 + first if first < 0x80 else _header(body, end)[2]
    first = body[end + 1]                       # diagnosticMessage
    if first < 0x80:
        start, end = end + 2, end + 2 + first
    else:
        _, start, end = _header(body, end)
    return code, bytes(body[start:end]).decode("utf-8", errors="replace")


def parse_extended(body: bytes) -> tuple[int, str, bytes | None]:
    """(resultCode, diagnosticMessage, responseValue or None) of an ExtendedResponse body (RFC
    4511 section 4.12)."""
    elements = list(_elements(body, 0, len(body)))
    if len(elements) < 3 or elements[0][0] != 0x0A:
        raise ProtocolError("ExtendedResponse without an LDAPResult")
    _, start, end = elements[0]
    code = int.from_bytes(body[start:end], "big")
    _, start, end = elements[2]
    message = bytes(body[start:end]).decode("utf-8", errors="replace")
    values = [bytes(body[start:end]) for tag, start, end in elements[3:] if tag == 0x8B]
    if len(values) > 1:
        raise ProtocolError("ExtendedResponse with two values")
    return code, message, values[0] if values else None


def parse_entry(body: bytes) -> tuple[str, dict[str, list[bytes]]]:
    """(DN, attributes) of a SearchResultEntry body (RFC 4511 section 4.5.2)."""
    _, start, end = _header(body, 0)
    dn = bytes(body[start:end]).decode("utf-8", errors="replace")
    _, pos, stop = _header(body, end)
    attributes: dict[str, list[bytes]] = {}
    budget = MAX_ENTRY_VALUES
    while pos < stop:
        # _header inlined for the short form, as most attributes' elements are (a login reads a
        # dozen): the attribute's SEQUENCE, its type, its SET of values; the long form as before.
        length = body[pos + 1]
        if length < 0x80:
            a_start = pos + 2
            a_end = a_start + length
        else:
            _, a_start, a_end = _header(body, pos)
        length = body[a_start + 1]
        if length < 0x80:
            t_start = a_start + 2
            t_end = t_start + length
        else:
            _, t_start, t_end = _header(body, a_start)
        name = bytes(body[t_start:t_end]).decode("ascii", errors="replace")
        length = body[t_end + 1]
        if length < 0x80:
            v_pos = t_end + 2
            v_end = v_pos + length
        else:
            _, v_pos, v_end = _header(body, t_end)
        # Each element inside its container: values that ran on over the next attributes would be
        # read again as values of each of them (n attributes in O(n) bytes, O(n^2) values).
        if not v_end <= a_end <= stop:
            raise ProtocolError("attribute overruns its container")
        values = []
        budget -= 1  # the attribute itself
        if budget < 0:
            raise ProtocolError(f"an entry with more than {MAX_ENTRY_VALUES} attributes and values")
        while v_pos < v_end:
            if len(values) >= budget:
                raise ProtocolError(f"an entry with more than {MAX_ENTRY_VALUES} attributes and values")
            length = body[v_pos + 1]
            if length < 0x80:  # the short form, as most values are: _header inlined (a login reads a dozen)
                v_pos += 2
                values.append(bytes(body[v_pos:v_pos + length]))
                v_pos += length
            else:
                _, v_start, v_pos = _header(body, v_pos)
                values.append(bytes(body[v_start:v_pos]))
        if v_pos > v_end:
            raise ProtocolError("value overruns its attribute")
        budget -= len(values)
        attributes[name] = values
        pos = a_end
    return dn, attributes


def paged_cookie(controls: bytes) -> bytes | None:
    """The cookie of a paged results response control, if present and not empty."""
    pos = 0
    while pos < len(controls):
        _, c_start, c_end = _header(controls, pos)
        _, o_start, o_end = _header(controls, c_start)
        if bytes(controls[o_start:o_end]) == PAGED_OID:
            at = o_end
            while at < c_end:
                tag, v_start, v_end = _header(controls, at)
                if tag == 0x04:  # controlValue: SEQUENCE { size INTEGER, cookie OCTET STRING }
                    _, s_start, _ = _header(controls, v_start)
                    _, size_start, size_end = _header(controls, s_start)
                    _, k_start, k_end = _header(controls, size_end)
                    return bytes(controls[k_start:k_end]) or None
                at = v_end
        pos = c_end
    return None


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    """A password policy response control (draft-behera-ldap-password-policy-10 section 6.2).

    ``error``: passwordExpired (0), accountLocked (1), changeAfterReset (2), or the password
    change errors (3-8) that a bind does not produce; ``None`` when the server sent none.
    """

    error: int | None = None
    time_before_expiration: int | None = None
    grace_authns_remaining: int | None = None


def _elements(data: bytes, pos: int, stop: int):
    """(tag, start, end) of each element from *pos* to *stop*, every length checked to fit."""
    while pos < stop:
        if stop - pos < 2:
            raise ProtocolError("truncated element")
        tag, start, end = _header(data, pos)
        if tag & 0x1F == 0x1F or end > stop:  # multi-byte tags are not LDAP's; overruns are lies
            raise ProtocolError("element overruns its container")
        yield tag, start, end
        pos = end


def _small_int(data: bytes, start: int, end: int) -> int:
    """A non-negative INTEGER or ENUMERATED of at most four octets (the draft's maxInt)."""
    if not 0 < end - start <= 4 or data[start] & 0x80:
        raise ProtocolError("integer out of range")
    return int.from_bytes(data[start:end], "big")


def password_policy(controls: bytes) -> PasswordPolicy | None:
    """The password policy response control in a response's controls; ``None`` when absent,
    repeated or malformed in any way: a control only ever refines a refusal, so one that cannot
    be read must count as not sent (never an exception, never a guess)."""
    try:
        found = None
        for _, c_start, c_end in _elements(controls, 0, len(controls)):
            parts = list(_elements(controls, c_start, c_end))
            if not parts or parts[0][0] != 0x04 or controls[parts[0][1]:parts[0][2]] != PPOLICY_OID:
                continue
            if found is not None:
                return None  # two answers to one question: believe neither
            if any(tag not in (0x01, 0x04) for tag, _, _ in parts[1:]):  # criticality, controlValue
                return None
            values = [p for p in parts[1:] if p[0] == 0x04]
            if len(values) != 1:
                return None
            (tag, s_start, s_end), = _elements(controls, values[0][1], values[0][2])  # one SEQUENCE
            if tag != 0x30:
                return None
            found, order = PasswordPolicy(), 0  # warning [0] then error [1], each at most once
            for tag, start, end in _elements(controls, s_start, s_end):
                if tag == 0xA0 and order < 1:  # warning: CHOICE { timeBefore [0], grace [1] }
                    (w_tag, w_start, w_end), = _elements(controls, start, end)
                    if w_tag not in (0x80, 0x81):
                        return None
                    value = _small_int(controls, w_start, w_end)
                    found = PasswordPolicy(None, value if w_tag == 0x80 else None, value if w_tag == 0x81 else None)
                    order = 1
                elif tag == 0x81 and order < 2:  # error ENUMERATED
                    found = PasswordPolicy(_small_int(controls, start, end), found.time_before_expiration,
                                           found.grace_authns_remaining)
                    order = 2
                else:
                    return None
        return found
    except (ProtocolError, IndexError, ValueError, TypeError):
        return None


class Reader:
    """Splits the byte stream of one connection into LDAP messages. *source* is anything with
    a socket's ``recv(size)`` (a socket, or a :class:`~gateway.plugins.ldap.link.Link`)."""

    __slots__ = ("sock", "buffer")

    def __init__(self, source) -> None:
        self.sock = source
        self.buffer = bytearray()

    def message(self) -> tuple[int, int, bytes, bytes]:
        """The next message: (messageID, protocolOp tag, protocolOp body, controls)."""
        buffer = self.buffer
        while True:
            if len(buffer) >= 2:
                first = buffer[1]
                need = 2 + (first if first < 0x80 else (first & 0x7F))
                if len(buffer) >= need:
                    if first < 0x80:  # _header's short form, inlined (a login reads three messages)
                        tag, start, end = buffer[0], 2, need
                    else:
                        tag, start, end = _header(buffer, 0)
                    if tag != 0x30:
                        raise ProtocolError("an LDAPMessage is a SEQUENCE")
                    if end > MAX_MESSAGE:
                        raise ProtocolError(f"a message of {end} bytes is over the {MAX_MESSAGE} limit")
                    if len(buffer) >= end:
                        data = bytes(buffer[start:end])
                        del buffer[:end]
                        return self._split(data)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("the server closed the connection")
            buffer += chunk

    @staticmethod
    def _split(data: bytes) -> tuple[int, int, bytes, bytes]:
        # _header's short form inlined for the messageID and the protocolOp; the long form (a
        # protocolOp of 128 bytes or more: most entries) and the controls through _header.
        tag, first = data[0], data[1]
        if first < 0x80:
            start, end = 2, 2 + first
        else:
            tag, start, end = _header(data, 0)
        if tag != 0x02:
            raise ProtocolError("an LDAPMessage starts with its messageID")
        message_id = int.from_bytes(data[start:end], "big", signed=True)
        op_tag, first = data[end], data[end + 1]
        if first < 0x80:
            op_start, op_end = end + 2, end + 2 + first
        else:
            op_tag, op_start, op_end = _header(data, end)
        controls = b""
        if op_end < len(data):
            c_tag, c_start, c_end = _header(data, op_end)
            if c_tag == 0xA0:
                controls = data[c_start:c_end]
        return message_id, op_tag, data[op_start:op_end], controls
