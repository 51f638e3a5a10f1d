"""The link protocol without sockets (gateway.plugins.linkproto): each check refuses exactly the
frame that breaks it, with its error code. Then the connector's read path in-process (the real
LinkClient linked to a scripted relay on a local WebSocket): replays across links, floods."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import CheckResult, Decision, Identity, Outcome, SelfTest, hookimpl
from gateway.http.app import FrontDoor
from gateway.plugins import linkproto as proto
from gateway.plugins.link.client import LinkClient
from gateway.plugins.link.settings import LinkSettings
from support.chainhelp import build

NOW = 1_800_000_000.0


def _frame(**changes) -> str:
    data = {"v": proto.VERSION, "id": "abc", "type": "authenticate", "deadline": NOW + 5, "nonce": "n" * 22, "body": {}}
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def test_a_request_round_trips():
    request_id, text = proto.request("lookup_user", {"username": "alice"}, now=NOW, timeout=3)
    message = proto.decode(text, now=NOW, guard=proto.ReplayGuard())
    assert (message.id, message.type, message.body, message.deadline) == (request_id, "lookup_user",
                                                                          {"username": "alice"}, NOW + 3)
    assert message.is_request
    answer = proto.decode(proto.answer(request_id, {"found": False}), now=NOW)
    assert (answer.type, answer.id, answer.is_request) == ("answer", request_id, False)


@pytest.mark.parametrize("changes, code", [
    ({"deadline": NOW - 0.001}, "expired"),
    ({"deadline": NOW + proto.MAX_AHEAD + 1}, "bad_request"),
    ({"deadline": "soon"}, "bad_request"),
    ({"deadline": True}, "bad_request"),
    ({"deadline": float("nan")}, "bad_request"),
    ({"nonce": "short"}, "bad_request"),
    ({"nonce": ...}, "bad_request"),
    ({"v": 1}, "bad_request"),  # version 1 bound only the id into a sealed password
    ({"v": proto.VERSION + 1}, "bad_request"),
    ({"type": "format_disk"}, "unknown_type"),
    ({"body": []}, "bad_request"),
])
def test_each_check_refuses_its_frame(changes, code):
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(**changes), now=NOW, guard=proto.ReplayGuard())
    assert refused.value.code == code
    assert refused.value.request_id in ("abc", None)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1E999"])
def test_numbers_json_has_not_are_refused(number):
    """Python's json reads NaN and Infinity; a connector's answer holding one reached the
    identity, and the relay's /v1/authenticate then answered invalid JSON (review of the relay)."""
    text = '{"v": %d, "id": "abc", "type": "answer", "body": {"outcome": "success", "identity": ' \
           '{"subject": "s", "username": "u", "claims": {"n": %s}}}}' % (proto.VERSION, number)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(text, now=NOW)
    assert refused.value.code == "bad_request"


def test_the_relay_dates_a_connectors_proof_by_its_own_clock():
    """The login was proved in this call: its time is the relay's, not whatever the connector
    says (``1e300`` made SAML's AuthnInstant an OverflowError)."""
    from gateway.plugins.relay import _identity

    before = time.time()
    for said in (1e300, -1e300, 0, NOW):
        assert before <= _identity({"subject": "s", "username": "u", "authenticated_at": said}).authenticated_at <= time.time()


@pytest.mark.parametrize("text", ["not json", "[1]", json.dumps({"id": "", "v": 1}), "x" * (proto.MAX_FRAME + 1)])
def test_garbage_is_a_bad_request(text):
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(text, now=NOW)
    assert refused.value.code == "bad_request"


def test_a_replayed_nonce_is_refused_even_under_another_id():
    guard = proto.ReplayGuard()
    proto.decode(_frame(), now=NOW, guard=guard)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(id="other"), now=NOW, guard=guard)
    assert refused.value.code == "replayed"


def test_the_replay_guard_forgets_only_expired_nonces():
    guard = proto.ReplayGuard(max_entries=2)
    assert guard.fresh("a" * 16, NOW + 1, NOW) and guard.fresh("b" * 16, NOW + 100, NOW)
    assert not guard.fresh("c" * 16, NOW + 1, NOW)  # full of live nonces: refuse, do not forget
    assert guard.fresh("c" * 16, NOW + 5, NOW + 2)  # "a" expired and is dropped
    assert not guard.fresh("b" * 16, NOW + 100, NOW + 2)


