"""SAML signing-key rollover end to end on a running gateway: ``authgw saml rotate`` on its state
directory, then SIGHUP to the master (``<state_dir>/authgw.pid``), as docs/login.md tells the
operator. pysaml2 SPs check the signatures with xmlsec1 against the metadata they hold."""

from __future__ import annotations

import base64
import os
import re
import signal
from urllib.parse import urlsplit

import pytest

from support.gateway import authgw
from support.login import LoginSite, hidden
from support.net import wait_for
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

SP_ID, ACS = "https://sp.example.test/", "https://sp.example.test/acs"
CERT = re.compile(r"<ds:X509Certificate>([^<]+)</ds:X509Certificate>")
WORKERS = 2


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    yield server
    server.stop()


def login(site, sp: SamlSP, browser, *, first: bool) -> tuple[str, str]:
    """One SP-initiated login; ``(the SAMLResponse, its request id)``."""
    request_id, location = sp.redirect_request()
    page = browser.get(location, timeout=15)
    if first:
        page = site.sign_in(browser, "alice", "Alice-pw-1", url=page.url)
    assert re.search(r'<form method="post" action="([^"]+)"', page.text).group(1) == ACS
    return hidden(page.text, "SAMLResponse"), request_id


def signing_cert(saml_response: str) -> str:
    xml = re.sub(r"\s", "", base64.b64decode(saml_response).decode())  # KeyInfo wraps lines
    return set(CERT.findall(xml)).pop()


def wait_for_reloads(gw, count: int) -> None:
    wait_for(lambda: gw.output().count(" reloaded ") >= count, 60, what="the workers to reload", log=gw.output)


def test_rotate_and_sighup_switch_the_signing_key_without_breaking_an_sp(tmp_path, slapd):
    site = LoginSite(tmp_path, slapd, CA.create(), login={"saml": {"service_providers": [
        {"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress", "name_id_source": "email"}]}})
    gw = site.start(workers=WORKERS)
    try:
        browser = site.client()
        before = site.client().get(f"{site.url}/saml/metadata").text
        current, upcoming = CERT.findall(before)
        sp = SamlSP(tmp_path / "sp", before, acs=ACS, entity_id=SP_ID)  # holds current + next
        response, request_id = login(site, sp, browser, first=True)
        assert signing_cert(response) == current
        assert sp.accept(response, request_id).name_id == "alice@example.com"

        rotated = authgw("saml", "rotate", "--config", str(site.conf), "--state-dir", str(gw.state_dir))
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "kill -HUP" in rotated.stdout
        # Not yet reloaded: the running workers still sign with the old key.
        response, request_id = login(site, sp, browser, first=False)
        assert signing_cert(response) == current

        pid = int((gw.state_dir / "authgw.pid").read_text())
        assert pid == gw.proc.pid
        os.kill(pid, signal.SIGHUP)
        wait_for_reloads(gw, WORKERS)

        for _ in range(4):  # each worker: new metadata, new key; the session survived the reload
            after = site.client().get(f"{site.url}/saml/metadata").text
            new_current, new_next = CERT.findall(after)
            assert new_current == upcoming and new_next not in (current, upcoming)
            response, request_id = login(site, sp, browser, first=False)
            assert signing_cert(response) == upcoming
            # the SP that read the metadata before the rotation still accepts the answers
            assert sp.accept(response, request_id).name_id == "alice@example.com"
        # one that reads the new metadata does too, and an SP that only ever trusted the old
        # current certificate does not (the rollover is real, not a no-op)
        fresh = SamlSP(tmp_path / "fresh", after, acs=ACS, entity_id=SP_ID)
        response, request_id = login(site, fresh, browser, first=False)
        assert fresh.accept(response, request_id).name_id == "alice@example.com"
        stale_metadata = before.replace(upcoming, current)
        stale = SamlSP(tmp_path / "stale", stale_metadata, acs=ACS, entity_id=SP_ID)
        response, request_id = login(site, stale, browser, first=False)
        with pytest.raises(Exception):
            stale.accept(response, request_id)
        assert urlsplit(gw.url).hostname == "127.0.0.1" and gw.proc.poll() is None
    finally:
        site.stop()
