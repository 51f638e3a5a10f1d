"""Items left by stop 47 in the OpenID Connect provider (``plugins/login/oidc.py``): its session
store calls made without holding the event loop for a SQLite lock held elsewhere.

- The provider still made the store's sync calls after the door's own had become coroutines
  (``SessionManager.aget`` ...): a held code's grant, the token endpoint's single-use take, its
  tombstone, its access token and a replay's revocation, a logout continued from a POST
  (``/oidc/logout?held=``) and the browser's session there. With the store's write lock held
  elsewhere (an operator's ``sqlite3`` shell in ``BEGIN IMMEDIATE``, a backup) each waited up to
  ``BUSY_TIMEOUT`` (0.5 s) on the worker's loop, which answered nothing else meanwhile,
  ``/healthz`` included, and then failed (503). They are now awaited (``SqliteStore.call``: on
  the loop on a connection that never waits, else on the store's thread up to ``STORE_WAIT``).

Real ``authgw serve`` (one worker: the requests share its loop) in front of a real slapd, the lock
held by a real SQLite connection of the test; the token endpoint's replay step is also driven in
one process on a real store, where the test can hold the lock between its steps.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from authlib.integrations.requests_client import OAuth2Session

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd
from support.heldlock import Pending, healthz, held_lock, one_worker

from gateway.plugins.login.keys import _new_pair
from gateway.plugins.login.oidc import OidcProvider, _digest
from gateway.plugins.login.sessions import SessionManager, SqliteStore
from gateway.plugins.login.settings import LoginSettings, SessionSettings


CB = "https://rp.example.test/callback"
BYE = "https://rp.example.test/signed-out"
SECRET = "rp-secret-value-0123456789"


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    base = tmp_path_factory.mktemp("oidc-left47")
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
        (base / "secret").write_text(SECRET)
        (base / "secret").chmod(0o600)
        site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": [
            {"client_id": "rp", "redirect_uris": [CB], "client_secret": {"file": str(base / "secret")},
             "post_logout_redirect_uris": [BYE]}]}})
        try:
            one_worker(site)
            site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
            yield site
        finally:
            site.stop()
    finally:
        slapd.stop()


def id_token_of(op, browser) -> str:
    """An id_token of *browser*'s session, for client ``rp`` (Authlib builds the request)."""
    verifier = secrets.token_urlsafe(48)
    client = OAuth2Session("rp", SECRET, scope="openid", redirect_uri=CB, code_challenge_method="S256")
    uri, _ = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier, nonce="n")
    answer = browser.get(uri, allow_redirects=False, timeout=15)
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("X-Refused-Reason"))
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    token = op.client().post(op.config["token_endpoint"], timeout=15, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier,
        "client_id": "rp", "client_secret": SECRET})
    assert token.status_code == 200, token.text
    return token.json()["id_token"]


def signed_in(op, browser) -> bool:
    return "Sign out" in browser.get(f"{op.url}/login", timeout=25).text


def test_a_logout_continued_under_a_held_lock_leaves_the_worker_answering(op):
    browser = op.client()
    assert "Sign out" in op.sign_in(browser, "alice", "Alice-pw-1").text
    hint = id_token_of(op, browser)
    # the relying party's page posts the logout without the session cookie: held for a GET
    posted = op.client().post(op.config["end_session_endpoint"], allow_redirects=False, timeout=15,
                              data={"id_token_hint": hint, "post_logout_redirect_uri": BYE, "state": "x"})
    assert posted.status_code == 303 and posted.headers["Location"].startswith("/oidc/logout?held="), posted.text
    browser.headers["Connection"] = "close"
    holder = held_lock(op)
    try:
        # the browser's GET takes the held request (single use) and touches its session: both wait
        done = Pending(lambda: browser.get(op.url + posted.headers["Location"], allow_redirects=False, timeout=25))
        time.sleep(0.1)
        assert healthz(op).status_code == 200
        # On the loop, the take waited there 0.5 s and the logout got its 503 before /healthz.
        assert not done.done.is_set(), "the logout was answered before /healthz: it did not wait off the loop"
        time.sleep(0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # the lock let go within the store's wait: the logout goes on, once, as without the lock
    answer = done.result()
    assert answer.status_code == 303 and answer.headers["Location"] == BYE + "?state=x", \
        (answer.status_code, answer.headers.get("Location"), answer.text[:300])
    assert not signed_in(op, browser)
    output = op.gw.output()
    assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]


# -- the token endpoint's replay step, in one process on a real store ----------------------------------

def provider_on(store: SqliteStore) -> OidcProvider:
    """The provider with the door's session manager on *store* (the only part of the door the
    replay step uses)."""
    settings = LoginSettings.model_validate({"base_url": "https://op.example.test", "oidc": {"clients": [
        {"client_id": "rp", "redirect_uris": [CB], "client_secret": {"env": "AUTHGW_LEFT47_UNUSED"}}]}})
    provider = OidcProvider(settings, _new_pair("current"), _new_pair("next"))
    provider.web = SimpleNamespace(sessions=SessionManager(SessionSettings(), store, b"k" * 32))
    return provider


def test_a_second_redemption_under_a_held_lock_waits_off_the_loop_and_revokes_the_token(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "STORE_WAIT", 20.0)  # generous: the lock is let go well before
    monkeypatch.setenv("AUTHGW_LEFT47_UNUSED", "x" * 32)
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    provider = provider_on(store)
    code_key, access = _digest("the code"), "the access token"
    # what a first redemption by client rp left: its tombstone naming the token, and the token
    store.put_pending("code-used:" + code_key, {"at": [_digest(access)], "client_id": "rp"}, time.time() + 600)
    store.put_pending("at:" + _digest(access), {"identity": {}, "scope": "openid", "sid": "s"}, time.time() + 600)

    async def main():
        holder.execute("BEGIN IMMEDIATE")
        replayed = asyncio.ensure_future(provider._code_replayed(code_key, "rp"))
        turns = 0
        while turns < 20:  # the loop goes round while the mark waits for the lock
            await asyncio.sleep(0.01)
            turns += 1
        assert not replayed.done(), "the replay's mark did not wait for the lock"
        holder.execute("ROLLBACK")
        await asyncio.wait_for(replayed, 15)

    try:
        asyncio.run(main())
        # the mark left, the token issued from the code revoked (RFC 6749 section 4.1.2)
        assert store.get_pending("at:" + _digest(access), time.time()) is None
        assert store.get_pending("code-replayed:" + _digest(f"{code_key} rp"), time.time()) == {}
    finally:
        holder.close()
        store.close()
