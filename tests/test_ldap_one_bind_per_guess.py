"""One password guess costs the directory at most one bind, even when the connection breaks.

A domain controller (or a load balancer in front of it) may reset a connection after it has
checked a password and before it answers. AD has then counted the bad password; a bind sent
again, on a fresh connection or to the next server, would count a second one for the same
guess, while the throttle keeps below the lockout threshold counting one bind a guess. So a
user bind that went out whole and broke without a timeout is not sent again: 503, nothing more.
A request that never went out whole, service-account operations and timeouts still retry and
fail over as before.

The servers are tests/support/fakead.py's DroppingAD (it reads the chosen bind of a connection,
counts it, and closes the connection unanswered), the gateway the real ``authgw serve``; the
rule itself is also pinned on :class:`~gateway.plugins.ldap.pool.Pool` with scripted links.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from gateway.plugins.ldap.link import Link, LinkBroken
from gateway.plugins.ldap.pool import BIND, SERVICE, DirectoryUnavailable, Pool
from support.fakead import DroppingAD
from support.ldapgw import api_login, ldap_gateways

TOKEN = "one-bind-token"
BASE = "DC=corp,DC=example,DC=com"
UPN = "jdoe@corp.example.com"
USERS = {f"CN=Jane Doe,OU=Staff,{BASE}": {
    "objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"],
    "sAMAccountName": ["jdoe"], "userPrincipalName": [UPN], "password": ["jane-pw"]}}


def settings(*servers: DroppingAD, **overrides) -> dict:
    return {"preset": "active_directory", "servers": [s.url for s in servers], "insecure": True, "base_dn": BASE,
            "direct_bind": "{username}@corp.example.com", "groups": {"source": "memberof", "nested": False},
            "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 30, **overrides}


@pytest.fixture
def start(tmp_path):
    yield from ldap_gateways(tmp_path, TOKEN)


@pytest.fixture
def servers():
    started: list[DroppingAD] = []

    def make(drop_at: int) -> DroppingAD:
        started.append(DroppingAD(USERS, drop_at=drop_at))
        return started[-1]

    yield make
    for server in started:
        server.stop()


def guess(gateway, *servers: DroppingAD) -> tuple[int, str, int]:
    """One wrong password on ``/auth``: (status, reason audited, binds of the user the servers
    read for it)."""
    before = sum(s.binds[UPN] for s in servers)
    response = gateway.auth("jdoe", "not-janes-password")
    reason = gateway.audit_for(response.header("X-Request-Id"))["reason"]
    return response.status, reason, sum(s.binds[UPN] for s in servers) - before


def test_a_bind_whose_connection_is_reset_unanswered_is_not_sent_again(start, servers) -> None:
    # Each connection's second bind is read, then the connection closed unanswered. Whichever
    # guess meets it (the second, or the third when the start-up probe's idle connection came
    # late) costs the one bind AD counted, and is a 503: no fresh connection binds it again.
    ad = servers(drop_at=2)
    gateway = start(settings(ad))
    answers = [guess(gateway, ad) for _ in range(3)]
    assert [binds for _, _, binds in answers] == [1, 1, 1], answers
    assert ad.dropped == 1
    assert sorted(answers) == [(401, "ldap.invalid_password", 1), (401, "ldap.invalid_password", 1),
                               (503, "ldap.unavailable", 1)], answers
    assert "not sent again" in gateway.output()
    # and the right password still logs in on a fresh connection
    _, body = api_login(gateway, TOKEN, "jdoe", "jane-pw")
    assert body["outcome"] in ("success", "unavailable"), body  # the pool's link may meet the drop once more
    if body["outcome"] == "unavailable":
        assert api_login(gateway, TOKEN, "jdoe", "jane-pw")[1]["outcome"] == "success"


def test_a_bind_reset_unanswered_does_not_fail_over_to_the_next_server(start, servers) -> None:
    # The first server reads every connection's first bind and resets it; the second is fine.
    # Before: the reset bind was sent again on a fresh connection, then to the second server:
    # three binds, three bad passwords, for one guess.
    first, second = servers(drop_at=1), servers(drop_at=0)
    gateway = start(settings(first, second))
    answers = []
    for _ in range(3):
        answers.append(guess(gateway, first, second))
        if answers[-1][0] == 401:
            break
    assert [binds for _, _, binds in answers] == [1] * len(answers), answers
    assert answers[0][:2] == (503, "ldap.unavailable"), answers
    # once the first server is marked down (a fresh connection reset), the second answers
    assert answers[-1] == (401, "ldap.invalid_password", 1), answers
    assert second.binds[UPN] == 1


# ---------------------------------------------------------------------------------------------
# The rule on the pool, with scripted links
# ---------------------------------------------------------------------------------------------


class ScriptedLink:
    """Stands for a Link: ``reused`` as the pool sets it; closing is recorded. *idle*: seconds since
    its last use; *forgotten*: a middlebox forgot it, so its next request is reset."""

    def __init__(self, server, reused: bool, idle: float = 0.0, forgotten: bool = False) -> None:
        self.server, self.reused, self.closed = server, reused, False
        self.last_used = time.monotonic() - idle
        self.forgotten, self.asked = forgotten, 0

    def who_am_i(self):
        self.asked += 1
        if self.forgotten:
            raise LinkBroken("connection reset by peer", sent=True)
        return None, "dn:cn=someone"

    def settimeout(self, seconds: float, deadline: float = 0.0) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class ScriptedPool(Pool):
    """A pool whose first link per server comes from its idle queue (reused), the next ones new."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls, tls=None, start_tls=False, connect_timeout=0.5, receive_timeout=1.0, backoff=30,
                         pool_size=4, idle_timeout=240, service=None, log=logging.getLogger("test.ldap.pool"))
        self.opened: list[str] = []
        self.reusable = {s.url for s in self.servers}

    def _take_idle(self, server, kind):
        if server.url in self.reusable:
            self.reusable.discard(server.url)
            return ScriptedLink(server, reused=True)
        return None

    def open(self, server, kind, deadline):
        self.opened.append(server.url)
        return ScriptedLink(server, reused=False)