def test_a_tolerated_skew_widens_the_deadline_checks_both_ways():
    behind = _frame(deadline=NOW - 29)  # stamped by a clock 34 s behind ours, 5 s ahead of its own
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(behind, now=NOW, guard=proto.ReplayGuard())
    assert refused.value.code == "expired"
    assert proto.decode(behind, now=NOW, skew=30, guard=proto.ReplayGuard()).deadline == NOW - 29
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(deadline=NOW - 31), now=NOW, skew=30)
    assert refused.value.code == "expired" and "more than the 30s of clock skew tolerated" in refused.value.detail
    ahead = _frame(deadline=NOW + proto.MAX_AHEAD + 29)  # a clock ahead, its request as far as allowed
    assert proto.decode(ahead, now=NOW, skew=30).deadline == NOW + proto.MAX_AHEAD + 29
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(deadline=NOW + proto.MAX_AHEAD + 31), now=NOW, skew=30)
    assert refused.value.code == "bad_request"
    for skew in (-1.0, float("nan"), float("inf")):  # NaN would pass every comparison
        with pytest.raises(ValueError):
            proto.decode(behind, now=NOW, skew=skew)


def test_the_replay_guard_keeps_a_nonce_as_long_as_the_skew_lets_its_request_in():
    # Past its deadline but within the skew, a request is still accepted: its nonce must still
    # be known, even when the guard is full and forgets what has expired.
    guard = proto.ReplayGuard(max_entries=2)  # one request: its nonce and its id
    proto.decode(_frame(deadline=NOW + 5), now=NOW, skew=30, guard=guard)
    later = NOW + 20
    with pytest.raises(proto.ProtocolError) as refused:  # full of one live request: refuse, do not forget
        proto.decode(_frame(id="other", nonce="m" * 22, deadline=later + 5), now=later, skew=30, guard=guard)
    assert refused.value.code == "replayed"
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(deadline=NOW + 5), now=later, skew=30, guard=guard)
    assert refused.value.code == "replayed"
    gone = NOW + 36  # deadline + skew passed: expired, and forgotten to make room
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(deadline=NOW + 5), now=gone, skew=30, guard=guard)
    assert refused.value.code == "expired"
    proto.decode(_frame(id="other", nonce="m" * 22, deadline=gone + 5), now=gone, skew=30, guard=guard)


CONNECTOR = "acme-0000abcd"
BODY = {"username": "alice", "client": "203.0.113.7", "request_id": "r1", "front_door": "forward_auth"}


def _sealed(key, password: str = "Corr3ct-horse", connector: str = CONNECTOR) -> dict:
    """An ``authenticate`` frame (as a dict) with *password* sealed for *connector*."""
    stamp = proto.new_stamp(now=NOW, timeout=5)
    body = {**BODY, "password": proto.seal_password(key.public_key(), password, stamp, connector=connector,
                                                    body=BODY)}
    return json.loads(proto.request("authenticate", body, stamp=stamp)[1])


def _open(key, frame: dict, connector: str = CONNECTOR) -> str:
    message = proto.decode(json.dumps(frame), now=NOW)
    return proto.open_password(key, message.body["password"], message, connector=connector)


def test_a_sealed_password_opens_only_with_the_key():
    key = ec.generate_private_key(ec.SECP256R1())
    frame = _sealed(key)
    assert "Corr3ct" not in json.dumps(frame)
    assert _open(key, frame) == "Corr3ct-horse"
    with pytest.raises(proto.ProtocolError) as refused:
        _open(ec.generate_private_key(ec.SECP256R1()), frame)
    assert refused.value.code == "bad_request"
    frame["body"]["password"] = "!!not base64!!"
    with pytest.raises(proto.ProtocolError):
        _open(key, frame)
    assert _sealed(key)["body"]["password"] != _sealed(key)["body"]["password"]


