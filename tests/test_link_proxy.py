"""Issue 13, step 6: the connector behind an HTTP CONNECT proxy with Basic authentication
(Debian tinyproxy), from the environment (HTTPS_PROXY with credentials, NO_PROXY) or from
``link.proxy``. Enrolment's CONNECTs and the link's are counted apart: the link's ``wss://`` URL
takes the proxy an ``https://`` URL of its host would (aiohttp's own lookup wanted WSS_PROXY and
dialled the relay directly). Frames tapped inside the connector, where a TLS-inspecting proxy
would see them, carry no password in clear."""

from __future__ import annotations

import base64
import json
import textwrap

import pytest

from gateway.plugins.link.client import Proxy, proxy_for
from gateway.plugins.link.settings import LinkSettings
from support.linkenv import Connector, Relay
from support.slapd import Slapd
from support.tinyproxy import TinyProxy

PASSWORD = "Alice-Passw0rd-through-a-proxy"

#: Test-only tap: every WebSocket frame the connector sends or receives, appended to $LINK_TAP.
TAP = textwrap.dedent('''
    import os
    import aiohttp

    _receive, _send = aiohttp.ClientWebSocketResponse.receive, aiohttp.ClientWebSocketResponse.send_str

    def _log(direction, data):
        with open(os.environ["LINK_TAP"], "a") as out:
            out.write(direction + " " + data.replace("\\n", " ") + "\\n")

    async def receive(self, *args, **kwargs):
        msg = await _receive(self, *args, **kwargs)
        if msg.type == aiohttp.WSMsgType.TEXT:
            _log("<", msg.data)
        return msg

    async def send_str(self, data, *args, **kwargs):
        _log(">", data)
        return await _send(self, data, *args, **kwargs)

    aiohttp.ClientWebSocketResponse.receive = receive
    aiohttp.ClientWebSocketResponse.send_str = send_str
''')


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", PASSWORD, cn="Alice A")
    yield server
    server.stop()


@pytest.fixture
def proxy(tmp_path):
    server = TinyProxy(tmp_path / "proxy", user="corp", password="Pr0xy-secret").start()
    yield server
    server.stop()


@pytest.fixture
def relay(tmp_path):
    server = Relay(tmp_path / "relay", cache=False).setup().start()
    yield server
    server.stop()


def test_the_link_goes_through_an_authenticating_proxy_and_shows_no_password(tmp_path, slapd, proxy, relay):
    tap_dir = tmp_path / "tap"
    tap_dir.mkdir()
    (tap_dir / "sitecustomize.py").write_text(TAP)
    tap = tmp_path / "frames.txt"
    env = {"HTTPS_PROXY": proxy.url, "https_proxy": proxy.url, "NO_PROXY": "", "no_proxy": "",
           "PYTHONPATH": str(tap_dir), "LINK_TAP": str(tap)}
    connector = Connector(tmp_path / "c1", slapd, env=env).enroll(relay.ticket(), relay.ca_file)
    relay_address = f"127.0.0.1:{relay.port}"
    assert proxy.connects() == [relay_address] * 2  # enrolment (GET, POST) went through the proxy
    connector.start()
    try:
        connector.wait_linked(relay)
        link_tunnels = proxy.connects()[2:]
        assert link_tunnels and set(link_tunnels) == {relay_address}  # the link went through the proxy too
        assert relay.login("alice", PASSWORD).status == 200
        assert relay.login("alice", "a-Wrong-passw0rd").json()["outcome"] == "invalid_credentials"
        frames = tap.read_text()
        requests = [json.loads(line[2:]) for line in frames.splitlines() if line.startswith("<")]
        logins = [r for r in requests if r.get("type") == "authenticate"]
        assert len(logins) == 2 and all(r["body"]["password"] for r in logins)
        assert PASSWORD not in frames and "a-Wrong-passw0rd" not in frames
        assert PASSWORD not in connector.process.output() and PASSWORD not in relay.process.output()
        tunnels = len(proxy.connects())
        check = connector.cli("check")
        assert "PASS  link.proxy" in check.stdout and "PASS  link.link" in check.stdout, check.stdout
        # the proxy test's CONNECT, and the link test's: its hello went the link's way
        assert proxy.connects()[tunnels:] == [relay_address] * 2
    finally:
        connector.stop()


