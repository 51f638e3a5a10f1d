"""OpenID Connect provider conformance, through a real ``authgw serve`` and slapd, with Authlib as
the independent relying party: client_secret_basic as clients really send it, authorization
errors answered at the redirect_uri, request objects refused, POST at the authorization
endpoint, repeated parameters, tokens revoked when a code is used twice (SQLite and Redis
session stores), and the previous signing key kept in the JWKS after a rotation."""

from __future__ import annotations

import base64
import os
import signal
from urllib.parse import parse_qs, quote_plus, urlsplit

import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt as authlib_jwt
from authlib.oidc.core import CodeIDToken

from support.gateway import authgw
from support.login import LoginSite, hidden, site_on_store
from support.net import wait_for
from support.pki import CA
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
BYE = "https://rp.example.test/signed-out"
#: Secrets with the characters form-encoding changes: `+` (a space once decoded), `%`, `:`.
SECRETS = {"rp": "s3cr et+:/%&=x", "rp:two/x": "pl+us%41-sec"}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    yield server
    server.stop()


def make_site(base, slapd, **login) -> LoginSite:
    clients = []
    for n, (client_id, secret) in enumerate(SECRETS.items()):
        path = base / f"secret{n}"
        path.write_text(secret)
        path.chmod(0o600)
        clients.append({"client_id": client_id, "redirect_uris": [CB], "client_secret": {"file": str(path)},
                        "post_logout_redirect_uris": [BYE]})
    site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": clients}, **login})
    site.gw = site.start()
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    return site


@pytest.fixture(scope="module")
def op(tmp_path_factory, slapd):
    site = make_site(tmp_path_factory.mktemp("oidc"), slapd)
    yield site
    site.stop()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def any_store(request, tmp_path_factory, slapd, op):
    base = tmp_path_factory.mktemp("oidc-redis")
    with site_on_store(request.param, base, lambda base, **login: make_site(base, slapd, **login), op) as site:
        yield site


def rp(op, client_id="rp", method="client_secret_post", **kw) -> OAuth2Session:
    """Authlib's client; ``client_secret_post`` unless *method* says otherwise (Authlib's default,
    ``client_secret_basic``, is what the first test is about)."""
    session = OAuth2Session(client_id, SECRETS[client_id], scope="openid profile email", redirect_uri=CB,
                            code_challenge_method="S256", token_endpoint_auth_method=method, **kw)
    session.trust_env = False
    session.verify = str(op.ca_file)
    return session


def authorization_url(op, client: OAuth2Session, **params) -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")
    uri, _ = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier,
                                             state="st-1", **params)
    return uri, verifier


def sign_in(op, browser, location: str):
    """The answer to a request waiting at /login?req=... (the password form, then the redirect)."""
    return op.sign_in(browser, "alice", "Alice-pw-1", url=op.url + location, allow_redirects=False)


def code_flow(op, client: OAuth2Session, browser=None) -> tuple[dict, str]:
    """A whole sign-in; (the token response, the callback URL)."""
    browser = browser or op.client()
    uri, verifier = authorization_url(op, client)
    first = browser.get(uri, allow_redirects=False)
    answer = sign_in(op, browser, first.headers["Location"]) if first.headers["Location"].startswith("/login") \
        else first
    callback = answer.headers["Location"]
    return client.fetch_token(op.config["token_endpoint"], authorization_response=callback,
                              code_verifier=verifier), callback