@pytest.mark.parametrize("change", [
    {"id": "another-id"},
    {"nonce": "a-fresh-nonce-of-the-copier"},       # a copy made to pass the replay guard
    {"deadline": NOW + 60},                         # kept alive past its deadline
    {"body": {"username": "bob"}},                  # tried on another account
    {"body": {"client": "198.51.100.9"}},           # throttled and audited as another address
    {"body": {"front_door": "api"}},                # let off the per-client limit
    {"connector": "acme-ffff0000"},                 # opened at another connector (same key here)
], ids=lambda change: next(iter(change.get("body", change))))
def test_a_sealed_password_opens_only_in_the_request_it_was_sealed_for(change):
    # Version 1 bound the id alone: a frame copied with a fresh nonce and another username
    # passed the replay guard and opened, trying the password on another account.
    key = ec.generate_private_key(ec.SECP256R1())
    frame = _sealed(key)
    connector = change.get("connector", CONNECTOR)
    frame.update({k: v for k, v in change.items() if k not in ("body", "connector")})
    frame["body"].update(change.get("body", {}))
    with pytest.raises(proto.ProtocolError) as refused:
        _open(key, frame, connector)
    assert (refused.value.code, refused.value.detail) == (
        "bad_request", "the sealed password does not open with this connector's key")


def test_a_request_id_seen_is_a_replay_under_a_fresh_nonce():
    guard = proto.ReplayGuard()
    proto.decode(_frame(), now=NOW, guard=guard)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(nonce="m" * 22), now=NOW, guard=guard)
    assert refused.value.code == "replayed"


def test_another_version_is_refused_in_its_own_envelope_and_its_refusals_are_read():
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(v=1), now=NOW)
    assert (refused.value.code, refused.value.peer_version) == ("bad_request", 1)
    assert "version 1" in refused.value.detail and f"speaks {proto.VERSION}" in refused.value.detail
    answer = json.loads(proto.error("abc", "bad_request", "x", version=refused.value.peer_version))
    assert answer["v"] == 1
    # the other end's error frame, whatever its version, reaches the request that waits for it
    theirs = proto.decode(json.dumps({"v": 1, "id": "abc", "type": "error",
                                      "body": {"code": "bad_request", "detail": "this end speaks 1"}}), now=NOW)
    assert (theirs.type, theirs.body["detail"]) == ("error", "this end speaks 1")


def test_back_off_grows_is_capped_and_jittered(tmp_path):
    from gateway.plugins.link.client import LinkClient
    from gateway.plugins.link.settings import LinkSettings

    client = LinkClient(LinkSettings(backoff_initial=0.5, backoff_max=30), tmp_path, None, None, "test")
    assert all(0.25 <= client.delay(0) < 0.5 for _ in range(50))
    assert all(2.0 <= client.delay(3) < 4.0 for _ in range(50))
    late = [client.delay(40) for _ in range(200)]  # capped, and spread over half the ceiling
    assert all(15.0 <= d < 30.0 for d in late)
    assert max(late) - min(late) > 10.0


# -- the connector's read path, in-process, against a scripted relay ------------------------------------

GATE = threading.Event()  # the directory answers lookups once set
LOOKUPS: list[str] = []
THREADS: list[str] = []  # the thread each lookup ran on
SELFTESTS: list[float] = []  # one per run of the directory's self-test
#: A lookup of this name answers an identity larger than a link frame (a thousand long groups).
CROWDED = "crowded"


class Directory:
    """A chain step that knows one password, and a directory whose lookups wait for GATE."""

    def __init__(self, settings, context) -> None:
        pass

    @hookimpl
    def gateway_authenticate(self, attempt):
        if attempt.password.password != "Corr3ct-horse":
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step="dir", reason="dir.invalid")
        user = attempt.password.username
        return Decision.allow(Identity(subject=f"uid={user}", username=user, method="dir"), step="dir")

    @hookimpl
    def gateway_lookup_user(self, username):
        LOOKUPS.append(username)
        THREADS.append(threading.current_thread().name)
        if username == CROWDED:
            return Identity(subject=f"uid={username}", username=username, method="dir",
                            groups=tuple(f"cn=project-{n:04d}-{'x' * 50},ou=groups" for n in range(1000)))
        GATE.wait(20)
        return None

    @hookimpl
    def gateway_selftests(self):
        def run():
            SELFTESTS.append(time.monotonic())
            return CheckResult.ok("a test login")
        return [SelfTest("dir.login", run)]