def test_link_proxy_with_credentials_in_the_settings(tmp_path, slapd, proxy, relay):
    # No HTTPS_PROXY: enrolment (urllib, the environment only) goes direct; the link takes
    # `link.proxy` and sends proxy_username/proxy_password as Basic (tinyproxy refuses it without).
    env = {"HTTPS_PROXY": "", "https_proxy": "", "PROXY_SECRET": proxy.password}
    link = {"proxy": proxy.address, "proxy_username": proxy.user, "proxy_password": {"env": "PROXY_SECRET"}}
    connector = Connector(tmp_path / "c1", slapd, env=env, link=link).enroll(relay.ticket(), relay.ca_file)
    assert proxy.connects() == []
    connector.start()
    try:
        connector.wait_linked(relay)
        tunnels = proxy.connects()
        assert tunnels and set(tunnels) == {f"127.0.0.1:{relay.port}"}
        assert relay.login("alice", PASSWORD).status == 200
        check = connector.cli("check")
        assert "PASS  link.proxy" in check.stdout and "PASS  link.link" in check.stdout, check.stdout
    finally:
        connector.stop()


def test_wrong_proxy_credentials_and_no_proxy(tmp_path, slapd, proxy, relay):
    env = {"HTTPS_PROXY": proxy.url.replace("Pr0xy-secret", "wrong"), "NO_PROXY": "", "no_proxy": ""}
    connector = Connector(tmp_path / "c1", slapd, env=env)
    result = connector.cli("link", "enroll", relay.ticket(), "--ca", str(relay.ca_file))
    # tinyproxy answers a wrong password 401 (a missing one 407)
    assert result.returncode == 1 and "Tunnel connection failed: 401" in result.stderr
    tunnels = len(proxy.connects())  # the refused one
    bypass = Connector(tmp_path / "c2", slapd, env={"HTTPS_PROXY": proxy.url, "NO_PROXY": "127.0.0.1",
                                                     "no_proxy": "127.0.0.1"})
    bypass.enroll(relay.ticket(), relay.ca_file).start()
    try:
        bypass.wait_linked(relay)
        assert len(proxy.connects()) == tunnels  # NO_PROXY: enrolment and link went direct
    finally:
        bypass.stop()
    connector.env["HTTPS_PROXY"] = proxy.url.replace("Pr0xy-secret", "wrong")
    (connector.state / "link").mkdir(parents=True, exist_ok=True)
    for name in ("key.pem", "cert.pem", "relay-ca.pem", "link.json"):  # borrow an enrolment to check with
        (connector.state / "link" / name).write_bytes((bypass.state / "link" / name).read_bytes())
    check = connector.cli("check")
    assert "FAIL  link.proxy" in check.stdout and "401" in check.stdout and "proxy credentials" in check.stdout


LINK_URL = "wss://relay.example.com:443/link"


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


@pytest.mark.parametrize("environment, expected", [
    ({"HTTPS_PROXY": "http://corp:s3cret@proxy.corp:3128"}, Proxy("http://proxy.corp:3128", _basic("corp:s3cret"))),
    ({"https_proxy": "http://c%40rp:s%3Acret@proxy.corp:3128/"},  # percent-decoded, as urllib does
     Proxy("http://proxy.corp:3128/", _basic("c@rp:s:cret"))),
    ({"HTTPS_PROXY": "proxy.corp:3128"}, Proxy("http://proxy.corp:3128")),  # urllib takes a bare host:port
    ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost,.example.com"}, None),
    ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "relay.example.com:443"}, None),
    ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"}, None),
    ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "other.example.org"}, Proxy("http://proxy.corp:3128")),
    ({"HTTP_PROXY": "http://proxy.corp:3128"}, None),  # the link is TLS: only the https proxy applies
    ({"WSS_PROXY": "http://proxy.corp:3128"}, None),  # what aiohttp's trust_env looked at instead
    ({}, None),
])
def test_the_links_proxy_is_the_environments_for_an_https_url_of_its_host(monkeypatch, environment, expected):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "WSS_PROXY", "wss_proxy",
                 "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    chosen = proxy_for(LinkSettings(), LINK_URL)
    assert chosen == expected
    if chosen is not None and chosen.authorization:
        assert "s3cret" not in repr(chosen)


def test_link_proxy_in_the_settings_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://other:secret@env-proxy.corp:8080")
    monkeypatch.setenv("NO_PROXY", "relay.example.com")  # the environment's bypass: not for link.proxy
    monkeypatch.setenv("LINK_PROXY_SECRET", "s3cret")
    settings = LinkSettings(proxy="http://proxy.corp:3128", proxy_username="corp",
                            proxy_password={"env": "LINK_PROXY_SECRET"})
    assert proxy_for(settings, LINK_URL) == Proxy("http://proxy.corp:3128", _basic("corp:s3cret"))
    assert proxy_for(LinkSettings(proxy="http://proxy.corp:3128"), LINK_URL) == Proxy("http://proxy.corp:3128")
