"""Overload and broken plugins, through a real ``authgw serve`` (issue 10 items 1 and 3).

A slow plugin (it sleeps, holding a chain thread, as a slow directory does) gives a capacity
that depends on its sleep, not on this machine's speed, so the tests can count instead of time.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from support.fakedist import make_dist
from support.gateway import write_conf
from support.http import basic, request
from support.net import wait_for

PASSWORD = "Corr3ct-Horse-Battery"

PLUGINS = {"slow_plugins.py": '''
    import logging
    import time
    from gateway import Decision, Identity, Outcome, PluginSettings, hookimpl

    class SlowSettings(PluginSettings):
        sleep: float = 0.2

    class Slow:
        """Accepts everyone after sleeping (a slow directory)."""
        Settings = SlowSettings

        def __init__(self, settings, context):
            self.sleep = settings.sleep
            self.name = context.name

        @hookimpl
        def gateway_authenticate(self, attempt):
            time.sleep(self.sleep)
            user = attempt.username or "anonymous"
            return Decision.allow(Identity(subject=user, username=user, method=self.name), step=self.name)

    class Hang:
        """Answers nothing for a long time (a hanging directory, which passes when down)."""
        Settings = SlowSettings
        passes_when_unavailable = True

        def __init__(self, settings, context):
            self.sleep = settings.sleep

        @hookimpl
        def gateway_authenticate(self, attempt):
            logging.getLogger("authgw.test").warning("hang: call entered")
            time.sleep(self.sleep)

    class HangingPolicy(Hang):
        """A deny list whose backend hangs: it may refuse, so it is never skipped."""
        passes_when_unavailable = False

        @hookimpl
        def gateway_authenticate(self, attempt):
            logging.getLogger("authgw.test").warning("policy: call entered")
            time.sleep(self.sleep)
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step="policy", reason="policy.denied")

    class Exits:
        def __init__(self, settings, context):
            pass

        @hookimpl
        def gateway_authenticate(self, attempt):
            raise SystemExit(3)

    class Interrupts:
        def __init__(self, settings, context):
            pass

        @hookimpl
        def gateway_authenticate(self, attempt):
            raise KeyboardInterrupt
'''}


@pytest.fixture
def slow_env(tmp_path):
    site = make_dist(tmp_path / "site", "slow-plugins", {
        "slow": "slow_plugins:Slow", "hang": "slow_plugins:Hang", "policy": "slow_plugins:HangingPolicy",
        "exits": "slow_plugins:Exits", "interrupts": "slow_plugins:Interrupts"}, PLUGINS)
    return {"PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def conf(conf_dir, alice_hash, gateway_yaml: str, plugins: str = ""):
    return write_conf(conf_dir, {
        "gateway.yaml": gateway_yaml + "\nthrottle:\n  enabled: false\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n" + plugins,
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{alice_hash}"\n',
    })


def burst(gw, clients: int, per_client: int) -> list[tuple[int, float, str | None, str | None]]:
    """*clients* threads each sending *per_client* logins, one after the other (bounded count):
    (status, seconds, Retry-After, X-Request-Id) per response."""
    results: list[tuple[int, float, str | None, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            started = time.monotonic()
            try:
                r = request(gw.url, "GET", "/auth", {"Authorization": basic("alice", PASSWORD)}, timeout=30)
                item = (r.status, time.monotonic() - started, r.header("Retry-After"), r.header("X-Request-Id"))
            except OSError:
                item = (0, time.monotonic() - started, None, None)
            with lock:
                results.append(item)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_excess_work_is_refused_at_once_and_goodput_holds(conf_dir, alice_hash, start_gateway, slow_env):
    # 2 threads x 0.2 s: ~10 logins/s. 40 clients keep ~40 attempts offered; an unbounded queue
    # made each wait 40 x 0.2 / 2 = 4 s, past the 3 s deadline: every one failed (collapse).
    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [slow]\nthreads: 2\ndeadline: 3\nlimits:\n  queue: 2\n",
                            "slow:\n  sleep: 0.2\n"), env=slow_env)
    results = burst(gw, clients=40, per_client=8)
    assert len(results) == 320 and all(status in (200, 503) for status, *_ in results), [r for r in results if r[0] not in (200, 503)]
    ok = [seconds for status, seconds, *_ in results if status == 200]
    refused = [(seconds, retry) for status, seconds, retry, _ in results if status == 503]
    # Retry-After: 1 s (limits.retry_after), longer once refusals pass limits.overload_refusals a
    # second (up to limits.max_hold), as each refused connection's next request waits that long.
    assert refused and all(1 <= int(retry) <= 10 for _, retry in refused), refused
    # No collapse: attempts were served throughout, and every one admitted was served (none ran
    # out its deadline in the queue, as all of them did with the unbounded queue).
    assert len(ok) >= 4
    audit = gw.audit()
    reasons = {line["reason"] for line in audit if line["outcome"] == "unavailable"}
    assert reasons == {"overloaded"}, reasons
    # Refusals are decided at once, without waiting for a thread: far quicker than a login (the
    # gateway's own latency from the audit lines; the clients' threads add their own delays).
    refusal_ms = [line["latency_ms"] for line in audit if line["reason"] == "overloaded"]
    login_ms = [line["latency_ms"] for line in audit if line["outcome"] == "success"]
    assert statistics.median(refusal_ms) * 4 < statistics.median(login_ms)
    # Recovery: once the burst is over, the next login is served.
    assert gw.auth("alice", PASSWORD).status == 200
    assert "Traceback" not in gw.output()


def test_an_attempt_whose_deadline_passed_in_the_queue_is_not_run(conf_dir, alice_hash, start_gateway, slow_env):
    # One thread, 3 s per attempt, deadline 1 s: the second and third attempts (sent within 2 s
    # of the first) wait in the queue past their deadline; they are answered 503 and never run
    # (exactly one live decision is made, and logged as late: it is not audited a second time).
    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [slow]\nthreads: 1\ndeadline: 1\n",
                            "slow:\n  sleep: 3\n"), env=slow_env)
    results = burst(gw, clients=3, per_client=1)
    assert sorted(status for status, *_ in results) == [503, 503, 503]
    late = "came after the attempt was answered unavailable (deadline_exceeded); not told again"
    wait_for(lambda: late in gw.output(), 20, what="the one attempt that ran")
    time.sleep(3.5)  # long enough for a second one to finish, had it run
    assert gw.output().count(late) == 1, gw.output()
    assert [line["reason"] for line in gw.audit()] == ["deadline_exceeded"] * 3  # one line per attempt


def _stick_two(gw, step: str) -> list[threading.Thread]:
    """Two logins stuck in *step* (a 4-thread, 8-s-deadline gateway), then long enough for the
    step to count as stuck: no call finished for half the deadline. Join the threads after."""
    stuck = [threading.Thread(target=gw.auth, args=("alice", PASSWORD), kwargs={"timeout": 30}) for _ in range(2)]
    for t in stuck:
        t.start()
    wait_for(lambda: gw.output().count(f"{step}: call entered") >= 2, 30, interval=0.05, what="two stuck calls")
    assert gw.output().count(f"{step}: call entered") == 2
    time.sleep(4.5)
    return stuck


def test_a_hanging_step_does_not_take_every_thread(conf_dir, alice_hash, start_gateway, slow_env):
    # `hang` sleeps 40 s per call; with 4 threads it may hold 2. Once two calls are stuck (no call
    # finished for half the 8 s deadline), later attempts skip it and `static` answers them.
    # Without the limit each of them would enter `hang` too and end at the deadline with 503.
    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 4\ndeadline: 8\n",
                            "hang:\n  sleep: 40\n"), env=slow_env)
    stuck = _stick_two(gw, "hang")
    statuses = [gw.auth("alice", PASSWORD).status for _ in range(6)]
    for t in stuck:
        t.join(30)
    assert statuses == [200] * 6, [(x["outcome"], x["reason"], x["latency_ms"]) for x in gw.audit()]
    assert gw.output().count("hang: call entered") == 2  # none of the six waited for `hang`
    assert len([line for line in gw.audit() if line["outcome"] == "success"]) == 6
    assert "chain step 'hang' holds 2 threads and finished no call" in gw.output()


def test_a_hanging_step_that_may_refuse_is_never_skipped(conf_dir, alice_hash, start_gateway, slow_env):
    # The same as above with a deny list in front (it refuses alice once it answers): skipping it
    # would let `static` accept her. Saturated, it refuses every attempt (503), never a 200.
    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [policy, static]\nthreads: 4\ndeadline: 8\n",
                            "policy:\n  sleep: 40\n"), env=slow_env)
    stuck = _stick_two(gw, "policy")
    answers = [gw.auth("alice", PASSWORD) for _ in range(4)]
    for t in stuck:
        t.join(30)
    assert [r.status for r in answers] == [503] * 4
    assert all(r.headers.get("Retry-After") for r in answers)
    refused = [line for line in gw.audit() if line["reason"] == "step_saturated"]
    assert len(refused) == 4 and {line["step"] for line in refused} == {"policy"}
    assert not [line for line in gw.audit() if line["outcome"] == "success"]
    assert gw.output().count("policy: call entered") == 2  # none of the four waited for it
    assert "attempts are refused as unavailable" in gw.output()


@pytest.mark.parametrize("plugin, exception", [("exits", "SystemExit"), ("interrupts", "KeyboardInterrupt")])
def test_a_plugin_raising_a_base_exception_fails_closed(conf_dir, alice_hash, start_gateway, slow_env, plugin, exception):
    gw = start_gateway(conf(conf_dir, alice_hash, f"chain: [{plugin}, static]\n"), env=slow_env)
    for _ in range(3):
        r = gw.auth("alice", PASSWORD)
        assert r.status == 401
    entry = gw.audit()[-1]
    assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", "internal_error", plugin)
    assert f"plugin '{plugin}' raised {exception}" in gw.output()
    assert gw.proc.poll() is None and gw.get("/healthz").status == 200


def test_queued_work_whose_client_hung_up_is_not_run(conf_dir, alice_hash, start_gateway, slow_env):
    # One thread, held 2 s by `hang` (then `static` says yes). Three clients send a login behind
    # it and close their connections at once, as a proxy that gave up or a load generator that
    # stopped does: their attempts are dropped unrun (`client_gone`), so the burst leaves no
    # backlog; before, each of them entered `hang` in turn and the next real login waited 6 s.
    import socket

    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 1\ndeadline: 10\n"
                            "limits:\n  step_concurrency: 1\n", "hang:\n  sleep: 2\n"), env=slow_env)
    first: list[int] = []
    holder = threading.Thread(target=lambda: first.append(gw.auth("alice", PASSWORD, timeout=30).status))
    holder.start()
    wait_for(lambda: "hang: call entered" in gw.output(), 30, interval=0.02, what="the stuck call")
    assert gw.output().count("hang: call entered") == 1
    raw = (f"GET /auth HTTP/1.1\r\nHost: x\r\nAuthorization: {basic('alice', PASSWORD)}\r\n\r\n").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(raw)
            time.sleep(0.1)  # the request is read and queued; then the client hangs up (FIN)
    holder.join(30)
    assert first == [200]
    # each dropped attempt audits itself when a thread reaches it
    wait_for(lambda: len(gw.audit()) >= 4, 30, interval=0.05, what="four audit lines")
    reasons = sorted(line["reason"] or line["outcome"] for line in gw.audit())
    assert reasons == ["client_gone"] * 3 + ["success"], gw.audit()
    assert gw.output().count("hang: call entered") == 1  # none of the three ran
    assert gw.auth("alice", PASSWORD).status == 200
    assert "Traceback" not in gw.output() and "ERROR" not in gw.output()


def _metric(gw, name: str) -> float | None:
    for line in gw.get("/metrics").body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _one_running_one_queued(gw) -> list[threading.Thread]:
    """Fill a one-thread, one-slot-queue gateway whose chain starts with `hang`: one login on the
    thread, one queued; every further login is refused `overloaded`. Join the threads returned."""
    background = [threading.Thread(target=gw.auth, args=("alice", PASSWORD), kwargs={"timeout": 60})
                  for _ in range(2)]
    background[0].start()
    wait_for(lambda: "hang: call entered" in gw.output(), 30, interval=0.05, what="the running attempt")
    background[1].start()  # only now: sent together, the second could find the first still queued
    wait_for(lambda: _metric(gw, "authgw_attempts_in_flight") == 2, 30, interval=0.05,
             what="one attempt running, one queued")
    return background


def test_a_password_check_whose_client_left_while_it_waited_for_its_turn_is_not_run(conf_dir, alice_hash,
                                                                                  start_gateway):
    # Four chain threads but one password check at a time (limits.hash_concurrency). `slow`'s
    # own hash costs seconds (argon2id takes its cost from the hash). Three clients send alice's
    # login behind it, each on a free thread, and hang up while their check waits for its turn:
    # when the turn comes, the check is skipped (`client_gone`). Before, sixteen checks ran at
    # once on two cores, and after a burst the next login waited for every one of them.
    import socket

    from argon2 import PasswordHasher, Type

    slow_hash = PasswordHasher(time_cost=400, memory_cost=8 * 1024, parallelism=1, type=Type.ID).hash("slow-pw")
    gw = start_gateway(write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\nthreads: 4\ndeadline: 30\nthrottle:\n  enabled: false\n"
                        "limits:\n  hash_concurrency: 1\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{alice_hash}"\n'
                            f'  slow:\n    password_hash: "{slow_hash}"\n',
    }))
    first: list[int] = []
    holder = threading.Thread(target=lambda: first.append(gw.auth("slow", "slow-pw", timeout=60).status))
    holder.start()
    wait_for(lambda: _metric(gw, "authgw_attempts_in_flight") == 1, 30, interval=0.05, what="the slow check")
    raw = (f"GET /auth HTTP/1.1\r\nHost: x\r\nAuthorization: {basic('alice', PASSWORD)}\r\n\r\n").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(raw)
            time.sleep(0.1)  # read, on a thread, waiting for the one check slot; then the client hangs up
    holder.join(60)
    assert first == [200]
    wait_for(lambda: len(gw.audit()) >= 4, 30, interval=0.05, what="four audit lines")
    assert sorted(line["reason"] or line["outcome"] for line in gw.audit()) == ["client_gone"] * 3 + ["success"]
    assert gw.auth("alice", PASSWORD).status == 200
    assert "Traceback" not in gw.output()


def test_a_refused_connection_waits_its_retry_after_and_a_closed_one_is_let_go(conf_dir, alice_hash,
                                                                              start_gateway, slow_env):
    # One thread, held by `hang`, one attempt queued: every other login is refused `overloaded`.
    # Past limits.overload_refusals (0.5 a second: one turn every 2 s) the refused connections'
    # next requests are given turns, up to limits.max_hold, and Retry-After says when.
    import http.client
    import socket

    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 1\ndeadline: 20\n"
                            "limits:\n  queue: 1\n  overload_refusals: 0.5\n  max_hold: 10\n"
                            "  max_connections_per_client: 8\n", "hang:\n  sleep: 4\n"), env=slow_env)
    background = _one_running_one_queued(gw)
    connections, retry = [], []
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("GET", "/auth", headers={"Authorization": basic("alice", PASSWORD)})
        r = conn.getresponse()
        r.read()
        assert r.status == 503
        connections.append(conn)
        retry.append(int(r.headers["Retry-After"]))
    assert retry[0] == 1 and retry == sorted(retry) and 5 <= retry[-1] <= 10, retry
    # The first connection resends at once: its request is answered no sooner than it was told.
    started = time.monotonic()
    connections[0].request("GET", "/healthz")
    r = connections[0].getresponse()
    r.read()
    assert r.status == 200 and time.monotonic() - started >= 0.5
    # The others hang up while held: they are let go at once, not kept open (and counted against
    # max_connections_per_client, 8 with the two logins above) until their turn, seconds away.
    for conn in connections:
        conn.close()

    def six_new_connections_served() -> bool:
        socks = []
        try:
            for _ in range(6):
                sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
                socks.append(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return all(sock.recv(12).startswith(b"HTTP/1.1 200") for sock in socks)
        except OSError:
            return False
        finally:
            for sock in socks:
                sock.close()
    wait_for(six_new_connections_served, 4, interval=0.2, what="the closed held connections let go")
    for thread in background:
        thread.join(60)
    assert "Traceback" not in gw.output()


def test_a_trusted_proxys_connection_is_not_held_after_a_refusal(conf_dir, alice_hash, start_gateway, slow_env):
    # A proxy's keep-alive connection carries other clients' requests: holding it after one
    # client's 503 delayed the next user's request (and health checks) by Retry-After or more.
    import http.client

    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 1\ndeadline: 20\n"
                            "trusted_proxies: [127.0.0.1/32]\nlimits:\n  queue: 1\n  retry_after: 5\n",
                            "hang:\n  sleep: 3\n"), env=slow_env)
    background = _one_running_one_queued(gw)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("GET", "/auth", headers={"Authorization": basic("alice", PASSWORD), "X-Forwarded-For": "192.0.2.1"})
    r = conn.getresponse()
    r.read()
    assert (r.status, r.headers["Retry-After"]) == (503, "5")
    started = time.monotonic()
    conn.request("GET", "/healthz", headers={"X-Forwarded-For": "192.0.2.2"})
    r = conn.getresponse()
    r.read()
    # Not held for Retry-After (the bug held it that long or more): a bound on a wait, with slack
    # for a loaded machine, not a benchmark.
    assert r.status == 200 and time.monotonic() - started < 5, time.monotonic() - started
    conn.close()
    for thread in background:
        thread.join(60)


def test_a_held_request_is_answered_when_a_reload_retires_its_connection(conf_dir, alice_hash, start_gateway,
                                                                         slow_env):
    # A refused connection is held 30 s (Retry-After); its client resends at once. A reload
    # retires the generation that holds it: the held request is read and answered then (with
    # Connection: close), not dropped with the connection as an idle one would be.
    import http.client
    import os
    import signal

    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 1\ndeadline: 20\n"
                            "limits:\n  queue: 1\n  retry_after: 30\n  max_hold: 30\n", "hang:\n  sleep: 3\n"),
                       env=slow_env)
    background = _one_running_one_queued(gw)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    conn.request("GET", "/auth", headers={"Authorization": basic("alice", PASSWORD)})
    r = conn.getresponse()
    r.read()
    assert (r.status, r.headers["Retry-After"]) == (503, "30")
    conn.request("GET", "/healthz")
    os.kill(gw.proc.pid, signal.SIGHUP)
    r = conn.getresponse()
    assert r.status == 200 and r.headers.get("Connection", "").lower() == "close"
    r.read()
    conn.close()
    wait_for(lambda: " reloaded " in gw.output(), 30, what="the reload")
    for thread in background:
        thread.join(60)
    assert gw.auth("alice", PASSWORD).status == 200


def test_pipelined_refusals_keep_what_the_client_sends_next(conf_dir, alice_hash, start_gateway, slow_env):
    # Two logins pipelined in one packet are both refused; the first refusal starts the hold, the
    # second must not start another over it (that dropped the bytes held so far). A request sent
    # right after them is answered once the hold ends, and the stream stays in step.
    import socket

    gw = start_gateway(conf(conf_dir, alice_hash, "chain: [hang, static]\nthreads: 1\ndeadline: 20\n"
                            "limits:\n  queue: 1\n", "hang:\n  sleep: 3\n"), env=slow_env)
    background = _one_running_one_queued(gw)
    login = (f"GET /auth HTTP/1.1\r\nHost: x\r\nAuthorization: {basic('alice', PASSWORD)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(login + login)
        received = b""
        while received.count(b"HTTP/1.1 503") < 2:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        while b"HTTP/1.1 200" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 3
    for thread in background:
        thread.join(60)