class ScriptedRelay:
    """A relay's /link over plain WebSocket: each link's frames go to a queue the test reads,
    and the test writes what the relay sends."""

    def __init__(self) -> None:
        self.links: asyncio.Queue = asyncio.Queue()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/link", self._link)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"ws://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/link"

    async def _link(self, request):
        ws = web.WebSocketResponse(max_msg_size=proto.MAX_FRAME)
        await ws.prepare(request)
        link = SimpleNamespace(ws=ws, frames=asyncio.Queue())
        await self.links.put(link)
        async for msg in ws:
            await link.frames.put(json.loads(msg.data))
        await link.frames.put(("closed", ws.close_code))
        return ws

    async def accept(self):
        """The next link, its hello answered."""
        link = await asyncio.wait_for(self.links.get(), 5)
        hello = await asyncio.wait_for(link.frames.get(), 5)
        assert hello["type"] == "hello"
        await link.ws.send_str(proto.answer(hello["id"], {"time": time.time()}))
        return link


def _connector(tmp_path, **settings):
    runtime = build(tmp_path, {"chain": ["dir"]}, targets={"dir": "test_link_protocol:Directory"})
    client = LinkClient(LinkSettings(max_clock_skew=0, **settings), tmp_path, FrontDoor(runtime.gateway),
                        runtime.gateway.pm.hook, "test")
    key = ec.generate_private_key(ec.SECP256R1())
    return runtime, client, key


async def _dial(client, key, url):
    """One link of *client* (a task) to the scripted relay at *url*."""
    enrolment = SimpleNamespace(link_url=url, connector=CONNECTOR, key=key, not_after=time.time() + 3600,
                                renew_at=time.time() + 3600)
    http = aiohttp.ClientSession()
    task = asyncio.ensure_future(client._linked(http, enrolment, False, None, None))
    task.add_done_callback(lambda _: asyncio.ensure_future(http.close()))
    return task


def _authenticate(key, password="Corr3ct-horse", username="alice") -> tuple[str, str]:
    stamp = proto.new_stamp(now=time.time(), timeout=10)
    body = {"username": username, "client": "203.0.113.7", "request_id": "r", "front_door": "forward_auth"}
    body["password"] = proto.seal_password(key.public_key(), password, stamp, connector=CONNECTOR, body=body)
    return proto.request("authenticate", body, stamp=stamp)


async def _answer_to(link, request_id: str, timeout: float = 5) -> dict:
    while True:
        frame = await asyncio.wait_for(link.frames.get(), timeout)
        if isinstance(frame, dict) and frame.get("id") == request_id:
            return frame


def test_a_request_copied_onto_the_next_link_is_refused_as_a_replay(tmp_path):
    # The replay guard was per link: after a reconnect the same frame, verbatim, was served
    # again (a password tried twice towards the directory's lockout, or a login answered twice).
    runtime, client, key = _connector(tmp_path)

    async def main():
        relay = ScriptedRelay()
        url = await relay.start()
        try:
            first = await _dial(client, key, url)
            link = await relay.accept()
            request_id, frame = _authenticate(key)
            await link.ws.send_str(frame)
            answer = await _answer_to(link, request_id)
            assert (answer["type"], answer["body"]["outcome"]) == ("answer", "success")
            await link.ws.close()
            await asyncio.wait_for(first, 5)
            second = await _dial(client, key, url)
            link = await relay.accept()
            await link.ws.send_str(frame)
            copy = await _answer_to(link, request_id)
            assert (copy["type"], copy["body"]["code"]) == ("error", "replayed")
            fresh_id, fresh = _authenticate(key)  # the next real request goes through
            await link.ws.send_str(fresh)
            assert (await _answer_to(link, fresh_id))["body"]["outcome"] == "success"
            await link.ws.close()
            await asyncio.wait_for(second, 5)
        finally:
            await relay.runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        client.close()
        runtime.discard()


