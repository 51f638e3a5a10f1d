"""The LDAP wire code's fast paths (issue 15) answer exactly as the plain code they replaced.

``parse_result``, ``parse_entry`` and ``Reader`` read short BER lengths inline instead of calling
``_header`` for each element, and ``bind_request``/``search_request`` reuse encoded parts. Each
is checked here against the element-by-element reference it replaced (kept below, as it was):
byte-identical requests, and for answers, valid or mutated at random, the same result or the same
kind of error (callers turn ProtocolError, IndexError and ValueError alike into a broken link).
"""

from __future__ import annotations

import random

import pytest

from gateway.plugins.ldap import wire
from gateway.plugins.ldap.wire import MAX_ENTRY_VALUES, ProtocolError, _header, _int, _tlv

# -- the reference: the code before the fast paths -------------------------------------------------


def ref_message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    return _tlv(0x30, _int(0x02, message_id) + op + (_tlv(0xA0, controls) if controls else b""))


def ref_bind_request(message_id: int, dn: str, password: str, *, ppolicy: bool = True) -> bytes:
    body = b"\x02\x01\x03" + _tlv(0x04, dn.encode("utf-8")) + _tlv(0x80, password.encode("utf-8"))
    return ref_message(message_id, _tlv(0x60, body), wire._PPOLICY_REQUEST if ppolicy else b"")


def ref_search_request(message_id, base, scope, filter_ber, attributes, size_limit=0, paged_size=None, cookie=b""):
    selection = _tlv(0x30, b"".join(_tlv(0x04, a.encode("ascii")) for a in attributes) if attributes
                     else b"\x04\x031.1")
    body = (_tlv(0x04, base.encode("utf-8")) + _int(0x0A, wire.SCOPES[scope]) + b"\x0a\x01\x00"
            + _int(0x02, size_limit) + b"\x02\x01\x00" + b"\x01\x01\x00" + filter_ber + selection)
    controls = b""
    if paged_size:
        value = _tlv(0x30, _int(0x02, paged_size) + _tlv(0x04, cookie))
        controls = _tlv(0x30, _tlv(0x04, wire.PAGED_OID) + _tlv(0x04, value))
    return ref_message(message_id, _tlv(0x63, body), controls)


def ref_parse_result(body: bytes) -> tuple[int, str]:
    tag, start, end = _header(body, 0)
    if tag != 0x0A:
        raise ProtocolError("LDAPResult without a resultCode")
    code = int.from_bytes(body[start:end], "big")
    _, start, end = _header(body, end)
    _, start, end = _header(body, end)
    return code, bytes(body[start:end]).decode("utf-8", errors="replace")


def ref_parse_entry(body: bytes):
    _, start, end = _header(body, 0)
    dn = bytes(body[start:end]).decode("utf-8", errors="replace")
    _, pos, stop = _header(body, end)
    attributes = {}
    budget = MAX_ENTRY_VALUES
    while pos < stop:
        _, a_start, a_end = _header(body, pos)
        _, t_start, t_end = _header(body, a_start)
        name = bytes(body[t_start:t_end]).decode("ascii", errors="replace")
        _, v_pos, v_end = _header(body, t_end)
        if not v_end <= a_end <= stop:
            raise ProtocolError("attribute overruns its container")
        values = []
        budget -= 1
        if budget < 0:
            raise ProtocolError("too many")
        while v_pos < v_end:
            if len(values) >= budget:
                raise ProtocolError("too many")
            _, v_start, v_pos = _header(body, v_pos)
            values.append(bytes(body[v_start:v_pos]))
        if v_pos > v_end:
            raise ProtocolError("value overruns its attribute")
        budget -= len(values)
        attributes[name] = values
        pos = a_end
    return dn, attributes


def ref_split(data: bytes):
    tag, start, end = _header(data, 0)
    if tag != 0x02:
        raise ProtocolError("an LDAPMessage starts with its messageID")
    message_id = int.from_bytes(data[start:end], "big", signed=True)
    op_tag, op_start, op_end = _header(data, end)
    controls = b""
    if op_end < len(data):
        c_tag, c_start, c_end = _header(data, op_end)
        if c_tag == 0xA0:
            controls = data[c_start:c_end]
    return message_id, op_tag, data[op_start:op_end], controls


