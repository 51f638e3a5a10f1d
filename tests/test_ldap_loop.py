"""LDAP logins decided on the event loop, without a chain thread (issue 15).

A chain whose steps are all ``loop_capable`` (the ldap plugin) and whose wrappers are all
``loop_safe(live=True)`` runs on the event loop, each wait for the directory parking the
attempt's greenlet (gateway/aio.py). In-process, over the real core and the real ldap plugin
against a real slapd (plain, LDAPS and StartTLS): the loop keeps serving while a login waits,
failover and timeouts hold there (a server dribbling its answer gets ``receive_timeout`` in all,
on both paths), at most ``threads`` logins run on the loop at once (the rest go to the pool, whose
bounded queue refuses the excess), connects that hang do not fill the loop's default executor, a
cancelled login is audited as ``client_gone``, and chains with a blocking wrapper or step stay on
the pool.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading

import pytest

from gateway import Outcome, hookimpl
from support.chainhelp import attempt, build
from support.pki import CA
from support.slapd import Slapd

LDAP = "gateway.plugins.ldap:LdapPlugin"
PASSWORD = "erin-pw"


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=CA.create()).start()
    slapd.add_user("erin", PASSWORD, cn="Erin", mail="erin@example.com", groups=["ops"])
    yield slapd
    slapd.stop()


@pytest.fixture
def hung():
    """A server that accepts TCP and never answers (the kernel completes the handshakes)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"ldap://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


class Dribbler:
    """A server that answers every connection with the start of an LDAP message, one byte every
    0.2 s, up to 50 bytes: never a whole answer, never silent for long. Counts what it sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"ldap://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)  # the request
            answer = b"\x30\x84\x00\x00\x10\x00" + bytes(44)  # a 4 KiB message, announced
            sent = 0
            for byte in answer:
                readable, _, _ = select.select([conn], [], [], 0.2)
                if readable and not conn.recv(1):  # the client hung up
                    break
                try:
                    conn.sendall(bytes((byte,)))
                except OSError:
                    break
                sent += 1
            self.sent.append(sent)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(15)


class Spy:
    """Notes, per attempt, the thread it was decided on and the decision."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}
        self.decisions: dict[str, object] = {}

    @hookimpl
    def gateway_auth_finished(self, attempt, decision) -> None:
        self.threads[attempt.request_id] = threading.current_thread().name
        self.decisions[attempt.request_id] = decision


def runtime(tmp_path, ldap: dict, chain=("ldap",), plugins=(), targets=None, sections=None, **core):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rt = build(tmp_path, {"chain": list(chain), "plugins": list(plugins), **core},
               {"ldap": ldap, **(sections or {})}, targets={"ldap": LDAP, **(targets or {})})
    spy = Spy()
    rt.gateway.pm.register(spy, name="spy")
    return rt, spy


def run(rt, coro, loop: str = "asyncio"):
    async def main():
        try:
            return await coro
        finally:
            rt.gateway.pm.hook.gateway_shutdown()  # the pooled links, closed on their loop
    if loop == "uvloop":  # the loop `authgw serve` runs (event_loop: auto)
        return pytest.importorskip("uvloop").run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["plain", "ldaps", "starttls"])
def test_ldap_logins_are_decided_on_the_event_loop(directory, tmp_path, mode):
    rt, spy = runtime(tmp_path, directory.plugin_settings(mode))
    assert rt.gateway.live_on_loop()
    right, wrong, unknown = attempt("erin", PASSWORD), attempt("erin", "nope"), attempt("nobody", PASSWORD)
    again = attempt("erin", PASSWORD)  # over the pooled links the first logins left

    async def logins():
        return [await rt.gateway.authenticate(a) for a in (right, wrong, unknown, again)]

    ok, refused, missing, pooled = run(rt, logins())
    assert ok.outcome is Outcome.SUCCESS and ok.identity.groups == ("ops",) and ok.identity.email == "erin@example.com"
    assert (refused.outcome, refused.reason) == (Outcome.INVALID_CREDENTIALS, "ldap.invalid_password")
    assert (missing.outcome, missing.reason) == (Outcome.USER_NOT_FOUND, "ldap.user_not_found")
    assert pooled.outcome is Outcome.SUCCESS
    main = threading.main_thread().name
    assert [spy.threads[a.request_id] for a in (right, wrong, unknown, again)] == [main] * 4
    assert not rt.gateway.pool._started  # no chain thread was ever needed