def test_a_flood_of_requests_is_held_bounded_and_the_rest_refused_at_once(tmp_path):
    # The connector started a task per request frame and bounded only the work inside it:
    # 20,000 lookups with long deadlines and padding held 20,000 tasks and their frames (1.2 GB).
    runtime, client, key = _connector(tmp_path, max_concurrent=4)
    GATE.clear()
    LOOKUPS.clear()
    pad = "x" * 60_000

    async def main():
        relay = ScriptedRelay()
        url = await relay.start()
        try:
            first = await _dial(client, key, url)
            link = await relay.accept()
            sent = []
            for n in range(200):
                # the first four hold the directory longer than the next ones may wait
                request_id, frame = proto.request("lookup_user", {"username": f"u{n}", "pad": pad},
                                                  now=time.time(), timeout=2.5 if n < 4 else 1.0)
                sent.append(request_id)
                if link.ws.closed:
                    break
                await link.ws.send_str(frame)
            refused = []
            while True:
                frame = await asyncio.wait_for(link.frames.get(), 5)
                if isinstance(frame, tuple):
                    closed = frame
                    break
                refused.append(frame)
            # 2 x max_concurrent held (4 at the directory, 4 waiting); each one more is answered
            # unavailable without a task, and a relay that keeps on has its link closed
            assert len(client._tasks) == 8
            assert [(f["id"], f["type"], f["body"]["code"]) for f in refused] == [
                (i, "error", "unavailable") for i in sent[8:28]]
            assert closed == ("closed", 1008)
            await asyncio.wait_for(first, 5)
            await asyncio.sleep(3.0)  # past the deadlines: the four waiting got their slots too late
            GATE.set()
            for _ in range(50):
                if not client._tasks:
                    break
                await asyncio.sleep(0.1)
            assert not client._tasks
            assert sorted(LOOKUPS) == ["u0", "u1", "u2", "u3"]  # the late ones never reached the directory
            # and the next link serves as before
            second = await _dial(client, key, url)
            link = await relay.accept()
            request_id, frame = _authenticate(key)
            await link.ws.send_str(frame)
            assert (await _answer_to(link, request_id))["body"]["outcome"] == "success"
            request_id, frame = proto.request("lookup_user", {"username": "carol"}, now=time.time(), timeout=5)
            await link.ws.send_str(frame)
            assert (await _answer_to(link, request_id))["body"] == {"found": False, "identity": None}
            await link.ws.close()
            await asyncio.wait_for(second, 5)
        finally:
            GATE.set()
            await relay.runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        GATE.set()
        client.close()
        runtime.discard()


def test_a_renewal_falls_due_when_the_clock_jumps_past_it(tmp_path, monkeypatch):
    # The renewal slept until a moment of the wall clock in one sleep: a host suspended (or a
    # clock stepped forward) past that moment renewed only when the original sleep ran out
    # (review of time). It looks at the clock at least every RENEWAL_CHECK seconds now.
    from gateway.plugins.link import client as link_client

    monkeypatch.setattr(link_client, "RENEWAL_CHECK", 0.05)
    runtime, client, key = _connector(tmp_path)
    now = [time.time()]
    client._clock = lambda: now[0]

    async def main():
        relay = ScriptedRelay()
        url = await relay.start()
        http = aiohttp.ClientSession()
        try:
            enrolment = SimpleNamespace(link_url=url, connector=CONNECTOR, key=key, not_after=now[0] + 4 * 3600,
                                        renew_at=now[0] + 2 * 3600)
            task = asyncio.ensure_future(client._linked(http, enrolment, False, None, None))
            link = await relay.accept()
            await asyncio.sleep(0.2)  # not due: nothing asked
            assert all(frame.get("type") != "renew" for frame in list(link.frames._queue) if isinstance(frame, dict))
            now[0] += 2 * 3600 + 1  # the host slept two hours
            while True:
                frame = await asyncio.wait_for(link.frames.get(), 5)
                if isinstance(frame, dict) and frame.get("type") == "renew":
                    break
            await link.ws.close()
            await asyncio.wait_for(task, 5)
        finally:
            await http.close()
            await relay.runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        client.close()
        runtime.discard()


# -- what a hostile relay could make of the connector (review of the connector's side) ----------