def query_of(response) -> dict[str, str]:
    assert response.status_code == 303, (response.status_code, response.headers.get("X-Refused-Reason"))
    location = response.headers["Location"]
    assert location.startswith(CB + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def validated(op, token: dict, client_id: str = "rp"):
    """The id_token's claims, checked by Authlib against the JWKS as published now."""
    jwks = op.client().get(op.config["jwks_uri"]).json()
    claims = authlib_jwt.decode(token["id_token"], JsonWebKey.import_key_set(jwks), claims_cls=CodeIDToken,
                                claims_options={"iss": {"essential": True, "value": op.url}},
                                claims_params={"client_id": client_id, "access_token": token["access_token"]})
    claims.validate()
    return claims


# -- 5: client_secret_basic, raw and form-encoded --------------------------------------------------

@pytest.mark.parametrize("client_id", list(SECRETS))
def test_client_secret_basic_as_authlib_sends_it_raw_and_as_rfc6749_encodes_it(op, client_id):
    # Authlib joins id and secret with ':' without form-encoding them (as many clients do).
    token, _ = code_flow(op, rp(op, client_id, method="client_secret_basic"))
    assert validated(op, token, client_id)["sub"]
    # The RFC 6749 section 2.3.1 form (each half form-encoded) is still accepted.
    client = rp(op, client_id)
    uri, verifier = authorization_url(op, client)
    browser = op.client()
    callback = query_of(sign_in(op, browser, browser.get(uri, allow_redirects=False).headers["Location"]))
    body = {"grant_type": "authorization_code", "code": callback["code"], "redirect_uri": CB, "code_verifier": verifier}

    def basic(user: str, secret: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}

    post = op.client().post
    secret = SECRETS[client_id]
    for wrong in (secret.replace("+", " "), secret + "x", secret.replace("%", "%25")[:-1]):  # never a near miss
        for headers in (basic(client_id, wrong), basic(quote_plus(client_id), quote_plus(wrong))):
            refused = post(op.config["token_endpoint"], data=body, headers=headers)
            assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client"), wrong
    encoded = post(op.config["token_endpoint"], data=body, headers=basic(quote_plus(client_id), quote_plus(secret)))
    assert encoded.status_code == 200, encoded.text


# -- 6, 7: errors after the redirect_uri is validated go back to it --------------------------------

@pytest.mark.parametrize("change, error", [
    ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": "code id_token"}, "unsupported_response_type"),
    ({"response_type": None}, "invalid_request"),
    ({"scope": "profile"}, "invalid_scope"),
    ({"response_mode": "fragment"}, "invalid_request"),  # answered in the query, this flow's default
    ({"request": "eyJhbGciOiJub25lIn0.eyJpc3MiOiJycCJ9."}, "request_not_supported"),
    ({"request_uri": "https://rp.example.test/request.jwt"}, "request_uri_not_supported"),
])
def test_errors_after_the_redirect_uri_is_validated_are_answered_there(op, change, error):
    uri, _ = authorization_url(op, rp(op))
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    params = {k: v for k, v in {**params, **change}.items() if v is not None}
    answer = op.client().get(op.config["authorization_endpoint"], params=params, allow_redirects=False)
    fields = query_of(answer)
    assert (fields["error"], fields["state"], fields["iss"]) == (error, "st-1", op.url)
    assert "code" not in fields


def test_an_error_goes_back_by_form_post_when_that_was_asked(op):
    uri, _ = authorization_url(op, rp(op), response_mode="form_post")
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items() if k != "code_challenge"}
    page = op.client().get(op.config["authorization_endpoint"], params=params, allow_redirects=False)
    assert page.status_code == 200 and f'<form method="post" action="{CB}"' in page.text
    assert (hidden(page.text, "error"), hidden(page.text, "state"), hidden(page.text, "iss")) == \
        ("invalid_request", "st-1", op.url)


def test_discovery_says_request_objects_are_not_supported(op):
    assert op.config["request_parameter_supported"] is False
    assert op.config["request_uri_parameter_supported"] is False


# -- 8: POST at the authorization endpoint ---------------------------------------------------------

