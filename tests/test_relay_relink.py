"""A link that drops and is dialled again (a network blip; a connector held up past the relay's
pong deadline, as a loaded machine did in CI): a login that reaches the relay in between waits
a moment for the link instead of failing with ``relay.no_connector``, and gets its answer; with
no link back within ``relink_wait`` of the loss, it is ``relay.no_connector`` as before.

With several relay instances sharing Redis the wait is every instance's: the connector dials
again through a load balancer (:class:`Balancer`, in front of real relay processes) and may land
on another instance. The instance that lost the link used to wait for it locally only, and fail
the login although the link was back at the other one; an instance that never held the link
failed it at once. Now both wait (within ``relink_wait`` of the loss, known to all through Redis)
until the link is ready anywhere, then send the login there."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

import pytest

from support.linkenv import Connector, Relay
from support.net import free_port, wait_for
from support.redis import RedisServer
from support.slapd import Slapd

PASSWORD = "Alice-Passw0rd-relinked"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", PASSWORD, cn="Alice A")
    yield server
    server.stop()


@pytest.fixture
def linked(tmp_path, slapd, request):
    # A long wait where the link must come back in it, however loaded the machine; 1 s where not.
    relay = Relay(tmp_path / "relay", cache=False, settings={"relink_wait": request.param}).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
    connector.start()
    try:
        connector.wait_linked(relay, timeout=60)
        yield relay, connector
    finally:
        os.kill(connector.process.proc.pid, signal.SIGCONT)
        connector.stop()
        relay.stop()


def _answer(relay: Relay) -> tuple[int, str]:
    response = relay.login("alice", PASSWORD)
    return response.status, response.json()["reason"]


def _frozen_until_the_relay_drops_it(relay: Relay, connector: Connector) -> None:
    # Stopped, the connector answers no ping: the relay closes the link within ~1.5 ping
    # intervals (1 s here) and takes it out of routing.
    os.kill(connector.process.proc.pid, signal.SIGSTOP)
    wait_for(lambda: relay.ready_links() == "", timeout=60, interval=0.05, what="the relay to drop the link",
             log=relay.process.output)


@pytest.mark.parametrize("linked", [30.0], indirect=True)
def test_a_login_during_a_relink_waits_for_the_link(linked):
    relay, connector = linked
    assert _answer(relay) == (200, "")
    _frozen_until_the_relay_drops_it(relay, connector)
    answers: list[tuple[int, str]] = []
    login = threading.Thread(target=lambda: answers.append(_answer(relay)))
    login.start()
    # The login is held at the relay (no link); the connector resumes, finds its link closed and
    # dials again (backoff 0.2 s), and the held login goes over the new link.
    wait_for(lambda: "authgw_attempts_in_flight 1.0" in relay.process.get("/metrics").text, timeout=30,
             interval=0.05, what="the login held at the relay", log=relay.process.output)
    os.kill(connector.process.proc.pid, signal.SIGCONT)
    login.join(60)
    assert answers == [(200, "")], relay.process.output()[-3000:]


@pytest.mark.parametrize("linked", [1.0], indirect=True)
def test_without_a_link_back_in_time_it_is_no_connector(linked):
    relay, connector = linked
    _frozen_until_the_relay_drops_it(relay, connector)
    assert _answer(relay) == (503, "relay.no_connector")  # the link not back within the wait
    os.kill(connector.process.proc.pid, signal.SIGCONT)
    connector.wait_linked(relay, timeout=60)
    assert _answer(relay) == (200, "")


# -- several relay instances sharing Redis: the connector comes back at another one ---------------


class Balancer:
    """A TCP load balancer in front of the relay instances, at the connectors' link URL: a new
    connection goes to its current backend (a relay's port), or is held, unanswered, while it has
    none (:meth:`route_to` ``None``) until one is set. :meth:`cut` closes every connection it
    carries, which is how the instance holding the link loses it (the connector sees its link
    closed too, and dials again through the balancer at once)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._backend: int | None = None
        self._held: list[socket.socket] = []
        self._carried: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def route_to(self, port: int | None) -> None:
        with self._lock:
            self._backend = port
            held, self._held = ([], self._held) if port is not None else (self._held, [])
        for client in held:
            self._join(client, port)

    def cut(self) -> None:
        with self._lock:
            carried, self._carried = self._carried, []
        for sock in carried:
            _close(sock)

    def close(self) -> None:
        self._server.close()
        self.cut()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            with self._lock:
                backend = self._backend
                if backend is None:
                    self._held.append(client)
                    continue
            self._join(client, backend)

    def _join(self, client: socket.socket, port: int) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            self._carried += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):  # one side gone: the other is told (no half-open link)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def _instances(tmp_path, slapd, relink_wait: float):
    """Relay instances ``a`` and ``b`` sharing a real redis-server behind one :class:`Balancer`
    (their ``public_url``), and a real connector enrolled and linked at ``a`` through it:
    ``(a, b, balancer, redis, connector)``. The gateway's deadline (10 s) is above
    ``relink_wait`` where the link must come back within it, however loaded the machine."""
    balancer = Balancer()
    redis = RedisServer(tmp_path / "redis").start()
    relays: list[Relay] = []
    connector = None
    try:
        for name in ("a", "b"):
            relays.append(Relay(tmp_path / f"relay-{name}", cache=False, redis_url=redis.url, extra="deadline: 10\n",
                                settings={"public_url": balancer.url, "relink_wait": relink_wait}).setup().start())
        a, b = relays
        balancer.route_to(a.port)
        connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file).start()
        connector.wait_linked(a, timeout=60)
        assert b.ready_links() == ""
        yield a, b, balancer, redis, connector
    finally:
        balancer.close()
        if connector is not None:
            connector.stop()
        for relay in relays:
            relay.stop()
        redis.stop()


