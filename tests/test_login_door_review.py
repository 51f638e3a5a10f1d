"""Review of the login door's own pages, sessions and WS-Federation, against a real gateway, a
real slapd and headless Chromium: an answer page's ``form-action`` is the origin a browser reads
from the registered address, an operator's page string is not a format string, and a cookie key
shorter than its 256 bits is refused rather than used."""

from __future__ import annotations


import pytest

from support.browser import chromium
from support.login import LoginSite
from support.pki import CA
from support.recorder import Recorder
from support.slapd import Slapd

REALM = "urn:example:pathless"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("door")
    ca = CA.create()
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    rp_cert = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    rp = Recorder(rp_cert, base)
    # A reply URL with a query and no path: https://host?x is a URL settings and browsers take
    # (the browser posts to https://host/?x).
    site = LoginSite(base / "idp", slapd, ca, login={
        "messages": {"signed_in": "Angemeldet { als: {name} }"},
        "wsfed": {"relying_parties": [{"realm": REALM, "reply_urls": [rp.url + "?whr=authgw"]}]}})
    site.gw = site.start()
    site.slapd, site.ca = slapd, ca
    yield site, rp, rp_cert
    site.stop()
    rp.stop()
    slapd.stop()


def test_an_answer_to_a_registered_address_without_a_path_reaches_it_in_chromium(world):
    site, rp, rp_cert = world
    with chromium(trust=[site.server_cert, rp_cert]) as browser:
        page = browser.new_page()
        refused = []
        page.on("console", lambda message: refused.append(message.text) if "form-action" in message.text else None)
        page.goto(f"{site.url}/wsfed?wa=wsignin1.0&wtrealm={REALM}&wctx=ctx-1")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        with page.expect_navigation(url=f"{rp.url}/?whr=authgw"):
            page.click("button[type=submit]")  # the answer page posts itself to the relying party
        assert page.locator("#reached").count() == 1
        assert "POST /?whr=authgw" in rp.hits, rp.hits
        assert refused == []
    # The header names the origin a browser reads, nothing after it.
    answer = site.client()
    form = answer.get(f"{site.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM})
    posted = site.sign_in(answer, "alice", "Alice-pw-1", url=form.url)
    assert f"form-action {rp.url};" in posted.headers["Content-Security-Policy"]


def test_a_page_string_with_braces_is_shown_as_written_never_a_500(world):
    site, _rp, _cert = world
    page = site.sign_in(site.client(), "alice", "Alice-pw-1")  # no pending request: "signed in as"
    assert page.status_code == 200, page.text[:300]
    assert "Angemeldet { als: Alice Liddell }" in page.text
    assert "Traceback" not in site.gw.output()


@pytest.mark.parametrize("content", [b"", b"short-secret\n"])
def test_a_cookie_key_shorter_than_256_bits_is_refused_not_used(world, tmp_path, content):
    world_site, _rp, _cert = world
    site = LoginSite(tmp_path / "idp", world_site.slapd, world_site.ca)  # its own ports
    state = tmp_path / "state"
    (state / "login").mkdir(parents=True, mode=0o700)
    (state / "login" / "cookie.key").write_bytes(content)
    (state / "login" / "cookie.key").chmod(0o600)
    try:
        with pytest.raises(Exception):  # the gateway does not start: it would sign with a guessable key
            site.start(state=state)
        output = site.processes[0].output()
        assert f"cookie.key holds {len(content)} bytes, fewer than 32" in output, output[-500:]
        assert (state / "login" / "cookie.key").read_bytes() == content  # left for the operator to mend
    finally:
        site.stop()
