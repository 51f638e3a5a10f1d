"""Forms the console cannot store, and pages that must not fail, through a real ``authgw serve``.

aiohttp decodes a form in the charset its client names: ``utf-7`` or ``unicode_escape`` turn
``+2D8-`` or ``\\ud83f`` into a lone surrogate, which no UTF-8 file or page can hold. Every field
of every form gave a 500 with one, and a service account saved with one broke ``/setup`` with a
500 on every visit until conf.d was edited by hand (review of the console). Now such a form is
the console's 400 page and nothing is saved; a value already in conf.d is shown, not a 500; and a
handler that fails answers a 500 page with the console's headers."""

from __future__ import annotations

import sqlite3
import uuid

import pytest

from support.console import SessionClient, console_session

#: A lone surrogate (U+D83F) as each charset writes it in a form body.
LONE_SURROGATE = {"utf-7": b"a%2B2D8-", "unicode_escape": b"a%5Cud83f", "raw_unicode_escape": b"a%5Cud83f"}
#: Charsets that decode the body into valid text, but are not the UTF-8 every browser sends.
OTHER_CHARSETS = ["latin-1", "utf-16", "cp037", "utf_8_sig", "iso-8859-15"]
FIELDS = {"preset": b"openldap", "servers": b"ldaps://127.0.0.1:1", "base_dn": b"dc=x", "bind_dn": b"cn=a",
          "password": b"pw", "ca_path": b"", "ticket_url": b"https://127.0.0.1:1/p/x", "ticket_ca": b""}


@pytest.fixture
def console(conf_dir, demo_hash, start_gateway):
    return console_session(conf_dir, demo_hash, start_gateway)


def _urlencoded(client: SessionClient, path: str, fields: dict[str, bytes], charset: str | None):
    body = b"&".join([b"csrf=" + client.csrf.encode(), *(k.encode() + b"=" + v for k, v in fields.items())])
    content_type = "application/x-www-form-urlencoded" + (f"; charset={charset}" if charset else "")
    return client._send("POST", path, {"Content-Type": content_type}, body)


def _multipart(client: SessionClient, path: str, parts: list[tuple[str | bytes, str, bytes]]):
    """*parts*: (name, extra part headers, value); the CSRF token comes first."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, headers, value in [("csrf", "", client.csrf.encode()), *parts]:
        name = name if isinstance(name, bytes) else name.encode()
        body += f"--{boundary}\r\n".encode() + b'Content-Disposition: form-data; name="' + name + b'"\r\n'
        body += f"{headers}\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return client._send("POST", path, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body)


def _refused(response, what) -> None:
    assert response.status == 400, (what, response.status, response.text[:300])
    assert "could not be read" in response.text, what
    assert response.header("Content-Security-Policy") and response.header("X-Frame-Options") == "DENY", what
    assert response.header("Cache-Control") == "no-store", what


def test_a_form_in_another_charset_or_with_a_lone_surrogate_is_a_400_and_saves_nothing(console, conf_dir):
    gw, client = console
    before = sorted(p.name for p in conf_dir.rglob("*"))
    for charset, value in LONE_SURROGATE.items():
        for field in ("servers", "base_dn", "bind_dn", "password", "ca_path", "preset"):
            _refused(_urlencoded(client, "/setup/directory", {**FIELDS, field: value}, charset), (charset, field))
        for path in ("/setup/ticket", "/log", "/logout"):
            _refused(_urlencoded(client, path, {**FIELDS, "ticket_url": value}, charset), (charset, path))
    for charset in OTHER_CHARSETS:
        _refused(_urlencoded(client, "/setup/directory", FIELDS, charset), charset)
    # Multipart: a `_charset_` field (RFC 7578 4.6) or a part's own charset decode the same way.
    utf7_default = [("_charset_", "", b"utf-7"), ("preset", "", b"openldap"), ("servers", "", b"ldaps://h"),
                    ("base_dn", "", b"dc=x"), ("bind_dn", "", b"a+2D8-"), ("password", "", b"pw")]
    _refused(_multipart(client, "/setup/directory", utf7_default), "_charset_")
    utf7_part = [("preset", "", b"openldap"), ("servers", "", b"ldaps://h"), ("base_dn", "", b"dc=x"),
                 ("bind_dn", "Content-Type: text/plain; charset=utf-7\r\n", b"a+2D8-"), ("password", "", b"pw")]
    _refused(_multipart(client, "/setup/directory", utf7_part), "part charset")
    _refused(_multipart(client, "/log", [(b"a\xed\xa0\x80", "", b"x")]), "field name")  # not UTF-8

    assert sorted(p.name for p in conf_dir.rglob("*")) == before  # nothing saved
    assert client.get("/setup").status == 200
    # UTF-8, named or not, is read as before; so is text outside ASCII.
    assert _urlencoded(client, "/log", {"note": "d\u00e9j\u00e0".encode()}, "UTF-8").status == 303
    assert _urlencoded(client, "/log", {"note": b"d%C3%A9j%C3%A0"}, None).status == 303
    assert _multipart(client, "/log", [("note", "Content-Type: text/plain; charset=utf-8\r\n",
                                        "d\u00e9j\u00e0".encode())]).status == 303
    output = gw.output()
    assert "Traceback" not in output and " 500 " not in output
    assert "console: unreadable form refused" in output


def test_a_lone_surrogate_already_in_conf_d_is_shown_not_a_500(console, conf_dir):
    """A value written before this fix (or by hand): YAML's escape gives the same lone surrogate.
    Such a file is a configuration error now (file, line and key: test_config.py), so the page
    fills nothing from it; it still answers, on every visit."""
    gw, client = console
    (conf_dir / "50-console.yaml").write_text('ldap:\n  preset: openldap\n  servers: ["ldaps://h\\uDC80"]\n'
                                             '  base_dn: "dc=\\uD800"\n  bind_dn: "a\\uD83F"\n'
                                             '  ca_file: "/x\\uDFFF"\n')
    for _ in range(2):  # every visit, not the first only
        page = client.get("/setup")
        assert page.status == 200, gw.output()[-3000:]
        assert 'value="a?"' not in page.text and 'value="dc=' not in page.text and "ldaps://h" not in page.text
    assert client.get("/status").status == 200
    assert "Traceback" not in gw.output()


def test_a_handler_that_fails_answers_a_500_page_with_the_console_headers(console, conf_dir):
    gw, client = console
    # The configuration-log runs vanish under the running worker (its schema was made at its
    # first visit): the log page's handler raises.
    with sqlite3.connect(gw.state_dir / "console.sqlite") as db:
        db.execute("DROP TABLE runs")
    db.close()
    response = client.get("/log")
    assert response.status == 500
    assert "Something went wrong" in response.text and "runs" not in response.text
    assert "script-src 'self'" in response.header("Content-Security-Policy")
    assert response.header("X-Frame-Options") == "DENY" and response.header("Cache-Control") == "no-store"
    assert client.get("/setup").status == 200  # the session and the other pages still work
    assert "console: GET /s/{prefix}/log raised OperationalError" in gw.output()
    assert client.prefix not in gw.output()  # the log never holds a session's prefix
