"""A console session lives under a secret path prefix of its own (``/s/<token>/``), its cookie
scoped to that path, through a real ``authgw serve`` and headless Chromium.

Browsers send a cookie to every port of its host (RFC 6265 8.5): with the cookie on ``/``, any
other web server on 127.0.0.1 the operator's browser visited (another user's, or anything on a
workstation's loopback at the end of an SSH tunnel) received the session, and its own client
then read a page's CSRF token and saved its own directory into conf.d (review of the console).
Here such a server receives no cookie, the cookie replayed without its prefix opens nothing and
posts nothing, sign-out ends the session on the server, and a session ends after
``session_lifetime`` however much it is used."""

from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.console import ConsoleClient, SessionClient, console_conf, console_link, link_path
from support.console_browser import CHROMIUM
from support.net import free_port

DIRECTORY = {"preset": "openldap", "servers": "ldaps://127.0.0.1:6360", "base_dn": "dc=attacker",
             "bind_dn": "cn=evil,dc=attacker", "password": "attacker-password"}
PAGES = ("/", "/setup", "/status", "/log", "/api/log/0123456789abcdef")


def _replay(base: str, cookie: str, csrf: str) -> ConsoleClient:
    """A plain client holding only *cookie* (and a CSRF token), as another port's server would."""
    client = ConsoleClient(base)
    client.cookies["authgw_console"] = cookie
    client.csrf = csrf
    return client


def _refused_everywhere(client: ConsoleClient, prefix: str = "") -> None:
    """*client* gets the sign-in page (401, with the console's headers) for every page below
    *prefix* (the plain addresses by default), and its posts save nothing."""
    for path in PAGES:
        response = client.get(prefix + path.lstrip("/") if prefix else path)
        assert response.status == 401, (prefix, path, response.status)
        assert "open the one-time link" in response.text and 'name="csrf"' not in response.text
        assert response.header("Content-Security-Policy") and response.header("Cache-Control") == "no-store"
    for path in ("/setup/directory", "/log", "/logout"):
        target = prefix + path.lstrip("/") if prefix else path
        assert client.post_form(target, DIRECTORY).status == 401, target
        assert client.post_multipart(target, DIRECTORY).status == 401, target


@pytest.fixture
def console(conf_dir, demo_hash):
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    return f"http://127.0.0.1:{port}"