def test_the_loop_serves_others_while_a_login_waits_for_a_hung_server_then_fails_over(directory, tmp_path, hung):
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain", servers=[hung, directory.url],
                                                          receive_timeout=2.0, connect_timeout=2.0))

    async def scenario():
        login = asyncio.ensure_future(rt.gateway.authenticate(attempt("erin", PASSWORD)))
        ticks = 0
        while ticks < 10:  # a blocked loop would run none of these before the login ended
            await asyncio.sleep(0.01)
            ticks += 1
        waiting = not login.done()
        return waiting, await login, await rt.gateway.authenticate(attempt("erin", PASSWORD))

    waiting, first, second = run(rt, scenario())
    assert waiting
    assert first.outcome is Outcome.SUCCESS and second.outcome is Outcome.SUCCESS
    servers = {c.name: c for c in rt.gateway.pm.get_plugin("ldap").gateway_readiness()}
    assert not servers[f"ldap.server[{hung}]"].ready and "timed out" in servers[f"ldap.server[{hung}]"].detail
    assert servers[f"ldap.server[{directory.url}]"].detail == "active"


def test_a_lone_hung_server_is_unavailable_not_a_wrong_password(directory, tmp_path, hung):
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain", servers=[hung], receive_timeout=0.5,
                                                          connect_timeout=0.5))
    late = attempt("erin", PASSWORD)
    decision = run(rt, rt.gateway.authenticate(late))
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "ldap.unavailable")
    assert spy.threads[late.request_id] == threading.main_thread().name


@pytest.mark.parametrize("chain", [("ldap",), ("policy", "ldap")], ids=["loop", "pool"])
def test_a_server_dribbling_its_answer_gets_the_receive_timeout_in_all_not_per_byte(directory, tmp_path, chain):
    dribbler = Dribbler()
    try:
        settings = directory.plugin_settings("plain", servers=[dribbler.url], receive_timeout=1.0, bind_dn=None,
                                             bind_password=None, direct_bind="uid={username},ou=people,dc=example,dc=com")
        rt, spy = runtime(tmp_path, settings, chain=chain,
                          sections={"policy": {"action": "abstain"}} if "policy" in chain else None)
        decision = run(rt, rt.gateway.authenticate(attempt("erin", PASSWORD)))
    finally:
        dribbler.close()
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "ldap.unavailable")
    # ~5 bytes in the 1 s the answer may take; a timeout per read would have taken all 50 (10 s)
    assert dribbler.sent and dribbler.sent[0] < 25


def test_at_most_threads_logins_run_on_the_loop_the_others_on_the_pool(directory, tmp_path):
    rt, spy = runtime(tmp_path, directory.plugin_settings("ldaps"), threads=2, limits={"queue": 20})
    attempts = [attempt("erin", PASSWORD) for _ in range(12)]

    async def together():
        return await asyncio.gather(*(rt.gateway.authenticate(a) for a in attempts))

    decisions = run(rt, together())
    assert all(d.outcome is Outcome.SUCCESS for d in decisions)
    threads = [spy.threads[a.request_id] for a in attempts]
    # the first two started before any finished: on the loop; the ten after them on the pool
    assert threads[:2] == [threading.main_thread().name] * 2
    assert all(name.startswith("authgw-chain") for name in threads[2:])