def test_a_full_replay_guard_forgets_in_the_order_windows_end_not_by_rebuilding():
    # A full guard rebuilt its whole table whenever one window had ended: a relay choosing
    # deadlines a few milliseconds apart made each frame cost tens of milliseconds of the
    # connector's event loop. Taken in CPU time of this thread (no wall clock): a call on the
    # full guard now costs about what one on an empty guard does, not a thousand times more.
    guard = proto.ReplayGuard(max_entries=20_000)
    for n in range(10_000):  # 20,000 entries (nonce and id), windows ending 1 ms apart
        assert guard.fresh(f"n{n:015d}", NOW + 0.001 * n, NOW, f"id{n}")
    assert len(guard) == 20_000 and not guard.fresh("x" * 16, NOW + 60, NOW, "x")  # full of live ones
    assert guard.full

    def cost(target, start) -> float:
        began = time.thread_time()
        for n in range(300):
            clock = start + 0.001 * n
            assert target.fresh(f"m{n:015d}", clock + 60, clock, f"jd{n}")
        return time.thread_time() - began

    full = cost(guard, NOW + 0.0005)  # each call finds one window ended: room for one request
    empty = cost(proto.ReplayGuard(max_entries=20_000), NOW)
    assert full < 50 * max(empty, 0.001), (full, empty)
    assert len(guard) == 20_000
    assert not guard.fresh(f"n{9_999:015d}", NOW + 70, NOW + 1)  # a live nonce is still a replay


def _linked(tmp_path, body, **settings):
    """Run ``body(client, link)`` with *client* (a connector) linked to a scripted relay."""
    runtime, client, key = _connector(tmp_path, **settings)

    async def main():
        relay = ScriptedRelay()
        url = await relay.start()
        try:
            task = await _dial(client, key, url)
            link = await relay.accept()
            await body(client, link, key)
            if not link.ws.closed:
                await link.ws.close()
            await asyncio.wait_for(task, 10)
        finally:
            await relay.runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        GATE.set()
        client.close()
        runtime.discard()


def test_an_answer_larger_than_a_frame_fails_its_request_alone(tmp_path, caplog):
    # The relay reads at most a frame: a larger answer (a user in a thousand long-named groups)
    # closed the whole link (1009), failing every request on it, at each login of that user.
    async def body(client, link, key):
        request_id, frame = proto.request("lookup_user", {"username": CROWDED}, now=time.time(), timeout=5)
        await link.ws.send_str(frame)
        answer = await _answer_to(link, request_id)
        assert (answer["type"], answer["body"]["code"]) == ("error", "internal"), answer
        assert "does not fit one link frame" in answer["body"]["detail"]
        request_id, frame = _authenticate(key)  # the link is still up and serves the next request
        await link.ws.send_str(frame)
        assert (await _answer_to(link, request_id))["body"]["outcome"] == "success"

    _linked(tmp_path, body)
    assert any("more than a link frame" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind, body", [
    ("lookup_user", {"username": "al\ud800ice"}),
    ("list_groups", {"username": "al\ud800ice"}),
    ("search_users", {"query": "al\ud800", "limit": 5}),
    ("lookup_user", {"username": "alice\x1b[2J"}),
], ids=["lookup-surrogate", "groups-surrogate", "search-surrogate", "lookup-control"])  # a query's controls match literally
def test_a_name_that_is_not_printable_text_is_a_bad_request_before_the_directory(tmp_path, kind, body):
    # A lone surrogate (JSON can spell one) cannot be encoded for the directory: it failed in
    # the LDAP pool, closing its connection, with a traceback, at each request.
    LOOKUPS.clear()

    async def run(client, link, key):
        request_id, frame = proto.request(kind, body, now=time.time(), timeout=5)
        await link.ws.send_str(frame.replace("\ud800", "\\ud800"))  # as JSON spells it: UTF-8 has no such character
        answer = await _answer_to(link, request_id)
        assert (answer["type"], answer["body"]["code"]) == ("error", "bad_request"), answer

    _linked(tmp_path, run)
    assert LOOKUPS == []


def test_refused_frames_are_logged_rate_limited_and_a_flood_closes_the_link(tmp_path, caplog):
    # Each refused frame was a WARNING (with the frame's text quoted, any size), and a relay
    # could send them for ever.
    async def body(client, link, key):
        for n in range(25):
            await link.ws.send_str(json.dumps({"v": "9" * 5000, "id": f"r{n}", "type": "ping", "body": {}}))
            if link.ws.closed:
                break
        closed = None
        while closed is None:
            frame = await asyncio.wait_for(link.frames.get(), 5)
            if isinstance(frame, tuple):
                closed = frame
            else:
                assert len(frame["body"]["detail"]) <= 200, frame
        assert closed == ("closed", 1008)

    _linked(tmp_path, body)
    # one WARNING a minute for the process (another test's refusals may have taken this minute's)
    refusals = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) <= 1 and all(len(line) < 400 for line in refusals), refusals


