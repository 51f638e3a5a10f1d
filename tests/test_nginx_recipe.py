"""The README's nginx recipe, run in a real nginx in front of a real ``authgw serve`` (issue 9
items 5 and 7): 429 and 503 from ``/auth`` reach the browser with ``Retry-After`` (not nginx's
500), and the user's ``Authorization`` header never reaches the application."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.gateway import static_users, write_conf
from support.http import basic, request
from support.net import free_port
from support.nginx import Nginx

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe(gateway_port: int, nginx_port: int, app_port: int) -> str:
    """The README's nginx block, pointed at this test's gateway and application."""
    text = re.search(r"## Behind nginx\n\n```nginx\n(.*?)```", README.read_text(), re.S).group(1)
    assert "127.0.0.1:9000" in text and "proxy_pass http://app;" in text
    text = text.replace("127.0.0.1:9000", f"127.0.0.1:{gateway_port}")
    text = text.replace("server {\n", f"server {{\n    listen 127.0.0.1:{nginx_port};\n", 1)
    text = text.replace("error_page 401 = @login;", "")  # the recipe's login page is the site's own
    # The application: echoes what nginx passed on to it.
    app = (f"upstream app {{ server 127.0.0.1:{app_port}; }}\n"
           f"server {{ listen 127.0.0.1:{app_port}; location / {{ default_type text/plain; "
           "return 200 \"user=$http_remote_user authorization=[$http_authorization]\\n"
           "groups=[$http_remote_groups] email=[$http_remote_email] name=[$http_remote_name] "
           "source=[$http_remote_auth_source]\\n\"; } }\n")
    return app + text


@pytest.fixture
def site(tmp_path, conf_dir, demo_hash, start_gateway):
    def start(gateway_yaml: str, users: str = ""):
        conf = write_conf(conf_dir, {
            "gateway.yaml": "chain: [static]\ntrusted_proxies: [127.0.0.1/32]\n" + gateway_yaml,
            **static_users({"alice": demo_hash}),
        })
        if users:
            with open(conf / "users" / "users.yaml", "a") as extra:
                extra.write(users.replace("HASH", demo_hash))
        gw = start_gateway(conf)
        port = free_port()
        server = Nginx(tmp_path / f"nginx{port}", recipe(gw.port, port, free_port()), port=port).start()
        started.append(server)
        return gw, server

    started: list[Nginx] = []
    yield start
    for server in started:
        server.stop()


def test_the_application_gets_the_user_but_never_the_password(site):
    gw, nginx = site("throttle: {user_failures: 3, user_client_failures: 2, window: 600}\n")
    r = request(nginx.url, "GET", "/page", {"Authorization": basic("alice", "demo-password")})
    assert r.status == 200, r.body
    assert r.text.splitlines()[0] == "user=alice authorization=[]", "Remote-User passed on, the Basic password dropped"
    assert b"demo-password" not in r.body and basic("alice", "demo-password").encode() not in r.body


def test_a_clients_own_remote_headers_never_reach_the_application(site):
    gw, nginx = site("")
    forged = {"Remote-User": "admin", "Remote-Groups": "admins", "Remote-Email": "boss@example.com",
              "Remote-Name": "The Boss", "Remote-Auth-Source": "forged", "Remote_User": "admin"}
    r = request(nginx.url, "GET", "/page", {"Authorization": basic("alice", "demo-password"), **forged})
    assert r.status == 200, r.body
    # alice's static entry has no groups, email or name: the application sees them empty, not forged
    assert r.text == "user=alice authorization=[]\ngroups=[] email=[] name=[] source=[live]\n", r.text
    assert b"admin" not in r.body and b"boss" not in r.body.lower()


def test_throttled_is_429_with_retry_after_through_nginx(site):
    gw, nginx = site("throttle: {user_failures: 3, user_client_failures: 2, window: 600}\n")
    statuses = [request(nginx.url, "GET", "/", {"Authorization": basic("alice", "wrong")}).status for _ in range(2)]
    assert statuses == [401, 401]
    r = request(nginx.url, "GET", "/", {"Authorization": basic("alice", "wrong")})
    assert r.status == 429, (r.status, r.body, nginx.error_log()[-2000:])
    assert r.header("Retry-After") == "600"
    assert gw.audit()[-1]["outcome"] == "throttled"
    ok = request(nginx.url, "GET", "/", {"Authorization": basic("nobody", "x")})
    assert ok.status == 401 and ok.header("Retry-After") is None, "other answers carry no Retry-After"


def test_unavailable_is_503_with_retry_after_through_nginx(site):
    # A throttle store that does not answer: the gateway refuses password attempts with 503.
    gw, nginx = site(f"throttle: {{store: redis, redis: {{url: 'redis://127.0.0.1:{free_port()}/0', timeout: 0.2}}}}\n")
    r = request(nginx.url, "GET", "/", {"Authorization": basic("alice", "demo-password")})
    assert r.status == 503, (r.status, r.body, nginx.error_log()[-2000:])
    assert r.header("Retry-After") == "5"
    assert (gw.audit()[-1]["outcome"], gw.audit()[-1]["reason"]) == ("unavailable", "throttle_unavailable")


def test_an_identity_value_holding_a_control_character_never_reaches_the_application_as_another(site):
    # Taking the control character out made another value of it: a user in the distinct groups
    # "adm\x7fins" and "ops" reached the application as a member of admins, and a mail of
    # "ceo@example.com\x7f" as the CEO's (review of what the gateway writes). The group is left
    # out, the mail sent empty.
    # C1 and the line separators too: a backend reading the header as latin-1 (WSGI) and
    # splitting lines read "Eve\x85Remote-User: admin" as a line of its own, and str.split()
    # "users\x85admins" as a group admins (review of the front doors).
    gw, nginx = site("", users='  mallory:\n    password_hash: "HASH"\n    email: "ceo@example.com\\x7f"\n'
                         '    display_name: "Eve\\x85Remote-User: admin"\n'
                         '    groups: ["adm\\x7fins", "ops", "adm\\u0000ins", "users\\x85admins", "a\\u2028b"]\n')
    r = request(nginx.url, "GET", "/page", {"Authorization": basic("mallory", "demo-password")})
    assert r.status == 200, r.body
    assert r.text == "user=mallory authorization=[]\ngroups=[ops] email=[] name=[] source=[live]\n", r.text
    assert "control character" in gw.output()


def test_a_user_in_hundreds_of_groups_gets_through_the_recipe(site):
    # ~9 KB of Remote-Groups: past nginx's default buffer for the answer's headers, a 500
    groups = ", ".join(f'"group-number-{i:04d}"' for i in range(300))
    gw, nginx = site("", users=f'  frank:\n    password_hash: "HASH"\n    groups: [{groups}]\n')
    r = request(nginx.url, "GET", "/page", {"Authorization": basic("frank", "demo-password")})
    assert r.status == 200, (r.status, nginx.error_log()[-2000:])
    assert r.text.splitlines()[1].startswith("groups=[group-number-0000,") and "group-number-0299]" in r.text


@pytest.mark.parametrize("mode", ["utf-8", "percent"])
def test_identity_headers_percent_keeps_a_latin_1_backend_from_reading_white_space(site, mode):
    """The UTF-8 of `х` is D1 85 and of `Р` D0 A0: a backend reading headers as latin-1 (WSGI)
    reads NEL and NBSP there, and `str.split()` read `хadmins` as the group `admins` (left from
    the reviews of the front doors). `identity_headers: percent` writes every byte outside
    printable ASCII (and `%`, and `,` in a group name) percent-encoded; a group holding a comma
    is then kept, not left out."""
    from urllib.parse import unquote

    gw, nginx = site(f"identity_headers: {mode}\n",
                     users='  asa:\n    password_hash: "HASH"\n    display_name: "Åsa Р 100%"\n'
                           '    email: "åsa@example.com"\n    groups: ["хadmins", "R&D, Europe", "ops"]\n')
    r = request(nginx.url, "GET", "/page", {"Authorization": basic("asa", "demo-password")})
    assert r.status == 200, r.body
    as_wsgi = r.body.decode("latin-1")  # what a WSGI application is given
    groups = re.search(r"groups=\[(.*?)\] email=\[(.*?)\] name=\[(.*?)\]", as_wsgi)
    if mode == "utf-8":
        words = [word for group in groups.group(1).split(",") for word in group.split()]
        assert "admins" in words, "the problem this setting is for"
        assert groups.group(1).encode("latin-1").decode() == "хadmins,ops"  # the comma's group left out
        return
    assert groups.group(1) == "%D1%85admins,R&D%2C Europe,ops", groups.group(1)
    assert [unquote(g) for g in groups.group(1).split(",")] == ["хadmins", "R&D, Europe", "ops"]
    assert "admins" not in [word for group in groups.group(1).split(",") for word in group.split()]
    assert unquote(groups.group(2)) == "åsa@example.com" and unquote(groups.group(3)) == "Åsa Р 100%"
    assert groups.group(1).isascii() and groups.group(3).isascii()
