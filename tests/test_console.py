"""The console's access rules, through a real ``authgw serve``: one-time login links, sessions
across workers, CSRF, Host checks, security headers, escaping, loopback-only plain HTTP, and the
ticket step's error path. (Session path prefixes and lifetimes: test_console_session.py.)"""

from __future__ import annotations

import re
import stat

import pytest

from support.console import ConsoleClient, SessionClient, console_conf, console_link, link_path, signed_in
from support.gateway import authgw
from support.net import free_port
from support.pki import CA


@pytest.fixture
def console(conf_dir, demo_hash):
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    return f"http://127.0.0.1:{port}"


def test_the_one_time_link_works_once_and_only_once(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    link = console_link(gw)
    saved = (gw.state_dir / "console-login-link")
    assert saved.read_text().strip() == link
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert link.startswith(console + "/login/")

    first = SessionClient(console)
    response = first.get(link_path(link))
    assert response.status == 303
    cookie = response.header("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    first.prefix = response.header("Location").removesuffix("setup")
    assert "Set-up" in first.get("/setup").text

    second = ConsoleClient(console)
    again = second.get(link_path(link))
    assert again.status == 403 and "used or expired" in again.text
    assert "authgw_console" not in (again.header("Set-Cookie") or "")
    assert second.get("/setup").status == 401
    assert ConsoleClient(console).get("/login/not-a-token").status == 403


def test_without_a_session_every_page_is_refused(console, conf_dir, start_gateway):
    start_gateway(conf_dir)
    anonymous = ConsoleClient(console)
    for path in ("/", "/setup", "/log", "/status", "/api/log/0123456789abcdef"):
        response = anonymous.get(path)
        assert response.status == 401, path
        assert "authgw console" in response.text
    forged = ConsoleClient(console)
    forged.cookies["authgw_console"] = "x" * 43
    assert forged.get("/status").status == 401
    assert forged.get(f"/s/{'y' * 43}/status").status == 401
    assert anonymous.post_form("/log", {}, csrf=False).status == 401


def test_sessions_and_links_work_across_workers(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir, workers=2)
    client = signed_in(gw, console)
    # New connections land on either worker: the session and the CSRF token are in SQLite.
    for _ in range(12):
        assert client.get("/status").status == 200
        assert client.post_form("/log", {}).status == 303
    link = console_link(gw)
    results = [ConsoleClient(console).get(link_path(link)).status for _ in range(6)]
    assert results.count(303) == 1 and results.count(403) == 5


def test_forms_need_the_session_csrf_token_and_a_same_origin(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = signed_in(gw, console)
    assert client.post_form("/log", {}, csrf=False).status == 403
    assert client.post_form("/log", {"csrf": "forged"}, csrf=False).status == 403
    other = signed_in(gw, console)  # a valid token, but of another session
    assert client.post_form("/log", {"csrf": other.csrf}, csrf=False).status == 403
    assert client.post_form("/log", {}, headers={"Origin": "http://evil.example"}).status == 403
    assert client.post_form("/log", {}, headers={"Origin": console}).status == 303
    assert client.post_form("/log", {}).status == 303
    # Every form of every page carries the token.
    latest_run = client.get("/log").header("Location")
    for path in ("/setup", "/status", latest_run):
        text = client.get(path).text
        posts = len(re.findall(r'<form[^>]*method="post"', text))
        assert posts and text.count('name="csrf"') == posts, path
    # The store keeps neither the session id nor the token (derived from it): its file holds no
    # value a form could be posted with (review of secret leakage).
    stored = b"".join(p.read_bytes() for p in gw.state_dir.rglob("console*") if p.is_file())
    assert stored and client.csrf.encode() not in stored and other.csrf.encode() not in stored


def test_another_host_name_is_refused(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    link = console_link(gw)
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: the browser sends that name.
    response = ConsoleClient(console).get(link_path(link), {"Host": f"evil.example:{console.rsplit(':', 1)[1]}"})
    assert response.status == 421
    client = SessionClient(console)
    signed = client.get(link_path(link), {"Host": "localhost"})
    assert signed.status == 303  # not spent by the refusal
    client.prefix = signed.header("Location").removesuffix("setup")
    assert client.get("/setup", {"Host": "localhost"}).status == 200
    assert client.get("/setup", {"Host": "attacker.test"}).status == 421  # a live session, another name


def test_pages_carry_a_strict_policy_and_no_inline_script(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = signed_in(gw, console)
    for path in ("/setup", "/status", "/log", "/login/spent"):
        response = client.get(path)
        csp = response.header("Content-Security-Policy")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.header("X-Frame-Options") == "DENY"
        assert response.header("Cache-Control") == "no-store"
        assert response.header("Referrer-Policy") == "same-origin"
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text), path
        assert not re.search(r"\son\w+=", response.text), path  # no inline event handlers
    script = client.get("/static/console.js")
    assert script.status == 200 and script.header("Content-Type").startswith("application/javascript")
    assert client.get("/static/../console.sqlite").status == 404


def test_a_script_in_a_field_comes_back_as_text(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = signed_in(gw, console)
    evil = '"><script>alert(1)</script>'
    response = client.post_form("/setup/directory", {
        "preset": "openldap", "servers": "ldap://127.0.0.1:1", "base_dn": evil,
        "bind_dn": evil, "password": "Sekr1t-value"})
    assert response.status == 400
    assert "<script>alert(1)" not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "Sekr1t-value" not in response.text
    assert not (conf_dir / "50-console.yaml").exists()
    filtered = client.get("/status?user=%3Cscript%3Ealert(1)%3C/script%3E")
    assert "<script>alert(1)" not in filtered.text and "&lt;script&gt;" in filtered.text


def test_plain_http_is_refused_off_loopback_with_the_line(conf_dir, demo_hash, tmp_path):
    console_conf(conf_dir, free_port(), demo_hash, extra="")
    (conf_dir / "console.yaml").write_text("console:\n  hosts: [console.example]\n  listen: 0.0.0.0:8357\n")
    result = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert re.search(r"console\.yaml:3: console\.listen: 0\.0\.0\.0:8357 is not a loopback address", result.stderr)

    ca = CA.create()
    cert, key = ca.issue("console.example", dns=["console.example"]).write(tmp_path, "console")
    (conf_dir / "console.yaml").write_text(f"console:\n  listen: 0.0.0.0:8357\n  tls_cert: {cert}\n  tls_key: {key}\n")
    ok = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "state"))
    assert ok.returncode == 0, ok.stderr


def test_the_tls_listener_sets_a_secure_cookie(conf_dir, demo_hash, tmp_path, start_gateway):
    import http.client
    import ssl

    port = free_port()
    ca = CA.create()
    cert, key = ca.issue("localhost", dns=["localhost"]).write(tmp_path, "console")
    console_conf(conf_dir, port, demo_hash, extra=f"  tls_cert: {cert}\n  tls_key: {key}\n")
    gw = start_gateway(conf_dir)
    link = console_link(gw)
    assert link.startswith(f"https://127.0.0.1:{port}/login/")
    context = ssl.create_default_context(cadata=ca.pem.decode())
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=15)
    try:
        conn.request("GET", link_path(link))
        response = conn.getresponse()
        assert response.status == 303
        assert "Secure" in response.getheader("Set-Cookie")
    finally:
        conn.close()


def test_an_unreachable_ticket_url_says_so_and_saves_nothing(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = signed_in(gw, console)
    before = sorted(p.name for p in conf_dir.rglob("*"))
    state_before = sorted(p.name for p in gw.state_dir.rglob("*"))
    bad = client.post_form("/setup/ticket", {"ticket_url": "not a url"})
    assert bad.status == 400 and "must be an https:// URL" in bad.text
    unreachable = client.post_form("/setup/ticket", {"ticket_url": f"https://127.0.0.1:{free_port()}/enroll/abc"})
    assert unreachable.status == 400
    message = re.search(r'<p class="error" id="ticket-result">([^<]+)</p>', unreachable.text)
    assert message and message.group(1).strip()
    assert sorted(p.name for p in conf_dir.rglob("*")) == before
    assert sorted(p.name for p in gw.state_dir.rglob("*")) == state_before


def test_with_audit_to_stderr_the_status_page_shows_this_workers_events(conf_dir, demo_hash, start_gateway):
    port = free_port()
    console_conf(conf_dir, port, demo_hash, audit="-")
    gw = start_gateway(conf_dir)
    assert gw.auth("alice", "demo-password").status == 200
    assert gw.auth("alice", "wrong").status == 401
    client = signed_in(gw, f"http://127.0.0.1:{port}")
    page = client.get("/status?user=ALICE").text
    assert "this worker (audit.file is standard error)" in page
    rows = re.findall(r"<td>forward_auth</td>\s*<td>(\w+)</td><td>(\w+)</td>", page)
    assert rows == [("alice", "invalid_credentials"), ("alice", "success")]
    assert "demo-password" not in page


def test_a_ticket_enrols_through_authgw_link(conf_dir, demo_hash, start_gateway, tmp_path):
    """The success path, against a real relay, once `authgw link` exists (the link issue)."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash, plugins="[console, link]")
    (conf_dir / "link.yaml").write_text("link: {ping_interval: 1.0, backoff_initial: 0.2}\n")
    if authgw("link", "--help", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s")).returncode != 0:
        pytest.skip("`authgw link` is not available yet (the link issue)")
    linkenv = pytest.importorskip("support.linkenv")
    relay = linkenv.Relay(tmp_path / "relay").setup().start()
    try:
        gw = start_gateway(conf_dir)
        client = signed_in(gw, f"http://127.0.0.1:{port}")
        ticket = relay.ticket()
        response = client.post_form("/setup/ticket", {"ticket_url": ticket, "ticket_ca": str(relay.ca_file)})
        assert response.status == 200, response.text
        assert re.search(r'<p class="ok" id="ticket-result">[^<]*enrolled', response.text)
        assert (gw.state_dir / "link" / "link.json").exists()
        spent = client.post_form("/setup/ticket", {"ticket_url": ticket, "ticket_ca": str(relay.ca_file)})
        assert spent.status == 400 and 'class="error" id="ticket-result"' in spent.text
    finally:
        relay.stop()


def _part(headers: str, value: bytes = b"x") -> bytes:
    return (f"--B\r\nContent-Disposition: form-data; name=\"csrf\"\r\n{headers}\r\n".encode() + value
            + b"\r\n--B--\r\n")


#: Bodies aiohttp cannot read as a form; the charset names are the client's own text, which must
#: reach neither the page nor the log.
UNREADABLE = {
    "urlencoded, invalid UTF-8": ("application/x-www-form-urlencoded", b"csrf=x&base_dn=\xff\xfe"),
    "urlencoded, unknown charset": ("application/x-www-form-urlencoded; charset=client-cs-1", b"csrf=x"),
    "urlencoded, not a text charset": ("application/x-www-form-urlencoded; charset=rot13", b"csrf=x"),
    "multipart without a boundary": ("multipart/form-data", b"csrf=x"),
    "multipart, truncated": ("multipart/form-data; boundary=B",
                             b'--B\r\nContent-Disposition: form-data; name="csrf"\r\n\r\nabc'),
    "multipart, a part with an unknown charset": ("multipart/form-data; boundary=B",
                                                  _part("Content-Type: text/plain; charset=client-cs-2\r\n")),
    "multipart, a part with an unknown transfer encoding": ("multipart/form-data; boundary=B",
                                                            _part("Content-Transfer-Encoding: client-cte-3\r\n")),
    "multipart, a part header without a colon": ("multipart/form-data; boundary=B", _part("client-header-4\r\n")),
}


def test_a_form_that_cannot_be_read_is_a_400_never_a_500(console, conf_dir, start_gateway):
    gw = start_gateway(conf_dir)
    client = signed_in(gw, console)
    for kind, (content_type, body) in UNREADABLE.items():
        for path in ("/log", "/setup/directory", "/setup/ticket", "/logout"):
            response = client._send("POST", path, {"Content-Type": content_type}, body)
            assert response.status == 400, (kind, path, response.status, response.text[:300])
            assert response.header("Content-Security-Policy") and response.header("Cache-Control") == "no-store"
            assert "could not be read" in response.text, (kind, path)
            assert "client-" not in response.text, (kind, path)
    assert client.post_form("/log", {}).status == 303  # the session still works
    output = gw.output()
    assert "Traceback" not in output and " 500 " not in output
    assert "client-" not in output
    assert "unreadable form" in output  # one line each, naming the kind of error only


def test_the_ticket_is_not_on_the_enrolment_command_line(tmp_path):
    """Any user of the host can read a running process's command line (/proc/PID/cmdline), and
    whoever sends a CSR with a ticket first enrols: the console hands the ticket to
    ``authgw link enroll -`` on standard input. A server that accepts and never answers holds the
    enrolment while its command line is read."""
    import os
    import socket
    import threading

    from gateway.passwords import hash_password
    from gateway.plugins.console.setup import enrol
    from support.gateway import static_users, write_conf

    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\nplugins: [link]\n",
                                            **static_users({"alice": hash_password("Alice-Passw0rd")})})
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)  # bounded: an enrolment that never connects fails the test
    ticket = f"https://127.0.0.1:{server.getsockname()[1]}/p/SECRET-TICKET-TOKEN-0123456789"
    result: list = []
    thread = threading.Thread(target=lambda: result.append(
        enrol(ticket, conf, tmp_path / "state", link_enabled=True)))
    thread.start()
    try:
        held, _ = server.accept()  # the enrolment connected: its process runs now

        def enrolling() -> list[bytes]:
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    line = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                if b"link\0enroll" in line and f"{os.getpid()}" != pid:
                    found.append(line)
            return found

        lines = enrolling()
        assert lines and all(b"SECRET-TICKET-TOKEN" not in line for line in lines), lines
        held.close()
    finally:
        server.close()
        thread.join(timeout=60)
    assert result and result[0][0] is False  # the stalled "relay" hung up: no enrolment