def test_the_relays_words_reach_the_log_and_readyz_as_one_printable_line(tmp_path):
    runtime, client, key = _connector(tmp_path)

    async def main():
        relay = ScriptedRelay()
        url = await relay.start()
        try:
            task = await _dial(client, key, url)
            link = await asyncio.wait_for(relay.links.get(), 5)
            hello = await asyncio.wait_for(link.frames.get(), 5)
            await link.ws.send_str(proto.error(hello["id"], "forbidden", "no such thing\n2026-01-01 00:00:00,000 "
                                               "INFO forged: link up\x1b[2K\x1b[1A"))
            with pytest.raises(ConnectionError) as refused:
                await asyncio.wait_for(task, 5)
            return str(refused.value)
        finally:
            await relay.runner.cleanup()

    try:
        said = asyncio.run(main())
    finally:
        client.close()
        runtime.discard()
    assert "forbidden: no such thing" in said and "\n" not in said and "\x1b" not in said, said


def test_directory_questions_run_on_threads_of_their_own_bounded_by_max_concurrent(tmp_path):
    # On the loop's default executor, lookups given up on at their deadline went on holding its
    # threads: the login door's signing and look-ups (asyncio.to_thread) waited behind them.
    GATE.clear()
    LOOKUPS.clear()
    THREADS.clear()

    async def body(client, link, key):
        sent = []
        for n in range(6):
            request_id, frame = proto.request("lookup_user", {"username": f"slow{n}"}, now=time.time(), timeout=0.5)
            sent.append(request_id)
            await link.ws.send_str(frame)
        answers = {}
        while len(answers) < len(sent):  # in any order
            frame = await asyncio.wait_for(link.frames.get(), 5)
            answers[frame["id"]] = frame["body"].get("code")
        assert answers == {request_id: "unavailable" for request_id in sent}
        assert await asyncio.to_thread(lambda: "the default executor is free") == "the default executor is free"
        GATE.set()

    _linked(tmp_path, body, max_concurrent=2)
    assert len(LOOKUPS) == 2, LOOKUPS  # two threads; the questions queued behind them were never run
    assert all(name.startswith("authgw-link-directory") for name in THREADS), THREADS


def test_self_test_results_are_reused_for_a_minute_not_run_again(tmp_path):
    # Each run may try the directory's test login: a relay asking back to back turned a stale
    # test password into the account's lockout at the directory.
    SELFTESTS.clear()

    async def body(client, link, key):
        answers = []
        for _ in range(3):
            request_id, frame = proto.request("selftest", {}, now=time.time(), timeout=10)
            await link.ws.send_str(frame)
            answers.append((await _answer_to(link, request_id, timeout=15))["body"])
        assert answers[0] == answers[1] == answers[2]
        assert {"name": "dir.login", "status": "pass", "detail": "a test login", "hint": ""} in answers[0]["results"]

    _linked(tmp_path, body)
    assert len(SELFTESTS) == 1, SELFTESTS


def test_a_client_address_with_a_zone_is_a_bad_request(tmp_path):
    # ipaddress reads fe80::1%<any text> (a newline, an escape) as an address: it went into the
    # audit line and the throttle's keys as the relay wrote it.
    async def body(client, link, key):
        stamp = proto.new_stamp(now=time.time(), timeout=10)
        fields = {"username": "alice", "client": "fe80::1%\nforged", "request_id": "r", "front_door": "forward_auth"}
        fields["password"] = proto.seal_password(key.public_key(), "Corr3ct-horse", stamp, connector=CONNECTOR,
                                                 body=fields)
        request_id, frame = proto.request("authenticate", fields, stamp=stamp)
        await link.ws.send_str(frame)
        answer = await _answer_to(link, request_id)
        assert (answer["type"], answer["body"]["code"]) == ("error", "bad_request"), answer

    _linked(tmp_path, body)
