"""The front doors' one-piece answers (gateway/http/answer.py) against aiohttp's own responses:
the same request, over a real connection to the same guarded server, gets the same status line,
header fields (Date aside), body and connection handling from an :class:`Answer` as from the
``web.Response`` it replaces."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from gateway.http.answer import Answer
from gateway.http.app import _no_versions
from gateway.http.protocol import ConnectionGuard, GuardedSite
from gateway.settings import LimitsSettings

CASES = {
    "ok": (200, "", {"X-Request-Id": "r1", "Cache-Control": "no-store", "Remote-User": "alice",
                     "Remote-Name": "Zoë Ünïcode", "Remote-Groups": ""}, ()),
    "denied": (401, "401 Unauthorized\n", {"X-Request-Id": "r2", "Cache-Control": "no-store"},
               ('Basic realm="authgw", charset="UTF-8"', "Negotiate")),
    "busy": (503, "503 Service Unavailable\n", {"X-Request-Id": "r3", "Retry-After": "5"}, ()),
    "throttled": (429, "429 Too Many Requests\n", {"Retry-After": "300"}, ()),
    # A value that would split the response: neither sends anything, both close the connection.
    "split": (200, "", {"Remote-User": "x\r\nSet-Cookie: evil=1"}, ()),
    "nul": (200, "", {"Remote-User": "x\x00y"}, ()),
}

REQUESTS = {
    "get": "GET /{kind}/{case} HTTP/1.1\r\nHost: t\r\n\r\n",
    "head": "HEAD /{kind}/{case} HTTP/1.1\r\nHost: t\r\n\r\n",
    "close": "GET /{kind}/{case} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "http10": "GET /{kind}/{case} HTTP/1.0\r\n\r\n",
    "http10-keep-alive": "GET /{kind}/{case} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "post-body": "POST /{kind}/{case} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
}


async def _answer(request: web.Request) -> web.StreamResponse:
    status, text, fields, challenges = CASES[request.match_info["case"]]
    return Answer(status, text, dict(fields), challenges)


async def _reference(request: web.Request) -> web.StreamResponse:
    status, text, fields, challenges = CASES[request.match_info["case"]]
    response = web.Response(status=status, text=text, headers=dict(fields))
    for challenge in challenges:
        response.headers.add("WWW-Authenticate", challenge)
    return response


async def _exchange(port: int, request: bytes, *, again: bool) -> tuple[bytes, bool]:
    """What the server sends back, and whether the connection then serves another request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = b""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if head.startswith(b"HTTP/1.1 100 "):  # an interim answer to Expect: the answer follows
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b""
            return b"", False
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if not request.startswith(b"HEAD"):
            head += await asyncio.wait_for(reader.readexactly(length), 5)
        if not again:
            return head, False
        writer.write(b"GET /answer/ok HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            more = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, ConnectionError):
            more = b""
        # Served, or closed: an open connection left unanswered would hang, not come here.
        return head, more.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


def _parts(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *fields = head.split(b"\r\n") if head else [b""]
    dates = [f for f in fields if f.lower().startswith(b"date:")]
    assert len(dates) == (1 if head else 0)
    return status, sorted(f for f in fields if not f.lower().startswith(b"date:")), body


def _serve_and_compare(case: str, request: str) -> tuple[tuple, tuple]:
    async def main() -> tuple[tuple, tuple]:
        app = web.Application()
        app.on_response_prepare.append(_no_versions)  # as the front doors' applications do
        app.router.add_route("*", "/answer/{case}", _answer)
        app.router.add_route("*", "/aiohttp/{case}", _reference)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = GuardedSite(runner, sock, ConnectionGuard(LimitsSettings()))
        await site.start()
        try:
            port = sock.getsockname()[1]
            got = []
            for kind in ("answer", "aiohttp"):
                raw, served_again = await _exchange(port, request.format(kind=kind, case=case).encode(),
                                                    again=request.count("HTTP/1.1") == 1 or "keep-alive" in request)
                got.append((*_parts(raw), served_again))
            return tuple(got)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


@pytest.mark.parametrize("request_kind", sorted(REQUESTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_answer_is_what_aiohttp_would_send(case, request_kind):
    answer, reference = _serve_and_compare(case, REQUESTS[request_kind])
    assert answer == reference
    status, fields, body, served_again = answer
    if case in ("split", "nul"):
        assert status == b"" and not served_again  # nothing sent, connection closed
        return
    assert b"Server: authgw" in fields
    assert served_again == (request_kind in ("get", "head", "post-body", "http10-keep-alive"))
    assert body == (b"" if request_kind == "head" else CASES[case][1].encode())


def test_an_answer_reads_like_a_response():
    answer = Answer(401, "401 Unauthorized\n", {"X-Request-Id": "r"}, ("Basic", "Negotiate"))
    assert answer.status == 401 and answer.text == "401 Unauthorized\n"
    assert answer.headers.getall("WWW-Authenticate") == ["Basic", "Negotiate"]
    assert answer.headers["x-request-id"] == "r"
    answer.force_close()
    assert answer.keep_alive is False and not answer.prepared


def test_exact_targets_go_straight_to_their_handler_and_the_rest_to_the_router():
    """``/auth`` skips aiohttp's router (gateway/http/app.py ``exact_targets``); anything else, a
    query string, or an ``Expect`` header (which the router's handler answers) does not."""
    from gateway.http.app import exact_targets

    async def main() -> list[tuple[str, bytes]]:
        async def direct(request):
            return Answer(200, "direct\n", {})

        async def routed(request):
            return Answer(200, "routed\n", {})

        app = web.Application()
        app.router.add_route("*", "/auth", routed)
        app.router.add_route("*", "/other", routed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runner.server.request_handler = exact_targets(runner.server.request_handler, {"/auth": direct})
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await GuardedSite(runner, sock, ConnectionGuard(LimitsSettings())).start()
        try:
            port, got = sock.getsockname()[1], []
            for target, extra in [("/auth", ""), ("/auth?x=1", ""), ("/other", ""), ("/auth", "Expect: 100-continue\r\n")]:
                raw, _ = await _exchange(port, f"GET {target} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode(), again=False)
                got.append((target + (" expect" if extra else ""), raw.rpartition(b"\r\n\r\n")[2]))
            return got
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == [("/auth", b"direct\n"), ("/auth?x=1", b"routed\n"), ("/other", b"routed\n"),
                                   ("/auth expect", b"routed\n")]


def test_a_header_value_from_an_identity_is_always_writable(caplog):
    """A lone surrogate cannot be written as UTF-8: the answer's encode raised after a logged
    success and the client got a reset (review of the front door); it becomes "?". A value with
    a control character is sent empty: without the character it would be another value
    (review of what the gateway writes)."""
    from gateway.http.app import _header_value

    with caplog.at_level("WARNING", logger="authgw.http"):
        assert _header_value("bad name\r\nX-Injected: 1", "name") == ""
        assert _header_value("ceo@example.com\x7f", "email") == ""
    assert "email holds a control character: Remote-Email sent empty" in caplog.text
    assert _header_value("Zoë Ünal") == "Zoë Ünal"
    assert _header_value("bad \ud800 name") == "bad ? name"
    # C1 and the line separators: a backend splitting a latin-1 (WSGI) or text header into lines
    # read "Eve\x85Remote-User: admin" as a header of its own (review of the front doors)
    assert _header_value("Eve\x85Remote-User: admin", "name") == "" and _header_value("a\u2028b", "name") == ""
    assert _header_value("left\u200eto right") == "left\u200eto right"  # a format character: as it is


def test_a_group_name_holding_a_comma_is_left_out_of_remote_groups(caplog):
    """``project-x, admins`` would read as two groups, admins among them, to a backend that
    splits Remote-Groups on commas (review of the front door)."""
    from gateway.http.app import _groups_header

    assert _groups_header(("staff", "ops")) == "staff,ops"
    assert _groups_header(()) == ""
    with caplog.at_level("WARNING", logger="authgw.http"):
        assert _groups_header(("staff", "project-x, admins", "ops")) == "staff,ops"
    assert "'project-x, admins'" in caplog.text and "left out of Remote-Groups" in caplog.text
    assert _groups_header(("adm\x00ins", "ops", "adm\x7fins", "a\ud800b")) == "ops,a?b"