def _lose_the_link_at(relay: Relay, balancer: Balancer) -> None:
    """The balancer holds new connections (no backend for a moment) and cuts the link: *relay*
    loses it, and the connector's next dial waits at the balancer until :meth:`Balancer.route_to`."""
    balancer.route_to(None)
    balancer.cut()
    wait_for(lambda: relay.ready_links() == "", timeout=30, interval=0.05, what="the relay to lose the link",
             log=relay.process.output)


def _held_login(relay: Relay) -> tuple[threading.Thread, list[tuple[int, str]]]:
    """A login at *relay* in a thread, once it is seen held there (no link anywhere yet), or answered."""
    answers: list[tuple[int, str]] = []
    login = threading.Thread(target=lambda: answers.append(_answer(relay)))
    login.start()
    wait_for(lambda: answers or "authgw_attempts_in_flight 1.0" in relay.process.get("/metrics").text, timeout=30,
             interval=0.05, what="the login to be held or answered", log=relay.process.output)
    return login, answers


def test_a_login_at_the_instance_that_lost_the_link_goes_to_the_instance_it_came_back_at(tmp_path, slapd):
    with _instances(tmp_path, slapd, relink_wait=8.0) as (a, b, balancer, _, connector):
        assert _answer(a) == (200, "")
        _lose_the_link_at(a, balancer)
        login, answers = _held_login(a)
        assert not answers, answers  # held at a: no link anywhere, within relink_wait of the loss
        balancer.route_to(b.port)  # the connector's dial reaches b
        connector.wait_linked(b, timeout=30)
        login.join(30)
        # a waited for its own link only, which never came back, and failed it after relink_wait
        # (relay.no_connector) although b had the link for most of that time.
        assert answers == [(200, "")], a.process.output()[-3000:]
        assert a.ready_links() == ""  # answered through b
        assert _answer(a) == (200, "")


@pytest.mark.parametrize("back_at", ["a", "b"])
def test_a_login_at_an_instance_that_never_held_the_link_waits_for_it_too(tmp_path, slapd, back_at):
    with _instances(tmp_path, slapd, relink_wait=8.0) as (a, b, balancer, _, connector):
        assert _answer(b) == (200, "")  # forwarded to a
        _lose_the_link_at(a, balancer)
        # b never held the link: it answered relay.no_connector at once, with the connector
        # about to come back.
        login, answers = _held_login(b)
        assert not answers, answers
        back = {"a": a, "b": b}[back_at]
        balancer.route_to(back.port)
        connector.wait_linked(back, timeout=30)
        login.join(30)
        assert answers == [(200, "")], b.process.output()[-3000:]


def test_with_no_link_back_in_the_window_a_login_at_any_instance_is_no_connector(tmp_path, slapd):
    with _instances(tmp_path, slapd, relink_wait=1.0) as (a, b, balancer, redis, connector):
        _lose_the_link_at(a, balancer)
        assert _answer(b) == (503, "relay.no_connector")
        assert _answer(a) == (503, "relay.no_connector")
        # The window was one per loss: it is over for every instance.
        wait_for(lambda: not redis.client().exists("authgw:relay:lost:acme"), timeout=30,
                 what="the loss window to end")
        assert _answer(b) == (503, "relay.no_connector")
        balancer.route_to(b.port)
        connector.wait_linked(b, timeout=30)
        assert _answer(a) == (200, "")
        for relay in (a, b):
            assert "Traceback" not in relay.process.output(), relay.process.output()[-3000:]


def test_with_redis_down_the_wait_is_the_local_one_and_no_error(tmp_path, slapd):
    with _instances(tmp_path, slapd, relink_wait=2.0) as (a, b, balancer, redis, connector):
        redis.stop()
        _lose_the_link_at(a, balancer)
        # Nothing reaches Redis: at a, the wait for its own link (none can be made: the hello is
        # refused without the registry), then unavailable; at b none; an error of the step never.
        assert _answer(a) == (503, "relay.no_connector")
        assert _answer(b) == (503, "relay.no_connector")
        for relay in (a, b):
            output = relay.process.output()
            assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
