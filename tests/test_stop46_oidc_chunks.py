"""Review of stop 46: the token endpoint's failure budget across workers, and a malformed chunk
in the middle of a body. Against a real two-worker ``authgw serve`` with the login door.

- ``/oidc/token`` checked its client's failure budget, compared the secret, and spent a token
  only on a failure: concurrent wrong secrets in two workers all passed the check on the last
  token (a budget of 1 saw 2 secrets compared at 16 of 40 addresses with SQLite, 10 of 40 with
  Redis). A token is now spent before the comparison and given back on a success.
- A chunked body whose framing broke after its headers arrived (a chunk size that is not
  hexadecimal) was answered only when ``limits.body_timeout`` ran out: aiohttp queued the
  parser's error as a request of its own and left the body open. The read now fails at once
  (400, the connection closed, nothing echoed).

No assertion depends on how fast anything runs: the budget allowed each address is computed
from the time its flood took, and ``limits.body_timeout`` is far longer than the socket's wait.
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
import socket
import ssl
import threading
import time

import pytest
import requests

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd

REDIRECT = "https://app.example.test/cb"
SECRET = "s3cret-s3cret-s3cret"
TOKEN = "stop46-api-token"
#: A budget of 1: every flood is decided on its last token (burst 1, then 1 a minute).
BUDGET = 1
ADDRESSES, THREADS, REQUESTS = 40, 16, 6
#: Far longer than any answer takes: an answer that waits for it is no answer (the socket gives up).
BODY_TIMEOUT = 300
WAIT = 60


def settings(sessions: dict | None = None) -> dict:
    return {"sessions": {"requests_per_client": BUDGET, **(sessions or {})},
            "oidc": {"clients": [{"client_id": "app", "redirect_uris": [REDIRECT],
                                  "client_secret": {"env": "APP_SECRET"}}]}}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("stop46ldap") / "slapd").start()
    yield server
    server.stop()


def start_site(base, slapd, sessions: dict | None = None) -> LoginSite:
    core = {"trusted_proxies": ["127.0.0.1/32"], "limits": {"body_timeout": BODY_TIMEOUT},
            "api_tokens": [{"name": "t", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    site = LoginSite(base / "idp", slapd, CA.create(), gateway=core, login=settings(sessions),
                     env={"APP_SECRET": SECRET})
    site.gw = site.start(workers=2)
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    started = start_site(tmp_path_factory.mktemp("stop46"), slapd)
    yield started
    started.stop()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def budget_site(request, tmp_path_factory, slapd, site):
    if request.param == "sqlite":
        yield site
        return
    from support.redis import RedisServer

    base = tmp_path_factory.mktemp("stop46redis")
    redis = RedisServer(base / "redis").start()
    try:
        started = start_site(base, slapd, {"store": "redis", "redis_url": redis.url})
        try:
            yield started
        finally:
            started.stop()
    finally:
        redis.stop()


def no_errors_logged(site: LoginSite) -> None:
    output = site.gw.output()
    assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]


def token_request(session, site, address: str, secret: str):
    return session.post(f"{site.gw.url}/oidc/token", auth=("app", secret),
                        data={"grant_type": "authorization_code", "code": "no-such-code", "redirect_uri": REDIRECT},
                        headers={"X-Forwarded-For": address, "Connection": "close"}, timeout=30)


def compared(site, address: str) -> int:
    """Secrets compared and found wrong for *address* (one ``oidc.invalid_client`` line each)."""
    return len(re.findall(rf"reason=oidc\.invalid_client client_id=app client={re.escape(address)}\n",
                          site.gw.output()))


# -- 1. the failure budget holds across workers ------------------------------------------------------

def test_concurrent_wrong_secrets_in_two_workers_compare_none_past_the_budget(budget_site):
    """Many threads on new connections (the kernel spreads them over both workers) send wrong
    secrets for one address at once, address after address: no address has more secrets
    compared than its budget allowed over the time its flood took."""
    over, statuses = {}, collections.Counter()
    for n in range(ADDRESSES):
        address = f"198.51.100.{n + 1}"
        barrier = threading.Barrier(THREADS)

        def flood(thread: int) -> None:
            session = requests.Session()
            session.trust_env = False
            barrier.wait()
            for k in range(REQUESTS):
                statuses[token_request(session, budget_site, address, f"wrong-{thread}-{k}").status_code] += 1

        threads = [threading.Thread(target=flood, args=(t,)) for t in range(THREADS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # burst, then BUDGET a minute: what the bucket could give while this flood ran
        allowed = math.floor(BUDGET + BUDGET / 60 * (time.monotonic() - started))
        if compared(budget_site, address) > allowed:
            over[address] = (compared(budget_site, address), allowed)
    assert set(statuses) == {401, 429}, statuses
    assert not over, f"secrets compared past the budget (compared, allowed): {over}"
    no_errors_logged(budget_site)


def test_successes_spend_nothing_and_the_refusal_still_comes_before_any_comparison(budget_site):
    """A right secret spends no token of the budget (given back), however many times; a wrong
    one does, and then even the right secret is answered 429, not compared."""
    address = "203.0.113.46"
    session = requests.Session()
    session.trust_env = False
    for _ in range(3 * BUDGET + 2):
        right = token_request(session, budget_site, address, SECRET)
        assert (right.status_code, right.json()["error"]) == (400, "invalid_grant"), right.text  # authenticated
    wrong = token_request(session, budget_site, address, "wrong")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    refused = token_request(session, budget_site, address, SECRET)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1, refused.text
    assert compared(budget_site, address) == 1


def test_the_sqlite_store_gives_a_token_back_atomically_and_never_past_the_burst(tmp_path):
    from gateway.plugins.login.sessions import SqliteStore

    store, other = SqliteStore(tmp_path / "s.sqlite3"), SqliteStore(tmp_path / "s.sqlite3")  # two workers
    try:
        assert [store.take_token("k", 2, 1.0, 100.0) for _ in range(2)] == [0.0, 0.0]
        store.give_back_token("k", 2, 1.0, 100.0)
        assert other.take_token("k", 2, 1.0, 100.0) == 0.0  # the token given back, seen by the other
        assert other.take_token("k", 2, 1.0, 100.0) > 0  # and only it
        store.give_back_token("k", 2, 1.0, 100.0)
        store.give_back_token("k", 2, 1.0, 100.0)
        store.give_back_token("k", 2, 1.0, 100.0)  # more than was spent: full, no more
        assert store.db.execute("SELECT COUNT(*) FROM buckets").fetchone()[0] == 0  # full: no row
        assert [store.take_token("k", 2, 1.0, 100.0) for _ in range(3)][:2] == [0.0, 0.0]
        store.give_back_token("k", 2, 1.0, 99.0)  # a clock stepped back dates the bucket no earlier
        assert store.db.execute("SELECT tokens, at FROM buckets").fetchone() == (1.0, 100.0)
        store.give_back_token("absent", 2, 1.0, 100.0)  # a full bucket (no row) gets nothing
        assert store.db.execute("SELECT COUNT(*) FROM buckets WHERE key = 'absent'").fetchone()[0] == 0
    finally:
        store.close()
        other.close()


def test_the_redis_store_gives_a_token_back_atomically_and_never_past_the_burst(redis_server):
    from gateway.plugins.login.sessions import RedisStore

    store = RedisStore(redis_server.url, 3600)
    try:
        store.redis.delete("authgw:login:b:k")
        slow = 1e-6  # tokens a second: nothing refills while the test runs
        assert [store.take_token("k", 2, slow, 0) for _ in range(2)] == [0.0, 0.0]
        assert store.take_token("k", 2, slow, 0) > 0
        store.give_back_token("k", 2, slow, 0)
        assert store.take_token("k", 2, slow, 0) == 0.0 and store.take_token("k", 2, slow, 0) > 0
        for _ in range(3):
            store.give_back_token("k", 2, slow, 0)  # more than was spent: full, no more
        assert not store.redis.exists("authgw:login:b:k")  # full: the same as no bucket
        store.give_back_token("absent", 2, slow, 0)
        assert not store.redis.exists("authgw:login:b:absent")
        assert [store.take_token("k", 2, slow, 0) for _ in range(3)][:2] == [0.0, 0.0]
        ttl = store.redis.pttl("authgw:login:b:k")
        store.give_back_token("k", 2, slow, 0)
        assert 0 < store.redis.pttl("authgw:login:b:k") < ttl  # one token short: expires when full
    finally:
        store.close()


# -- 2. a malformed chunk after the headers ---------------------------------------------------------------

HEAD = "POST {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Transfer-Encoding: chunked\r\n\r\n"
#: A good chunk, then a chunk size that is not hexadecimal, with bytes that must not be echoed.
BROKEN = b"5\r\nab=cd\r\nZZ-not-hex\r\nleaked-secret-bytes\r\n"


def answer_of(sock) -> tuple[bytes, bool]:
    """Everything read until the server closes (socket timeout: ``WAIT``), and whether it did."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data, True
        except (socket.timeout, TimeoutError):
            return data, False
        if not chunk:
            return data, True
        data += chunk


