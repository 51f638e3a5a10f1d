"""Headless Chromium through the whole SAML redirect dance: an SP (pysaml2 behind HTTPS on
127.0.0.1) sends the browser to authgw (https://localhost), the user signs in on the form, the
browser posts the signed answer back and the SP validates it. Screenshots of the pages go to
``$AUTHGW_SCREENSHOTS`` when set (docs/images/ holds the committed ones), else a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.browser import SamlSPServer, chromium
from support.login import LoginSite
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    ca = CA.create()
    acs = SamlSPServer.free_acs()
    site = LoginSite(base / "idp", slapd, ca, login={"saml": {"service_providers": [
        {"entity_id": "https://sp.example.test/", "acs_urls": [acs], "name_id_format": "emailAddress",
         "name_id_source": "email", "attributes": {"groups": "groups", "uid": "username"}}]}})
    site.gw = site.start()
    metadata = site.client().get(f"{site.url}/saml/metadata").text
    sp_cert = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    server = SamlSPServer(SamlSP(base / "sp", metadata, acs=acs), sp_cert, base / "sp").start()
    yield site, server, [site.server_cert, sp_cert]
    server.stop()
    site.stop()
    slapd.stop()


def test_chromium_signs_in_through_the_saml_redirect_dance(world, tmp_path):
    site, sp, trust = world
    shots = Path(os.environ.get("AUTHGW_SCREENSHOTS") or tmp_path)
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        page.goto(f"{sp.url}/start")
        page.wait_for_selector("#username")
        assert page.url.startswith(f"{site.url}/login?req=")
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "login-form.png"))
        page.fill("#username", "alice")
        page.fill("#password", "wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("#error")
        assert "The username or password is incorrect." in page.inner_text("#error")
        page.screenshot(path=str(shots / "login-error.png"))
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.url == sp.sp.acs  # the answer was posted to the registered ACS
        assert page.inner_text("h1") == "Hello alice@example.com", page.content()
        assert "groups=staff" in page.inner_text("#attrs") and page.inner_text("#relay") == "/app"
        # SSO: a second visit to the SP goes through without the form (the session cookie).
        page.goto(f"{sp.url}/start")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"
        cookies = {c["name"]: c for c in page.context.cookies(site.url)}
        session = cookies["__Host-authgw_session"]
        assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"


def test_chromium_without_javascript_continues_with_the_button(world):
    site, sp, trust = world
    with chromium(trust=trust) as browser:
        context = browser.new_context(java_script_enabled=False)
        page = context.new_page()
        page.goto(f"{sp.url}/start")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Continue")
        page.click("button[type=submit]")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"
