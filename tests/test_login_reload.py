"""A sign-in request parked before a configuration reload and completed after it, through a real
``authgw serve`` and slapd: the answer is checked against the configuration loaded now. A
relying party or return address the reload removed gets nothing (a 400 page naming the check;
no code, no assertion, no redirect, never a 500), and no session is made for the refused
sign-in. A request whose party is still registered is answered as before."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import sqlite3
from pathlib import Path
from urllib.parse import urlencode

import pytest

from support.login import LoginSite, hidden
from support.net import wait_for
from support.pki import CA
from support.slapd import Slapd

OLD_CB, NEW_CB = "https://old.rp.example.test/cb", "https://rp.example.test/cb"
SP, SP_ACS = "https://sp.example.test/", "https://sp.example.test/acs"
REALM, REPLY = "urn:rp:wsfed", "https://wsfed.example.test/reply"
KEPT_SP, KEPT_ACS = "https://kept.example.test/", "https://kept.example.test/acs"
SECRET = "rp-secret-value-0123456789"


def login_settings(base, *, removed: bool) -> dict:
    """Before the reload: everything registered. After (*removed*): the old redirect URI, the SP
    and the WS-Fed realm are gone; the kept SP stays."""
    sps = [{"entity_id": KEPT_SP, "acs_urls": [KEPT_ACS], "idp_initiated": True}]
    if not removed:
        sps.append({"entity_id": SP, "acs_urls": [SP_ACS], "idp_initiated": True})
    return {"oidc": {"clients": [{"client_id": "rp", "redirect_uris": [NEW_CB] if removed else [OLD_CB, NEW_CB],
                                  "client_secret": {"file": str(base / "secret")}}]},
            "saml": {"service_providers": sps},
            "wsfed": {"relying_parties": [] if removed else [{"realm": REALM, "reply_urls": [REPLY]}]}}


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """A gateway with a request of each kind parked (each in its own browser), then reloaded with
    their parties removed. Yields ``(site, {name: (browser, login URL)})``."""
    base = tmp_path_factory.mktemp("reload")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    site = LoginSite(base / "op", slapd, CA.create(), login=login_settings(base, removed=False))
    site.gw = site.start()
    try:
        challenge = base64.urlsafe_b64encode(hashlib.sha256(secrets.token_bytes(32)).digest()).decode().rstrip("=")
        oidc = {"client_id": "rp", "redirect_uri": OLD_CB, "response_type": "code", "scope": "openid",
                "code_challenge": challenge, "code_challenge_method": "S256", "state": "st"}
        starts = {"oidc": "/oidc/authorize?" + urlencode(oidc),
                  "oidc_form_post": "/oidc/authorize?" + urlencode({**oidc, "response_mode": "form_post"}),
                  "saml": "/saml/idp?" + urlencode({"sp": SP}),
                  "wsfed": "/wsfed?" + urlencode({"wa": "wsignin1.0", "wtrealm": REALM}),
                  "kept": "/saml/idp?" + urlencode({"sp": KEPT_SP})}
        parked = {}
        for name, path in starts.items():
            browser = site.client()
            answer = browser.get(site.url + path, allow_redirects=False)
            assert answer.status_code == 303 and answer.headers["Location"].startswith("/login?req="), answer.text
            parked[name] = (browser, site.url + answer.headers["Location"])
        settings = json.loads((site.conf / "login.yaml").read_text()[len("login: "):])
        settings.update(login_settings(base, removed=True))
        (site.conf / "login.yaml").write_text("login: " + json.dumps(settings))
        os.kill(int((site.gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
        wait_for(lambda: site.gw.output().count(" reloaded ") >= 1, 60, what="the reload", log=site.gw.output)
        yield site, parked
    finally:
        site.stop()
        slapd.stop()


def session_count(site) -> int:
    db = sqlite3.connect(f"file:{site.gw.state_dir / 'login' / 'sessions.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM sessions").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("name, reason", [
    ("oidc", "oidc.redirect_uri_not_registered"),
    ("oidc_form_post", "oidc.redirect_uri_not_registered"),
    ("saml", "saml.unknown_sp"),
    ("wsfed", "wsfed.unknown_realm"),
])
def test_a_request_whose_party_a_reload_removed_is_refused_with_no_session(reloaded, name, reason):
    site, parked = reloaded
    browser, url = parked[name]
    sessions = session_count(site)
    answer = site.sign_in(browser, "alice", "Alice-pw-1", url=url, allow_redirects=False)
    assert answer.status_code == 400 and answer.headers.get("X-Refused-Reason") == reason, answer.text
    assert "This sign-in request cannot be accepted." in answer.text
    assert "Location" not in answer.headers
    assert not any(hidden(answer.text, field) for field in ("code", "SAMLResponse", "wresult"))
    assert session_count(site) == sessions  # no session whose cookie the browser never got
    assert not [c for c in browser.cookies if c.name.endswith("authgw_session")]
    assert "Traceback" not in site.gw.output() and "Error handling request" not in site.gw.output()


def test_a_request_whose_party_is_still_registered_is_answered(reloaded):
    site, parked = reloaded
    browser, url = parked["kept"]
    answer = site.sign_in(browser, "alice", "Alice-pw-1", url=url, allow_redirects=False)
    assert answer.status_code == 200 and hidden(answer.text, "SAMLResponse")
    assert f'<form method="post" action="{KEPT_ACS}"' in answer.text
    assert [c for c in browser.cookies if c.name.endswith("authgw_session")]


def test_reloads_leave_no_session_store_connection_behind(tmp_path):
    """Each generation's session store (and its purge's connection) is closed at its shutdown:
    before, every reload left the old ones open (review of the day's changes)."""
    directory = Slapd(tmp_path / "slapd").start()
    try:
        site = LoginSite(tmp_path / "site", directory, CA.create(), login={"saml": {"service_providers": [
            {"entity_id": "https://sp.example.test/", "acs_urls": ["https://sp.example.test/acs"],
             "idp_initiated": True}]}})
        site.gw = site.start()
        pid = int((site.gw.state_dir / "authgw.pid").read_text())

        def store_descriptors() -> int:
            return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir()
                       if "sessions.sqlite3" in os.readlink(fd))

        for reloads in range(1, 5):
            site.client().get(f"{site.url}/saml/idp?sp=https://sp.example.test/")  # parks: the store is used
            os.kill(pid, signal.SIGHUP)
            wait_for(lambda: site.gw.output().count(" reloaded ") >= reloads, 60, what=f"reload {reloads}",
                     log=site.gw.output)
            if reloads == 1:
                after_first = store_descriptors()
        wait_for(lambda: store_descriptors() <= after_first, 30, what="the retired stores to be closed",
                 log=site.gw.output)
    finally:
        if "site" in locals():
            site.stop()
        directory.stop()