def test_a_hung_directory_fills_the_loop_then_the_pool_and_the_excess_is_refused_at_once(directory, tmp_path, hung):
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain", servers=[hung], receive_timeout=2.0),
                      threads=1, limits={"queue": 1})
    attempts = [attempt("erin", PASSWORD) for _ in range(6)]

    async def burst():
        finished: list = []
        tasks = [asyncio.ensure_future(rt.gateway.authenticate(a)) for a in attempts]
        for task in tasks:
            task.add_done_callback(lambda t: finished.append(t.result()))
        await asyncio.gather(*tasks)
        return finished

    finished = run(rt, burst())
    # one on the loop, one on the pool's only thread, at most one queued (all waiting for the
    # hung server's 2 s); the others are refused at once, before any of those ends
    refused = [d for d in finished if d.reason == "overloaded"]
    assert len(refused) >= 3 and finished[:len(refused)] == refused
    assert all(d.outcome is Outcome.UNAVAILABLE for d in finished)
    assert spy.threads[attempts[0].request_id] == threading.main_thread().name


def test_connects_that_hang_do_not_fill_the_loops_default_executor(tmp_path, hung):
    # LDAPS to a server that never answers the TLS handshake: each connect blocks its thread for
    # connect_timeout. Twelve at once must not hold up other work of the loop's default executor
    # (a network throttle store's calls), nor wait for each other.
    url = hung.replace("ldap://127.0.0.1", "ldaps://localhost")
    rt, spy = runtime(tmp_path, {"preset": "openldap", "base_dn": "dc=example,dc=com", "servers": [url],
                                 "connect_timeout": 1.5, "receive_timeout": 1.0,
                                 "direct_bind": "uid={username},ou=people,dc=example,dc=com"})

    async def scenario():
        loop = asyncio.get_running_loop()
        finished: list[str] = []
        logins = [asyncio.ensure_future(rt.gateway.authenticate(attempt("erin", PASSWORD))) for _ in range(12)]
        for task in logins:
            task.add_done_callback(lambda t: finished.append(t.result().reason))
        await asyncio.sleep(0.2)  # the connects have started
        other = loop.run_in_executor(None, lambda: "other work")
        other.add_done_callback(lambda f: finished.append(f.result()))
        await asyncio.gather(*logins, other)
        return finished

    finished = run(rt, scenario())
    assert finished[0] == "other work"
    assert finished[1:] == ["ldap.unavailable"] * 12


def test_a_login_cancelled_while_it_waits_is_audited_as_client_gone(directory, tmp_path, hung, caplog):
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain", servers=[hung], receive_timeout=3.0))
    gone = attempt("erin", PASSWORD)

    async def scenario():
        login = asyncio.ensure_future(rt.gateway.authenticate(gone))
        await asyncio.sleep(0.3)
        login.cancel()
        with pytest.raises(asyncio.CancelledError):
            await login
        return rt.gateway._live_running

    with caplog.at_level(logging.INFO):
        running = run(rt, scenario())
    decision = spy.decisions[gone.request_id]
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "client_gone")
    assert running == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_blocking_wrapper_or_step_keeps_ldap_logins_on_the_pool(directory, tmp_path):
    # the credential cache's wrapper hashes the password of a live success: not for the loop
    cached, spy = runtime(tmp_path / "cache", directory.plugin_settings("ldaps"), plugins=("cache",),
                          targets={"cache": "gateway.plugins.cache:CachePlugin"},
                          sections={"cache": {"hot": {"enabled": True, "ttl": 60}}})
    assert not cached.gateway.live_on_loop()
    first = attempt("erin", PASSWORD)
    assert run(cached, cached.gateway.authenticate(first)).outcome is Outcome.SUCCESS
    assert spy.threads[first.request_id].startswith("authgw-chain")
    # a step that did not say it is loop_capable may block: the whole chain stays on the pool
    mixed, spy = runtime(tmp_path / "mixed", directory.plugin_settings("ldaps"), chain=("policy", "ldap"),
                         sections={"policy": {"action": "abstain"}})
    assert not mixed.gateway.live_on_loop()
    second = attempt("erin", PASSWORD)
    assert run(mixed, mixed.gateway.authenticate(second)).outcome is Outcome.SUCCESS
    assert spy.threads[second.request_id].startswith("authgw-chain")


def pooled_links(rt) -> list:
    pool = rt.gateway.pm.get_plugin("ldap").pool
    return [link for server in pool.servers for queue in server.idle.values() for link in queue]