class Chunks:
    """A socket stand-in that hands out *data* in the given chunk sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes

    def recv(self, size: int) -> bytes:
        n = self.sizes.pop(0) if self.sizes else len(self.data)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def ref_messages(data: bytes, sizes: list[int]) -> list:
    """The reference Reader: the same buffering, _header for the message and ref_split."""
    source, buffer, out = Chunks(data, list(sizes)), bytearray(), []
    while True:
        if len(buffer) >= 2:
            first = buffer[1]
            need = 2 + (first if first < 0x80 else (first & 0x7F))
            if len(buffer) >= need:
                tag, start, end = _header(buffer, 0)
                if tag != 0x30:
                    raise ProtocolError("an LDAPMessage is a SEQUENCE")
                if end > wire.MAX_MESSAGE:
                    raise ProtocolError("over the limit")
                if len(buffer) >= end:
                    message = bytes(buffer[start:end])
                    del buffer[:end]
                    out.append(ref_split(message))
                    continue
        chunk = source.recv(65536)
        if not chunk:
            return out
        buffer += chunk


def new_messages(data: bytes, sizes: list[int]) -> list:
    reader, out = wire.Reader(Chunks(data, list(sizes))), []
    while True:
        try:
            out.append(reader.message())
        except ProtocolError as exc:
            if "closed the connection" in str(exc):
                return out
            raise


def outcome(fn, *args):
    """What *fn* answers, or the kind of error it raises (the callers' three are one to them)."""
    try:
        return ("ok", fn(*args))
    except (ProtocolError, IndexError, ValueError):
        return ("error",)


# -- samples ---------------------------------------------------------------------------------------


def entry_body(dn: str, attributes: dict[str, list[bytes]]) -> bytes:
    parts = b"".join(_tlv(0x30, _tlv(0x04, name.encode()) + _tlv(0x31, b"".join(_tlv(0x04, v) for v in values)))
                     for name, values in attributes.items())
    return _tlv(0x04, dn.encode()) + _tlv(0x30, parts)


def result_body(code: int, matched: str, message: str) -> bytes:
    return _int(0x0A, code) + _tlv(0x04, matched.encode()) + _tlv(0x04, message.encode())


ENTRIES = [
    entry_body("uid=user0001,ou=people,dc=example,dc=com",
               {"uid": [b"user0001"], "cn": [b"user0001"], "mail": [b"user0001@example.com"],
                "memberOf": [b"cn=group1,ou=groups,dc=example,dc=com"]}),
    entry_body("cn=a", {}),
    entry_body("cn=long," + "x" * 300, {"description": [b"d" * 200, b""], "a" * 130: [b"v"],
                                       "member": [b"cn=%d" % i for i in range(40)]}),
    entry_body("cn=empty values", {"x": [], "y": [b""]}),
]
RESULTS = [result_body(0, "", ""), result_body(49, "", "80090308: LdapErr: DSID-0C09042A, data 52e"),
           result_body(32, "dc=example,dc=com", "m" * 200), result_body(4, "x" * 150, "")]


def mutants(sample: bytes, rng: random.Random, count: int):
    yield sample
    for _ in range(count):
        data = bytearray(sample)
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.5 and data:
                data[rng.randrange(len(data))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x84, 0x85, 0xFF,
                                                             rng.randrange(256)])
            elif kind < 0.8 and data:
                del data[rng.randrange(len(data)):]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        yield bytes(data)


# -- the checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dn,password", [("uid=user0001,ou=people,dc=example,dc=com", "pw-0001-secret"),
                                         ("", "x"), ("cn=" + "é" * 100, "p" * 300)])
@pytest.mark.parametrize("message_id", [1, 127, 128, 1000, 0x7FFFFFFF])
def test_a_bind_request_is_the_same_bytes(dn, password, message_id):
    assert wire.bind_request(message_id, dn, password) == ref_bind_request(message_id, dn, password)
    assert wire.bind_request(message_id, dn, password, ppolicy=False) == ref_bind_request(message_id, dn, password,
                                                                                          ppolicy=False)


@pytest.mark.parametrize("base", ["dc=example,dc=com", "", "cn=" + "x" * 200])
@pytest.mark.parametrize("scope", ["base", "one", "subtree"])
@pytest.mark.parametrize("size_limit,paged", [(0, None), (2, None), (1000, 500), (0, 200)])
def test_a_search_request_is_the_same_bytes(base, scope, size_limit, paged):
    filter_ber = wire.compile_filter("(&(objectClass=inetOrgPerson)(uid=user0001))")
    for attributes in (["uid", "cn", "memberOf"], (), ("x" * 150,), ["uid"] * 30):
        for cookie in (b"", b"c" * 10):
            assert (wire.search_request(1001, base, scope, filter_ber, attributes, size_limit, paged, cookie)
                    == ref_search_request(1001, base, scope, filter_ber, attributes, size_limit, paged, cookie))
    with pytest.raises(KeyError):  # an unknown scope is refused as before
        wire.search_request(1, base, "sub", filter_ber, [], size_limit)


