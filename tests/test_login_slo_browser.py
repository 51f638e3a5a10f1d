"""Headless Chromium through a whole Single Logout round: two pysaml2 SPs behind HTTPS on
127.0.0.1 (another site than the IdP's https://localhost), the browser signed in to both, logs
out at the first; authgw's pages carry the LogoutRequest to the second and its answer back (the
auto-submitting forms under authgw's Content-Security-Policy, cross-site POSTs without the
SameSite=Lax cookie), and the first SP validates the final LogoutResponse."""

from __future__ import annotations

import html

import pytest

from support.browser import SamlSPServer, chromium
from support.login import LoginSite
from support.net import free_port
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd


class SloSPServer(SamlSPServer):
    """The support SP plus ``/logout`` (starts SP-initiated logout by HTTP-Redirect) and ``/slo``
    (takes a LogoutRequest or a LogoutResponse by HTTP-POST). Every page says what happened in an
    ``h1``; ``events`` lists the logouts this SP saw."""

    def __init__(self, sp: SamlSP, certificate, key_dir) -> None:
        super().__init__(sp, certificate, key_dir, relay_state="")
        self.result = None
        self.events: list[str] = []

    def answer_get(self, path: str) -> tuple[int, str, dict]:
        if path.startswith("/logout"):
            _, info = self.sp.logout_request(self.sp.idp_slo, self.result, relay_state="from-sp")
            return 302, "", {"Location": dict(info["headers"])["Location"]}
        return super().answer_get(path)

    def answer_post(self, path: str, form: dict[str, str]) -> tuple[int, str, dict]:
        if path == "/acs":
            self.result = self.sp.accept(form["SAMLResponse"], next(iter(self.outstanding), None))
            return 200, f"<h1 id='hello'>Hello {html.escape(self.result.name_id)}</h1>", {}
        if "SAMLRequest" in form:  # the IdP tells this SP to log the user out
            request, _, fields = self.sp.receive_logout(form["SAMLRequest"])
            self.events.append(f"logged out {request.name_id.text}")
            inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                             for k, v in fields.items())
            return 200, (f'<body onload="document.forms[0].submit()"><form method="post" '
                         f'action="{html.escape(self.sp.idp_slo)}">{inputs}</form></body>'), {}
        response = self.sp.accept_logout(form["SAMLResponse"])
        self.events.append("logout answered " + response.status.status_code.value.rsplit(":", 1)[1])
        return 200, f"<h1 id='done'>Signed out ({html.escape(form.get('RelayState', ''))})</h1>", {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("slo-browser")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    ca = CA.create()
    urls = [f"https://127.0.0.1:{free_port()}" for _ in range(2)]
    site = LoginSite(base / "idp", slapd, ca, login={"saml": {"service_providers": [
        {"entity_id": url + "/", "acs_urls": [url + "/acs"], "slo_url": url + "/slo",
         "name_id_format": "emailAddress", "name_id_source": "email"} for url in urls]}})
    site.gw = site.start()
    metadata = site.client().get(f"{site.url}/saml/metadata").text
    tls = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    servers = []
    for n, url in enumerate(urls):
        sp = SamlSP(base / f"sp{n}", metadata, acs=url + "/acs", entity_id=url + "/", slo=url + "/slo")
        sp.idp_slo = f"{site.url}/saml/slo"
        servers.append(SloSPServer(sp, tls, base).start())
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
        assert not [c for c in page.context.cookies(site.url) if c["name"].endswith("authgw_session")]