def test_the_session_and_its_cookie_live_under_a_secret_prefix(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    response = ConsoleClient(console).get(link_path(console_link(gw)))
    assert response.status == 303
    location = response.header("Location")
    token = re.fullmatch(r"/s/([A-Za-z0-9_-]+)/setup", location).group(1)
    assert len(token) >= 22  # base64url: at least 128 random bits
    cookie = response.header("Set-Cookie")
    assert f"Path=/s/{token}/" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session_id = re.match(r"authgw_console=([^;]+)", cookie).group(1)
    assert token not in session_id and session_id not in token  # a secret of its own, not derived

    client = SessionClient(console)
    prefix = client.sign_in(console_link(gw))
    assert prefix != f"/s/{token}/"  # one prefix per session
    run = client.post_form("/log", {}).header("Location")
    assert run.startswith(f"{prefix}log/")
    # Every link and form of a page stays below the prefix (the static files aside).
    pages = [client.get(path).text for path in ("/setup", "/status", run)]
    targets = [t for text in pages for t in re.findall(r'(?:href|action|src|data-api)="([^"]*)"', text)]
    assert len(targets) > 10 and all(t.startswith((prefix, "/static/")) for t in targets), targets
    assert all(f'data-base="{prefix}"' in text for text in pages)
    # The state file holds neither the session id nor the prefix (only their digests).
    stored = b"".join(p.read_bytes() for p in gw.state_dir.rglob("console*") if p.is_file())
    assert stored and token.encode() not in stored and session_id.encode() not in stored
    assert prefix.split("/")[2].encode() not in stored


def test_the_cookie_without_its_prefix_opens_nothing_and_posts_nothing(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    operator = SessionClient(console)
    prefix = operator.sign_in(console_link(gw))
    cookie, csrf = operator.cookies["authgw_console"], operator.csrf
    other = SessionClient(console)
    other_prefix = other.sign_in(console_link(gw))

    # The cookie (and even the page's CSRF token) without the prefix: the sign-in page only.
    _refused_everywhere(_replay(console, cookie, csrf))
    # ... with a made-up prefix, or the prefix of another live session:
    _refused_everywhere(_replay(console, cookie, csrf), f"/s/{'A' * 43}/")
    _refused_everywhere(_replay(console, cookie, csrf), other_prefix)
    # ... and the prefix without the cookie, or with another session's cookie.
    _refused_everywhere(ConsoleClient(console), prefix)
    _refused_everywhere(_replay(console, other.cookies["authgw_console"], csrf), prefix)
    assert not (conf_dir / "50-console.yaml").exists()

    # Cookie and prefix together are the session (both sessions still work).
    assert operator.get("/status").status == 200 and other.get("/status").status == 200
    unknown = operator.get("/no-such-page")
    assert unknown.status == 404 and unknown.header("Content-Security-Policy")
    outside = ConsoleClient(console).get("/no-such-page")
    assert outside.status == 404 and outside.header("X-Frame-Options") == "DENY"


def test_sign_out_ends_the_session_on_the_server(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = SessionClient(console)
    prefix = client.sign_in(console_link(gw))
    cookie, csrf = client.cookies["authgw_console"], client.csrf
    response = client.post_form("/logout", {})
    assert response.status == 200 and "Signed out" in response.text
    assert f"Path={prefix}" in response.header("Set-Cookie") and "Max-Age=0" in response.header("Set-Cookie")
    assert 'name="csrf"' not in response.text  # the page of a session no more
    # The cookie kept (or copied before) and the prefix open nothing now.
    _refused_everywhere(_replay(console, cookie, csrf), prefix)


def test_a_session_ends_at_its_lifetime_however_active(conf_dir, demo_hash, start_gateway):
    port = free_port()
    console_conf(conf_dir, port, demo_hash, extra="  session_ttl: 4\n  session_lifetime: 8\n")
    gw = start_gateway(conf_dir)
    base = f"http://127.0.0.1:{port}"
    idle, active = SessionClient(base), SessionClient(base)
    idle.sign_in(console_link(gw))
    link = console_link(gw)
    started = time.time()  # before the session begins: elapsed times below are upper bounds
    active.sign_in(link)
    ended = None
    while time.time() - started < 40:
        # The home page: a session check and a redirect, nothing slow (a loaded machine must
        # not stretch one use past the idle timeout).
        status = active.get("/").status
        if status != 303:
            assert status == 401
            ended = time.time() - started
            break
        time.sleep(0.2)
    # Used every 0.2 s it outlived its 4 s idle timeout, and ended at its 8 s lifetime.
    assert ended is not None and 8 <= ended < 40, ended
    assert idle.get("/status").status == 401  # unused for over 4 s: the idle timeout, as before
    assert active.post_form("/log", {}).status == 401


# -- in a browser ----------------------------------------------------------------------------------


class _OtherService:
    """A web server on another port of 127.0.0.1 (another user's, or a tunnel's other end): it
    records the Cookie header of every request the operator's browser sends it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen
        page = b"<!doctype html><title>other service</title><img src='/s/x/pixel'><img src='/setup/pixel'>"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Cookie")))
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed")
def test_a_server_on_another_port_gets_no_cookie_from_the_signed_in_browser(console, conf_dir, start_gateway):
    pytest.importorskip("playwright")
    from support.console_browser import browser

    gw = start_gateway(conf_dir)
    other = _OtherService()
    try:
        with browser() as chromium:
            context = chromium.new_context()
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(console_link(gw))
            assert "Sign out" in page.content()
            # The operator's browser visits the other service, at any path it links to.
            for path in ("/", "/dashboard", "/setup", "/s/", "/login/x"):
                page.goto(other.url + path)
            assert other.seen and not [c for _, c in other.seen if c and "authgw_console" in c], other.seen

            page.goto(console_link(gw).split("/login/")[0] + "/setup")  # a plain address...
            prefix = re.match(r"https?://[^/]+(/s/[A-Za-z0-9_-]{43}/)setup$", page.url)
            assert prefix, page.url  # ... goes on to the session's page (console.js)
            prefix = prefix.group(1)
            page.goto(console + "/status")
            assert page.url == f"{console}{prefix}status" and page.inner_text("h1") == "Status"
            csrf = page.get_attribute("input[name=csrf]", "value")
            cookies = [c for c in context.cookies() if c["name"] == "authgw_console"]
            assert len(cookies) == 1 and cookies[0]["path"] == prefix and cookies[0]["httpOnly"]
            assert cookies[0]["sameSite"] == "Strict"

            # Whoever got hold of the cookie (not the prefix) gets nothing, and saves nothing.
            _refused_everywhere(_replay(console, cookies[0]["value"], csrf))
            assert not (conf_dir / "50-console.yaml").exists()

            page.click("header .logout button")
            assert "Signed out" in page.inner_text("main")
            page.goto(console + "/setup")  # the prefix is forgotten: the sign-in page stays
            assert page.url == console + "/setup" and "open the one-time link" in page.inner_text("main")
            context.close()
        _refused_everywhere(_replay(console, cookies[0]["value"], csrf), prefix)
    finally:
        other.close()


def test_a_lock_held_on_the_console_store_is_its_503_page_not_a_500(console, conf_dir, start_gateway):
    """A lock another process holds on the console's store past ConsoleStore.BUSY_TIMEOUT (a
    backup, a sqlite3 shell) answered the 500 page with a traceback; any web page can make the
    operator's browser send GET /login/<anything> (a DELETE) to 127.0.0.1. Now its 503 page
    (review of the console)."""
    import sqlite3

    gw = start_gateway(conf_dir)
    link = console_link(gw)  # the store exists
    holder = sqlite3.connect(gw.state_dir / "console.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        busy = ConsoleClient(console).get("/login/" + "x" * 43)
        assert busy.status == 503 and "busy or unavailable" in busy.text, (busy.status, busy.text[:500])
        assert busy.header("Content-Security-Policy")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "its store could not be used" in gw.output() and "Traceback" not in gw.output()
    SessionClient(console).sign_in(link)  # the link was not spent by the refused call