def test_the_authorization_endpoint_takes_a_posted_form(op):
    client = rp(op)
    uri, verifier = authorization_url(op, client, nonce="n-1")
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    browser = op.client()
    posted = browser.post(op.config["authorization_endpoint"], data=params, allow_redirects=False)
    assert posted.status_code == 303 and posted.headers["Location"].startswith("/login?req=")
    callback = sign_in(op, browser, posted.headers["Location"]).headers["Location"]
    token = client.fetch_token(op.config["token_endpoint"], authorization_response=callback, code_verifier=verifier)
    assert validated(op, token)["nonce"] == "n-1"
    # signed in: a posted request is answered from the session (by way of /login, a GET, which
    # gets the browser's SameSite=Lax cookie a cross-site POST does not)
    uri, verifier = authorization_url(op, client, prompt="none")
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    again = browser.post(op.config["authorization_endpoint"], data=params, allow_redirects=False)
    assert again.headers["Location"].startswith("/login?req=")
    assert "code" in query_of(browser.get(op.url + again.headers["Location"], allow_redirects=False))
    # prompt=none and no session: login_required at the redirect_uri, no page
    declined = op.client().post(op.config["authorization_endpoint"], data=params, allow_redirects=False)
    declined = op.client().get(op.url + declined.headers["Location"], allow_redirects=False)
    assert query_of(declined)["error"] == "login_required"
    # the same checks as GET, answered at the redirect_uri
    broken = op.client().post(op.config["authorization_endpoint"], data={**params, "code_challenge_method": "plain"},
                              allow_redirects=False)
    assert query_of(broken)["error"] == "invalid_request"


def test_a_posted_authorization_request_is_read_from_the_body_alone_and_bounded(op):
    uri, _ = authorization_url(op, rp(op))
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    # the parameters in the query of a POST are not read (nor merged with the body's)
    alone = op.client().post(op.config["authorization_endpoint"] + "?" + urlsplit(uri).query, data={"x": "1"},
                             allow_redirects=False)
    assert (alone.status_code, alone.headers.get("X-Refused-Reason")) == (400, "oidc.unknown_client")
    mixed = op.client().post(op.config["authorization_endpoint"] + "?response_type=token", data=params,
                             allow_redirects=False)
    assert mixed.status_code == 303 and mixed.headers["Location"].startswith("/login?req=")
    huge = op.client().post(op.config["authorization_endpoint"], data={**params, "pad": "x" * 100_000},
                            allow_redirects=False)
    assert huge.status_code == 413
    unreadable = op.client().post(op.config["authorization_endpoint"], data=b"--x\r\n",
                                  headers={"Content-Type": "multipart/form-data"}, allow_redirects=False)
    assert (unreadable.status_code, unreadable.headers.get("X-Refused-Reason")) == (400, "login.malformed")


# -- 10: repeated parameters -------------------------------------------------------------------------

def test_repeated_parameters_are_refused(op):
    uri, verifier = authorization_url(op, rp(op))
    params = [(k, v[0]) for k, v in parse_qs(urlsplit(uri).query).items()]
    endpoint = op.config["authorization_endpoint"]
    # which client, or where to answer, is in doubt: a page, no redirect
    for extra in (("redirect_uri", "https://evil.example.test/cb"), ("client_id", "rp:two/x"), ("client_id", "rp")):
        refused = op.client().get(endpoint, params=params + [extra], allow_redirects=False)
        assert (refused.status_code, refused.headers.get("X-Refused-Reason")) == (400, "login.malformed"), extra
        assert "Location" not in refused.headers and "evil" not in refused.text
    # anything else: invalid_request at the redirect_uri
    for extra in (("state", "other"), ("code_challenge", "A" * 43), ("scope", "openid"), ("response_type", "code")):
        answer = op.client().get(endpoint, params=params + [extra], allow_redirects=False)
        assert query_of(answer)["error"] == "invalid_request", extra
    # a parameter OAuth lets repeat (RFC 8707 resource) is not refused
    fine = op.client().get(endpoint, params=params + [("resource", "a"), ("resource", "b")], allow_redirects=False)
    assert fine.status_code == 303 and fine.headers["Location"].startswith("/login?req=")
    # the token endpoint: 400 invalid_request, and the code is not used up by it
    browser = op.client()
    callback = query_of(sign_in(op, browser, browser.get(uri, allow_redirects=False).headers["Location"]))
    body = [("grant_type", "authorization_code"), ("code", callback["code"]), ("redirect_uri", CB),
            ("code_verifier", verifier), ("client_id", "rp"), ("client_secret", SECRETS["rp"])]
    for extra in (("code", "other"), ("redirect_uri", CB), ("client_secret", "wrong"), ("grant_type", "x")):
        refused = op.client().post(op.config["token_endpoint"], data=body + [extra])
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request"), extra
        assert refused.headers["Cache-Control"] == "no-store"
    assert op.client().post(op.config["token_endpoint"], data=body).status_code == 200