def registered(loop, fd: int) -> bool:
    """Whether *loop* watches *fd* for reading (asking takes the registration away)."""
    return loop.remove_reader(fd)


@pytest.mark.parametrize("mode,loop", [("plain", "asyncio"), ("ldaps", "asyncio"), ("plain", "uvloop")])
def test_a_pooled_link_stays_watched_until_its_server_closes_it_then_the_loop_lets_it_go(tmp_path, mode, loop):
    # Between logins a pooled link's socket stays registered with the loop (no add_reader and
    # remove_reader per answer). The server closing it while it is idle makes it readable with
    # nobody waiting: the loop must drop the registration (else an unread socket would wake it
    # on every turn) and the next login must take a fresh link.
    slapd = Slapd(tmp_path / "slapd", tls=CA.create() if mode == "ldaps" else None).start()
    try:
        slapd.add_user("erin", PASSWORD, groups=["ops"])
        rt, spy = runtime(tmp_path / "gw", slapd.plugin_settings(mode))

        async def scenario():
            loop = asyncio.get_running_loop()
            first = await rt.gateway.authenticate(attempt("erin", PASSWORD))
            links = pooled_links(rt)
            watched = [link._watched_by is loop for link in links]
            await loop.run_in_executor(None, slapd.restart)
            for _ in range(200):  # the FINs arrive within milliseconds; bounded either way
                if all(link._watched_by is None for link in links):
                    break
                await asyncio.sleep(0.01)
            let_go = [link._watched_by is None and not registered(loop, link._watched_fd) for link in links]
            second = await rt.gateway.authenticate(attempt("erin", PASSWORD))
            return first, watched, let_go, second, links, pooled_links(rt)

        first, watched, let_go, second, before, after = run(rt, scenario(), loop)
    finally:
        slapd.stop()
    assert first.outcome is Outcome.SUCCESS and second.outcome is Outcome.SUCCESS
    assert len(before) == 2 and watched == [True, True]  # the service link and the bind link
    assert let_go == [True, True]
    assert not set(map(id, before)) & set(map(id, after))  # the closed ones were dropped, not used


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_link_closed_from_a_chain_thread_is_let_go_by_its_loop_before_its_socket_closes(directory, tmp_path, loop):
    # The registration must go before the socket closes: left behind, the loop would watch a
    # descriptor number the next socket may get (libuv aborts the process on such a mix-up).
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain"))

    async def scenario():
        loop = asyncio.get_running_loop()
        assert (await rt.gateway.authenticate(attempt("erin", PASSWORD))).outcome is Outcome.SUCCESS
        link = pooled_links(rt)[0]
        fd, sock = link._watched_fd, link.conn.socket
        assert link._watched_by is loop
        closer = threading.Thread(target=link.close)
        closer.start()
        await loop.run_in_executor(None, closer.join)
        for _ in range(100):
            if sock.fileno() == -1:
                break
            await asyncio.sleep(0.01)
        return sock.fileno(), link._watched_by, registered(loop, fd)

    fileno, watched_by, still_registered = run(rt, scenario(), loop)
    assert fileno == -1 and watched_by is None and not still_registered


def test_a_link_coming_back_after_its_pool_closed_is_closed_not_kept(directory, tmp_path):
    # a login in flight when a reload or a stop closes the plugin's pool: its links are not
    # kept by the closed pool (open, and watched by the loop, for as long as the process runs)
    rt, spy = runtime(tmp_path, directory.plugin_settings("plain"))

    async def scenario():
        assert (await rt.gateway.authenticate(attempt("erin", PASSWORD))).outcome is Outcome.SUCCESS
        pool = rt.gateway.pm.get_plugin("ldap").pool
        server = pool.servers[0]
        link = pool._take_idle(server, "bind")  # as an operation in flight holds it
        pool.close()
        pool._release(link, "bind")
        return link.conn.closed, pooled_links(rt)

    closed, kept = run(rt, scenario())
    assert closed and kept == []