def test_results_parse_as_before_valid_or_mutated():
    rng = random.Random(15)
    for sample in RESULTS:
        for data in mutants(sample, rng, 400):
            assert outcome(wire.parse_result, data) == outcome(ref_parse_result, data), data


def test_entries_parse_as_before_valid_or_mutated():
    rng = random.Random(16)
    for sample in ENTRIES:
        assert wire.parse_entry(sample) == ref_parse_entry(sample)
        for data in mutants(sample, rng, 400):
            assert outcome(wire.parse_entry, data) == outcome(ref_parse_entry, data), data


def test_the_reader_splits_messages_as_before_valid_or_mutated():
    rng = random.Random(17)
    entry, done = ENTRIES[0], RESULTS[0]
    paged = _tlv(0x30, _tlv(0x04, wire.PAGED_OID) + _tlv(0x04, _tlv(0x30, _int(0x02, 0) + _tlv(0x04, b""))))
    stream = (ref_message(1001, _tlv(wire.SEARCH_ENTRY, entry)) + ref_message(1001, _tlv(wire.SEARCH_DONE, done), paged)
              + ref_message(1002, _tlv(wire.BIND_RESPONSE, RESULTS[1]), wire._PPOLICY_REQUEST)
              + ref_message(1003, _tlv(wire.SEARCH_ENTRY, ENTRIES[2]))
              + ref_message(1004, _tlv(wire.SEARCH_DONE, result_body(0, "", "m" * 100))))  # short form, 100+ bytes
    for data in mutants(stream, rng, 300):
        for sizes in ([], [1] * 12, [2, 3, 100], [rng.randint(1, 40) for _ in range(30)]):
            assert outcome(new_messages, data, sizes) == outcome(ref_messages, data, sizes), (data, sizes)
    assert [m[0] for m in new_messages(stream, [])] == [1001, 1001, 1002, 1003, 1004]


# -- a link's wait timer, kept from one wait to the next (link.py) ----------------------------------


class _Conn:
    """What a Link needs of an ldap3 connection: a socket (one end of a pair: the other end
    plays the server), ``closed`` and ``unbind``."""

    def __init__(self, sock) -> None:
        self.socket, self.closed = sock, False

    def unbind(self) -> None:
        self.closed = True
        self.socket.close()


def _bind_answer(message_id: int) -> bytes:
    return ref_message(message_id, _tlv(wire.BIND_RESPONSE, result_body(0, "", "")))


def _run_on(loop_kind: str, body):
    import asyncio

    from gateway import aio

    async def main():
        return await asyncio.wait_for(aio.run(body), 10)  # a wait its timer never ends fails here

    if loop_kind == "uvloop":
        return pytest.importorskip("uvloop").run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("first,second", [(0.3, 0.8), (30.0, 0.3)])
def test_each_wait_on_the_loop_ends_by_its_own_time_whatever_the_wait_before_it(loop_kind, first, second):
    """A first request answered at once leaves the link's timer armed for its time (*first*); the
    second, never answered, must time out after its own time (*second*): not at the first's end
    when that comes sooner (the timer is set again), not at it when it comes later (moved)."""
    import socket
    import time

    from gateway.plugins.ldap.link import Link, LinkBroken
    from gateway.plugins.ldap.pool import Server

    ours, server = socket.socketpair()
    link = Link(_Conn(ours), Server.from_url("ldap://127.0.0.1:1"))

    def body():
        link.settimeout(first)
        server.sendall(_bind_answer(1000))  # the answer to the first request, there at once
        assert link.bind("cn=a", "pw").ok
        link.settimeout(second)
        began = time.monotonic()
        with pytest.raises(LinkBroken) as caught:
            link.bind("cn=a", "pw")  # never answered
        return caught.value, time.monotonic() - began

    try:
        error, waited = _run_on(loop_kind, body)
        assert error.timeout and error.sent
        assert waited >= second - 0.01  # not cut short by the timer the first wait armed
    finally:
        link.close()
        server.close()