def run(pool: Pool, kind: str, failures: list[LinkBroken]) -> tuple[list[str], object]:
    """Run an operation that fails with *failures* in turn, then answers: (servers it ran on, outcome)."""
    ran: list[str] = []

    def operation(link):
        ran.append(link.server.url)
        if len(ran) <= len(failures):
            raise failures[len(ran) - 1]
        return "answered"

    try:
        outcome: object = pool.call(kind, operation, time.monotonic() + 5)
    except DirectoryUnavailable as exc:
        outcome = exc.reason
    return ran, outcome


A, B = "ldap://a.example", "ldap://b.example"


def test_a_sent_user_bind_that_broke_runs_once_on_a_reused_or_a_fresh_link() -> None:
    pool = ScriptedPool([A, B])
    assert run(pool, BIND, [LinkBroken("closed", sent=True)]) == ([A], "ldap.unavailable")  # reused link
    assert run(pool, BIND, [LinkBroken("closed", sent=True)]) == ([A], "ldap.unavailable")  # fresh link
    assert pool.servers[0].failures == 1  # a fresh connection broke: the server is blamed, B goes first
    assert run(pool, BIND, [LinkBroken("closed", sent=True)]) == ([B], "ldap.unavailable")


def test_a_bind_link_idle_a_while_is_asked_who_it_is_before_it_carries_a_password() -> None:
    """A load balancer or firewall that forgot an idle connection resets it at its next packet:
    that packet is a password-less Who am I?, and the bind goes on a fresh link (before, the
    bind was reset there and, not being sent again, was a 503) (review of this stop's diff)."""
    for forgotten in (True, False):
        pool = ScriptedPool([A])
        idle = ScriptedLink(pool.servers[0], reused=True, idle=60, forgotten=forgotten)
        pool._take_idle = lambda server, kind, link=idle: link if not idle.asked else None
        assert run(pool, BIND, []) == ([A], "answered")
        assert idle.asked == 1 and idle.closed is forgotten and pool.opened == ([A] if forgotten else [])
    # a link in use a moment ago is not asked: no round trip on a busy gateway's logins
    pool = ScriptedPool([A])
    recent = ScriptedLink(pool.servers[0], reused=True, idle=1)
    pool._take_idle = lambda server, kind: recent
    assert run(pool, BIND, []) == ([A], "answered") and recent.asked == 0


def test_what_was_not_sent_whole_and_service_operations_are_retried_as_before() -> None:
    # A request that never went out whole cannot have been counted: fresh retry, then the next server.
    assert run(ScriptedPool([A, B]), BIND, [LinkBroken("reset", sent=False)]) == ([A, A], "answered")
    assert run(ScriptedPool([A, B]), BIND, [LinkBroken("reset", sent=False)] * 2) == ([A, A, B], "answered")
    # The service account's searches bind no user password: retried even after they went out.
    assert run(ScriptedPool([A, B]), SERVICE, [LinkBroken("closed", sent=True)] * 2) == ([A, A, B], "answered")


def test_a_hung_server_still_fails_over_for_a_user_bind() -> None:
    # A timeout: the server has answered nothing in receive_timeout; availability wins (and is
    # documented): the next server is asked.
    pool = ScriptedPool([A, B])
    hung = LinkBroken("timed out", timeout=True, sent=True)
    assert run(pool, BIND, [hung]) == ([A, B], "answered")


# ---------------------------------------------------------------------------------------------
# Where the flag comes from: Link
# ---------------------------------------------------------------------------------------------


class _Conn:
    """What Link uses of an ldap3 connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket, self.closed = sock, False

    def unbind(self) -> None:
        self.socket.close()


def _link(sock: socket.socket) -> Link:
    link = Link(_Conn(sock), server=None)  # type: ignore[arg-type]
    link.settimeout(2.0)
    return link


def test_a_link_says_whether_the_request_went_out_before_it_broke() -> None:
    ours, theirs = socket.socketpair()
    try:
        # The server reads the bind, then closes: the request was sent.
        reader = threading.Thread(target=lambda: (theirs.recv(65536), theirs.close()))
        reader.start()
        with pytest.raises(LinkBroken) as broken:
            _link(ours).bind("cn=someone", "a-password")
        reader.join()
        assert (broken.value.sent, broken.value.timeout) == (True, False)
    finally:
        ours.close()
        theirs.close()
    ours, theirs = socket.socketpair()
    try:
        ours.shutdown(socket.SHUT_WR)  # nothing can go out
        with pytest.raises(LinkBroken) as broken:
            _link(ours).bind("cn=someone", "a-password")
        assert broken.value.sent is False
    finally:
        ours.close()
        theirs.close()