# -- 9: a code used twice revokes what it gave -----------------------------------------------------

def test_a_code_used_twice_revokes_the_access_token_it_gave(any_store):
    op = any_store
    client = rp(op)
    token, callback = code_flow(op, client)
    assert client.get(op.config["userinfo_endpoint"]).status_code == 200
    other, _ = code_flow(op, rp(op))  # another code's token, in the same store
    # the code again (say, an attacker who read it from a log): refused, and its token revoked
    code = parse_qs(urlsplit(callback).query)["code"][0]
    again = op.client().post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": "x" * 43,
        "client_id": "rp", "client_secret": SECRETS["rp"]})
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    info = client.get(op.config["userinfo_endpoint"])
    assert info.status_code == 401 and info.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in info.headers["WWW-Authenticate"]
    # only that code's token
    assert op.client().get(op.config["userinfo_endpoint"],
                           headers={"Authorization": f"Bearer {other['access_token']}"}).status_code == 200
    # a code never issued revokes nothing and is the same invalid_grant
    unknown = op.client().post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": "never-issued", "redirect_uri": CB, "code_verifier": "x" * 43,
        "client_id": "rp", "client_secret": SECRETS["rp"]})
    assert (unknown.status_code, unknown.json()["error"]) == (400, "invalid_grant")


# -- 13: the previous key after a rotation ---------------------------------------------------------

def test_after_a_rotation_the_previous_key_stays_published_and_its_hints_are_accepted(tmp_path, slapd):
    site = make_site(tmp_path, slapd)
    try:
        browser = site.client()
        token, _ = code_flow(site, rp(site), browser)
        before = [k["kid"] for k in site.client().get(site.config["jwks_uri"]).json()["keys"]]
        assert len(before) == 2  # current and next; no rotation yet

        def rotate(count: int) -> None:
            rotated = authgw("saml", "rotate", "--config", str(site.conf), "--state-dir", str(site.gw.state_dir))
            assert rotated.returncode == 0, rotated.stdout + rotated.stderr
            os.kill(int((site.gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
            wait_for(lambda: site.gw.output().count(" reloaded ") >= count, 60, what="the reload",
                     log=site.gw.output)

        rotate(1)
        after = [k["kid"] for k in site.client().get(site.config["jwks_uri"]).json()["keys"]]
        assert after[0] == before[1] and before[0] in after and len(after) == 3
        # the id_token signed a moment before the rotation still verifies against the JWKS now
        assert validated(site, token)["sub"]
        fresh, _ = code_flow(site, rp(site), browser)  # from the session: signed with the new current key
        assert authlib_jwt.decode(fresh["id_token"], JsonWebKey.import_key_set(
            site.client().get(site.config["jwks_uri"]).json())).header["kid"] == before[1]
        # and a hint from before the rotation is accepted for RP-initiated logout
        done = browser.get(site.config["end_session_endpoint"], allow_redirects=False,
                           params={"id_token_hint": token["id_token"], "post_logout_redirect_uri": BYE})
        assert done.status_code == 303 and done.headers["Location"] == BYE
        # until the next rotation: then that key is gone (documented: while it is the previous key)
        rotate(2)
        final = [k["kid"] for k in site.client().get(site.config["jwks_uri"]).json()["keys"]]
        assert before[0] not in final and before[1] in final and len(final) == 3
        stale = browser.get(site.config["end_session_endpoint"], allow_redirects=False,
                            params={"id_token_hint": token["id_token"], "post_logout_redirect_uri": BYE})
        assert (stale.status_code, stale.headers.get("X-Refused-Reason")) == (400, "oidc.id_token_hint_invalid")
    finally:
        site.stop()
