"""Headless Chromium through a whole Single Logout round: two pysaml2 SPs behind HTTPS on
127.0.0.1 (another site than the IdP's https://localhost), the browser signed in to both, logs
out at the first; authgw's pages carry the LogoutRequest to the second and its answer back (the
auto-submitting forms under authgw's Content-Security-Policy, cross-site POSTs without the
SameSite=Lax cookie), and the first SP validates the final LogoutResponse."""

from __future__ import annotations

import html
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from support.browser import chromium
from support.login import LoginSite
from support.net import free_port
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd


class SPServer:
    """pysaml2 on https://127.0.0.1:PORT: ``/start`` (login), ``/acs``, ``/logout`` (starts SP-
    initiated logout by HTTP-Redirect) and ``/slo`` (takes a LogoutRequest or a LogoutResponse
    by HTTP-POST). Every page says what happened in an ``h1``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.sp: SamlSP | None = None
        self.outstanding: dict[str, str] = {}
        self.result = None
        self.events: list[str] = []

    def start(self, sp: SamlSP, certificate, key_dir) -> SPServer:
        self.sp, owner = sp, self
        cert_file, key_file = certificate.write(key_dir, f"sp-{self.port}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str, headers: dict | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.startswith("/start"):
                    request_id, location = owner.sp.redirect_request()
                    owner.outstanding[request_id] = "/"
                    return self._send(302, "", {"Location": location})
                if self.path.startswith("/logout"):
                    _, info = owner.sp.logout_request(owner.sp.idp_slo, owner.result, relay_state="from-sp")
                    return self._send(302, "", {"Location": dict(info["headers"])["Location"]})
                return self._send(404, "not found")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                try:
                    if self.path == "/acs":
                        owner.result = owner.sp.accept(form["SAMLResponse"], next(iter(owner.outstanding), None))
                        return self._send(200, f"<h1 id='hello'>Hello {html.escape(owner.result.name_id)}</h1>")
                    if "SAMLRequest" in form:  # the IdP tells this SP to log the user out
                        request, _, fields = owner.sp.receive_logout(form["SAMLRequest"])
                        owner.events.append(f"logged out {request.name_id.text}")
                        inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                                         for k, v in fields.items())
                        return self._send(200, f'<body onload="document.forms[0].submit()"><form method="post" '
                                               f'action="{html.escape(owner.sp.idp_slo)}">{inputs}</form></body>')
                    response = owner.sp.accept_logout(form["SAMLResponse"])
                    owner.events.append("logout answered " + response.status.status_code.value.rsplit(":", 1)[1])
                    return self._send(200, f"<h1 id='done'>Signed out ({html.escape(form.get('RelayState', ''))})</h1>")
                except Exception as exc:  # the page must say why the SP refused
                    return self._send(403, f"<h1 id='refused'>SP refused: {html.escape(repr(exc))}</h1>")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("slo-browser")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    ca = CA.create()
    servers = [SPServer(free_port()), SPServer(free_port())]
    site = LoginSite(base / "idp", slapd, ca, login={"saml": {"service_providers": [
        {"entity_id": s.url + "/", "acs_urls": [s.url + "/acs"], "slo_url": s.url + "/slo",
         "name_id_format": "emailAddress", "name_id_source": "email"} for s in servers]}})
    site.gw = site.start()
    metadata = site.client().get(f"{site.url}/saml/metadata").text
    tls = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    for n, server in enumerate(servers):
        sp = SamlSP(base / f"sp{n}", metadata, acs=server.url + "/acs", entity_id=server.url + "/",
                    slo=server.url + "/slo")
        sp.idp_slo = f"{site.url}/saml/slo"
        server.start(sp, tls, base)
    yield site, servers, [site.server_cert, tls]
    for server in servers:
        server.stop()
    site.stop()
    slapd.stop()


def test_chromium_logs_out_of_both_sps_from_one(world):
    site, (one, two), trust = world
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        page.goto(f"{one.url}/start")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"
        page.goto(f"{two.url}/start")  # SSO: no form
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"

        page.goto(f"{one.url}/logout")  # one -> authgw -> two -> authgw -> one, by itself
        page.wait_for_selector("#done, #refused", timeout=20000)
        assert page.url == f"{one.url}/slo" and page.inner_text("h1") == "Signed out (from-sp)", page.content()
        assert two.events == ["logged out alice@example.com"] and one.events == ["logout answered Success"]

        page.goto(f"{one.url}/start")  # the authgw session is gone: the form again
        page.wait_for_selector("#username, #hello", timeout=15000)
        assert page.url.startswith(f"{site.url}/login?req=")
        assert not [c for c in page.context.cookies(site.url) if c["name"] == "authgw_session"]