def broken_body(sock, path: str, headers: str) -> tuple[bytes, bool]:
    sock.sendall(HEAD.format(path=path, headers=headers).encode())
    sock.sendall(b"5\r\nab=cd\r\n")  # the headers and a first chunk are handed to the door
    time.sleep(0.2)  # (not a bound: the door is then reading the body, as a slow client's)
    sock.sendall(BROKEN)
    return answer_of(sock)


def test_the_api_answers_a_malformed_chunk_at_once_and_closes(site):
    with socket.create_connection(("127.0.0.1", site.gw.port), timeout=WAIT) as sock:
        data, closed = broken_body(sock, "/v1/authenticate",
                                   f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    assert closed and data.count(b"HTTP/1.1 ") == 1, data  # one answer, then closed
    assert b"did not arrive in time" not in data and b"leaked" not in data and b"ZZ" not in data
    assert "refused a malformed request body from 127.0.0.1" in site.gw.output()
    assert "leaked" not in site.gw.output()
    no_errors_logged(site)


@pytest.mark.parametrize("path, json", [("/oidc/token", True), ("/login", False)])
def test_the_login_doors_forms_answer_a_malformed_chunk_at_once_and_close(site, path, json):
    context = ssl.create_default_context(cafile=str(site.ca_file))
    raw = socket.create_connection(("127.0.0.1", site.port), timeout=WAIT)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        data, closed = broken_body(sock, path, "Content-Type: application/x-www-form-urlencoded\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    assert closed and data.count(b"HTTP/1.1 ") == 1, data
    if json:
        assert b'"unreadable body"' in data, data
    assert b"leaked" not in data and b"ZZ" not in data
    output = site.gw.output()
    assert "unreadable body: MalformedBody" in output and "leaked" not in output
    no_errors_logged(site)
