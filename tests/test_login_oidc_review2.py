"""Second review of the OpenID Connect provider, through a real ``authgw serve`` and slapd, with
Authlib as the relying party and headless Chromium where a browser matters:

- a reload that removes a client ends its access tokens at ``/oidc/userinfo`` (they answered
  until they expired, up to ``token_lifetime``, a day), as it ends its codes at ``/oidc/token``;
- a ``client_secret_basic`` credential without a ``:`` (a client sending a key alone) is not
  written to the log as the claimed ``client_id``;
- discovery says every authorization answer carries ``iss`` (RFC 9207 section 3), so a relying
  party that checks it against mix-up does;
- a ``post_logout_redirect_uri`` with a fragment gets ``state`` in its query, not after the ``#``;
- Chromium: a relying party's page posting ``/oidc/authorize`` and ``/oidc/logout`` across
  sites (the ``SameSite=Lax`` cookie stays behind) is answered from, and ends, the browser's
  session, and a ``form_post`` answer reaches the relying party.

No assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc9207 import AuthorizationServerMetadata

from support.browser import chromium
from support.login import LoginSite, hidden
from support.net import wait_for
from support.pki import CA
from support.recorder import Recorder
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
CB2 = "https://rp2.example.test/callback"
BYE = "https://rp.example.test/signed-out#done"
SECRETS = {"rp": "rp-secret-value-0123456789", "rp2": "rp2-secret-value-0123456789"}


def clients(base, *, keep=("rp", "rp2")) -> list[dict]:
    found = []
    for client_id, redirect in (("rp", CB), ("rp2", CB2)):
        path = base / f"secret-{client_id}"
        path.write_text(SECRETS[client_id])
        path.chmod(0o600)
        if client_id in keep:
            found.append({"client_id": client_id, "redirect_uris": [redirect], "client_secret": {"file": str(path)},
                          "post_logout_redirect_uris": [BYE]})
    return found


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def op(tmp_path_factory, slapd):
    base = tmp_path_factory.mktemp("oidc-review2")
    site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": clients(base)}})
    site.base = base
    site.gw = site.start()
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    yield site
    site.stop()


def rp(op, client_id="rp") -> OAuth2Session:
    session = OAuth2Session(client_id, SECRETS[client_id], scope="openid profile email",
                            redirect_uri=CB2 if client_id == "rp2" else CB, code_challenge_method="S256",
                            token_endpoint_auth_method="client_secret_post")
    session.trust_env = False
    session.verify = str(op.ca_file)
    return session


def code_flow(op, client: OAuth2Session, browser: requests.Session) -> dict:
    """Authorization (signing in when asked) and the token request, by Authlib; the token."""
    verifier = secrets.token_urlsafe(48)
    uri, state = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier,
                                                 nonce=secrets.token_urlsafe(16))
    answer = browser.get(uri, allow_redirects=False)
    if answer.headers["Location"].startswith("/login?req="):
        answer = op.sign_in(browser, "alice", "Alice-pw-1", url=op.url + answer.headers["Location"],
                            allow_redirects=False)
    callback = answer.headers["Location"]
    assert parse_qs(urlsplit(callback).query)["state"] == [state], callback
    return client.fetch_token(op.config["token_endpoint"], authorization_response=callback, code_verifier=verifier)


def userinfo(op, access_token: str) -> requests.Response:
    return op.client().get(op.config["userinfo_endpoint"], headers={"Authorization": f"Bearer {access_token}"})


def reload_with(op, login_clients: list[dict]) -> None:
    settings = json.loads((op.conf / "login.yaml").read_text()[len("login: "):])
    settings["oidc"]["clients"] = login_clients
    before = op.gw.output().count(" reloaded ")
    (op.conf / "login.yaml").write_text("login: " + json.dumps(settings))
    os.kill(int((op.gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
    wait_for(lambda: op.gw.output().count(" reloaded ") > before, 60, what="the reload", log=op.gw.output)


# -- a removed client's tokens -----------------------------------------------------------------------

def test_a_reload_that_removes_a_client_ends_its_access_tokens_at_userinfo(tmp_path, slapd):
    site = LoginSite(tmp_path / "op", slapd, CA.create(), login={"oidc": {"clients": clients(tmp_path)}})
    site.gw = site.start()
    try:
        site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
        browser = site.client()
        kept, removed = code_flow(site, rp(site), browser), code_flow(site, rp(site, "rp2"), browser)
        for token in (kept, removed):
            assert userinfo(site, token["access_token"]).json()["preferred_username"] == "alice"
        reload_with(site, clients(tmp_path, keep=("rp",)))
        # rp2 is no longer registered: its token answers nothing (it did until it expired)
        refused = userinfo(site, removed["access_token"])
        assert (refused.status_code, refused.json()) == (401, {"error": "invalid_token"}), refused.text
        assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert "oidc userinfo refused: reason=oidc.unknown_client (an access token of client rp2" in site.gw.output()
        # the client still registered, in the same browser session, is answered as before
        assert userinfo(site, kept["access_token"]).json()["preferred_username"] == "alice"
        assert userinfo(site, code_flow(site, rp(site), browser)["access_token"]).status_code == 200
    finally:
        site.stop()


# -- what the log may hold ---------------------------------------------------------------------------

def test_a_basic_credential_without_a_colon_is_not_logged_as_the_client_id(op):
    key = "Kx9-" + secrets.token_urlsafe(24)  # a client sending its key alone, as some APIs take it
    for user_pass in (key.encode(), b"rp-but-no-colon-" + key.encode()):
        refused = op.client().post(op.config["token_endpoint"], data={"grant_type": "authorization_code"},
                                   headers={"Authorization": "Basic " + base64.b64encode(user_pass).decode()})
        assert (refused.status_code, refused.json()) == (401, {"error": "invalid_client"})
    log = op.gw.output()
    assert key not in log
    assert "reason=oidc.invalid_client client_id=(Basic credentials without ':')" in log
    # with a colon the id part is still named (the secret never is)
    op.client().post(op.config["token_endpoint"], data={"grant_type": "authorization_code"},
                     headers={"Authorization": "Basic " + base64.b64encode(f"rp:{key}".encode()).decode()})
    log = op.gw.output()
    assert key not in log and "reason=oidc.invalid_client client_id=rp client=" in log


# -- RFC 9207 ------------------------------------------------------------------------------------------

def test_discovery_says_every_authorization_answer_carries_iss(op):
    metadata = AuthorizationServerMetadata(op.config)
    metadata.validate_authorization_response_iss_parameter_supported()  # Authlib's check of the field
    assert metadata["authorization_response_iss_parameter_supported"] is True
    # and so they do: a code, and an error
    browser = op.client()
    assert code_flow(op, rp(op), browser)["id_token"]
    uri, _ = rp(op).create_authorization_url(op.config["authorization_endpoint"],
                                             code_verifier=secrets.token_urlsafe(48))
    error = browser.get(uri.replace("scope=openid", "scope=x"), allow_redirects=False).headers["Location"]
    fields = parse_qs(urlsplit(error).query)
    assert fields["error"] == ["invalid_scope"] and fields["iss"] == [op.config["issuer"]]


# -- post_logout_redirect_uri with a fragment ------------------------------------------------------------

def test_the_state_of_a_logout_goes_in_the_query_before_a_fragment(op):
    id_token = code_flow(op, rp(op), op.client())["id_token"]
    query = urlencode({"id_token_hint": id_token, "post_logout_redirect_uri": BYE, "state": "st-1"})
    # a browser without a session here: straight back to the relying party
    back = op.client().get(f"{op.url}/oidc/logout?{query}", allow_redirects=False)
    assert back.status_code == 303
    assert back.headers["Location"] == "https://rp.example.test/signed-out?state=st-1#done"
    assert parse_qs(urlsplit(back.headers["Location"]).query) == {"state": ["st-1"]}
    # the browser whose session the hint is of: ended, then the same address
    browser = op.client()
    id_token = code_flow(op, rp(op), browser)["id_token"]
    query = urlencode({"id_token_hint": id_token, "post_logout_redirect_uri": BYE, "state": "st-2"})
    ended = browser.get(f"{op.url}/oidc/logout?{query}", allow_redirects=False)
    assert ended.headers["Location"] == "https://rp.example.test/signed-out?state=st-2#done"
    assert hidden(browser.get(f"{op.url}/login").text, "csrf")  # the form again: signed out


# -- Chromium: cross-site posts and form_post ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, slapd):
    base = tmp_path_factory.mktemp("oidc-review2-browser")
    ca = CA.create()
    tls = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    relying = Recorder(tls, base)
    (base / "secret").write_text(SECRETS["rp"])
    (base / "secret").chmod(0o600)
    site = LoginSite(base / "op", slapd, ca, login={"oidc": {"clients": [
        {"client_id": "rp", "redirect_uris": [relying.url + "/cb"], "client_secret": {"file": str(base / "secret")},
         "post_logout_redirect_uris": [relying.url + "/bye"]}]}})
    site.gw = site.start()
    yield site, relying, [site.server_cert, tls]
    relying.stop()
    site.stop()


def post_from(page, origin: str, url: str, fields: dict) -> None:
    """Submit a form to *url* from a page of *origin* (another site than the door's)."""
    page.goto(origin + "/start")
    page.evaluate("""([url, fields]) => {
        const form = document.createElement('form'); form.method = 'post'; form.action = url;
        for (const [name, value] of Object.entries(fields)) {
            const input = document.createElement('input'); input.type = 'hidden';
            input.name = name; input.value = value; form.appendChild(input);
        }
        document.body.appendChild(form); form.submit(); }""", [url, fields])


def test_chromium_cross_site_posts_reach_the_browsers_session(world):
    site, relying, trust = world
    token_url, callback = f"{site.url}/oidc/token", relying.url + "/cb"
    verifier = secrets.token_urlsafe(48)
    client = OAuth2Session("rp", SECRETS["rp"], scope="openid", redirect_uri=callback, code_challenge_method="S256",
                           token_endpoint_auth_method="client_secret_post")
    client.trust_env, client.verify = False, str(site.ca_file)
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        # form_post after signing in: the code is posted to the relying party
        uri, _ = client.create_authorization_url(f"{site.url}/oidc/authorize", code_verifier=verifier,
                                                 response_mode="form_post", state="st-fp")
        page.goto(uri)
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_url(callback, timeout=15000)
        assert "POST /cb" in relying.hits
        # a cross-site POST /oidc/authorize: answered from the session, no sign-in asked
        uri, _ = client.create_authorization_url(f"{site.url}/oidc/authorize", code_verifier=verifier, state="st-post")
        fields = {name: values[0] for name, values in parse_qs(urlsplit(uri).query).items()}
        post_from(page, relying.url, f"{site.url}/oidc/authorize", fields)
        page.wait_for_url(lambda now: now.startswith(callback + "?"), timeout=15000)
        assert parse_qs(urlsplit(page.url).query)["state"] == ["st-post"]
        token = client.fetch_token(token_url, authorization_response=page.url, code_verifier=verifier)
        # a cross-site POST /oidc/logout with the session's own hint: the session ends, then the RP
        post_from(page, relying.url, f"{site.url}/oidc/logout", {
            "id_token_hint": token["id_token"], "post_logout_redirect_uri": relying.url + "/bye", "state": "st-out"})
        page.wait_for_url(relying.url + "/bye?state=st-out", timeout=15000)
        page.goto(f"{site.url}/login")
        assert page.locator("#username").count() == 1  # signed out
