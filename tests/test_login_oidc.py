"""The OpenID Connect provider with an independent relying party (Authlib's OAuth 2.0 client and
its OIDC id_token validation), through a real ``authgw serve`` and slapd."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt as authlib_jwt
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oidc.core import CodeIDToken

from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import rsa_pair
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
SECRET = "rp-secret-value-0123456789"
BYE = "https://rp.example.test/signed-out"


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    base = tmp_path_factory.mktemp("oidc")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    slapd.add_user("carol", "Carol-pw-1", mail="carol@example.com", groups=["staff"])
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    cert, key = rsa_pair(base / "rp", "rp", "rp.example.test")
    site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": [
        {"client_id": "rp", "redirect_uris": [CB], "client_secret": {"file": str(base / "secret")},
         "post_logout_redirect_uris": [BYE]},
        {"client_id": "rp-jwt", "redirect_uris": [CB], "public_key": str(cert)}]}})
    site.gw = site.start()
    site.slapd = slapd
    site.rp_key = key.read_text()
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    site.jwks = site.client().get(site.config["jwks_uri"]).json()
    yield site
    site.stop()
    slapd.stop()


def rp(op, client_id="rp", secret=SECRET, **kw) -> OAuth2Session:
    session = OAuth2Session(client_id, secret, scope="openid profile email groups", redirect_uri=CB,
                            code_challenge_method="S256", **kw)
    session.trust_env = False
    session.verify = str(op.ca_file)
    return session


def authorize(op, client: OAuth2Session, browser=None, **params) -> tuple[str, str, str]:
    """Drive the browser part; returns (callback URL, verifier, nonce)."""
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    uri, _ = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier,
                                             nonce=nonce, **params)
    browser = browser or op.client()
    form = browser.get(uri)
    if hidden(form.text, "req"):
        answer = op.sign_in(browser, "alice", "Alice-pw-1", url=form.url, allow_redirects=False)
    else:
        answer = form
    return answer, verifier, nonce


def test_discovery_and_jwks_publish_the_current_and_next_key(op):
    assert op.config["issuer"] == op.url and op.config["code_challenge_methods_supported"] == ["S256"]
    kids = [k["kid"] for k in op.jwks["keys"]]
    assert len(kids) == 2 and kids[0] != kids[1]


def test_code_flow_with_pkce_validated_by_authlib(op):
    client = rp(op)
    answer, verifier, nonce = authorize(op, client)
    assert answer.status_code == 303
    callback = answer.headers["Location"]
    assert callback.startswith(CB + "?") and parse_qs(urlsplit(callback).query)["iss"] == [op.url]
    token = client.fetch_token(op.config["token_endpoint"], authorization_response=callback, code_verifier=verifier)
    claims = authlib_jwt.decode(token["id_token"], JsonWebKey.import_key_set(op.jwks), claims_cls=CodeIDToken,
                                claims_options={"iss": {"essential": True, "value": op.url}},
                                claims_params={"nonce": nonce, "client_id": "rp", "access_token": token["access_token"]})
    claims.validate()
    assert (claims["email"], claims["preferred_username"], claims["groups"]) == ("alice@example.com", "alice", ["staff"])
    info = client.get(op.config["userinfo_endpoint"]).json()
    assert info["sub"] == claims["sub"] and info["email"] == "alice@example.com"
    # The code is single use.
    again = client.post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": parse_qs(urlsplit(callback).query)["code"][0],
        "redirect_uri": CB, "code_verifier": verifier}, auth=("rp", SECRET))
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_form_post_mode_and_sso_with_the_session(op):
    browser = op.client()
    client = rp(op)
    authorize(op, client, browser)  # signs in
    page, verifier, _ = authorize(op, client, browser, response_mode="form_post", state="st-1")
    assert f'<form method="post" action="{CB}"' in page.text and hidden(page.text, "state") == "st-1"
    code = hidden(page.text, "code")
    token = client.fetch_token(op.config["token_endpoint"], code=code, code_verifier=verifier)
    assert token["token_type"] == "Bearer"


def test_private_key_jwt_client_and_assertions_are_single_use(op):
    client = rp(op, "rp-jwt", op.rp_key, token_endpoint_auth_method=PrivateKeyJWT(op.config["token_endpoint"]))
    answer, verifier, _ = authorize(op, client)
    token = client.fetch_token(op.config["token_endpoint"], authorization_response=answer.headers["Location"],
                               code_verifier=verifier)
    assert token["id_token"]
    from joserfc import jwt
    from joserfc.jwk import RSAKey
    now = int(time.time())
    assertion = jwt.encode({"alg": "RS256"}, {"iss": "rp-jwt", "sub": "rp-jwt", "aud": op.config["token_endpoint"],
                                              "exp": now + 60, "jti": str(uuid.uuid4())}, RSAKey.import_key(op.rp_key))
    answer, verifier, _ = authorize(op, client)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    first = op.client().post(op.config["token_endpoint"], data=body)
    assert first.status_code == 200
    replay = op.client().post(op.config["token_endpoint"], data=body)
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    forged = jwt.encode({"alg": "RS256"}, {"iss": "rp-jwt", "sub": "rp-jwt", "aud": op.config["token_endpoint"],
                                           "exp": now + 60, "jti": "x"}, RSAKey.generate_key(2048))
    assert op.client().post(op.config["token_endpoint"], data={**body, "client_assertion": forged}).status_code == 401


def test_client_assertions_valid_too_long_or_not_yet_or_with_an_odd_audience_are_refused(op):
    # Each is signed by the client's own key and otherwise valid: its jti is remembered until it
    # expires, so one valid for longer than an hour is refused rather than remembered that long.
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    key, now, endpoint = RSAKey.import_key(op.rp_key), int(time.time()), op.config["token_endpoint"]
    base = {"iss": "rp-jwt", "sub": "rp-jwt", "aud": endpoint}
    cases = {"valid for two hours": {"exp": now + 7200}, "not valid yet": {"exp": now + 120, "nbf": now + 600},
             "audience a dict": {"exp": now + 60, "aud": {"x": endpoint}},
             "audience a nested list": {"exp": now + 60, "aud": [[endpoint]]}, "exp true": {"exp": True}}
    for name, claims in cases.items():
        assertion = jwt.encode({"alg": "RS256"}, {**base, "jti": str(uuid.uuid4()), **claims}, key)
        answer = op.client().post(endpoint, data={
            "grant_type": "authorization_code", "code": "x", "redirect_uri": CB, "code_verifier": "v" * 43,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion})
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client"), name
    # the same client's assertion valid for 50 minutes authenticates it (the code is what is wrong)
    assertion = jwt.encode({"alg": "RS256"}, {**base, "jti": str(uuid.uuid4()), "exp": now + 3000}, key)
    answer = op.client().post(endpoint, data={
        "grant_type": "authorization_code", "code": "x", "redirect_uri": CB, "code_verifier": "v" * 43,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": assertion})
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_grant")


def test_a_client_assertion_with_deep_or_huge_json_is_invalid_client_never_a_500(op):
    endpoint = op.config["token_endpoint"]

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = b64(b'{"alg":"ES256"}')
    for payload in (b"[" * 3000, b'{"a":' * 2000, b'{"iss": "' + b"x" * 20000 + b'"}'):
        answer = op.client().post(endpoint, data={
            "grant_type": "authorization_code", "code": "x", "redirect_uri": CB, "code_verifier": "v" * 43,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": f"{header}.{b64(payload)}.sig"})
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client"), payload[:10]
    assert "RecursionError" not in op.gw.output() and "a request handler raised" not in op.gw.output()


def test_token_endpoint_refuses_wrong_secret_verifier_and_client(op):
    client = rp(op)
    answer, verifier, _ = authorize(op, client)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier}
    post = op.client().post
    assert post(op.config["token_endpoint"], data=body, auth=("rp", "wrong")).json()["error"] == "invalid_client"
    for change in ({"code_verifier": "x" * 43}, {"code_verifier": ""}, {"redirect_uri": CB + "/"}):
        wrong = post(op.config["token_endpoint"], data={**body, **change}, auth=("rp", SECRET))
        assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant"), change
    # Who read the code but lacks the verifier could not use it up: its client still redeems it, once.
    assert post(op.config["token_endpoint"], data=body, auth=("rp", SECRET)).json()["id_token"]
    assert post(op.config["token_endpoint"], data=body, auth=("rp", SECRET)).json()["error"] == "invalid_grant"


def test_a_client_authenticates_one_way_and_names_no_other_client(op):
    client = rp(op)
    answer, verifier, _ = authorize(op, client)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier}
    post = op.client().post
    for extra, auth in [({"client_id": "rp-jwt"}, ("rp", SECRET)),  # Basic for rp, the body names another
                        ({"client_id": "rp-jwt", "client_secret": SECRET}, None),
                        ({"client_secret": SECRET}, ("rp", SECRET)),  # two methods at once
                        ({"client_id": "rp", "client_secret": SECRET, "client_assertion": "x.y.z"}, None)]:
        refused = post(op.config["token_endpoint"], data={**body, **extra}, auth=auth)
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client"), extra
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
    # the same client named in the body, or in the body alone, is accepted: the code was not used up
    token = post(op.config["token_endpoint"], data={**body, "client_id": "rp"}, auth=("rp", SECRET))
    assert token.status_code == 200 and token.json()["id_token"]
    answer, verifier, _ = authorize(op, client)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    posted = post(op.config["token_endpoint"], data={"grant_type": "authorization_code", "code": code,
                                                     "redirect_uri": CB, "code_verifier": verifier,
                                                     "client_id": "rp", "client_secret": SECRET})
    assert posted.status_code == 200 and posted.json()["id_token"]


def challenge() -> dict:
    verifier = secrets.token_urlsafe(48)
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return {"code_challenge": digest, "code_challenge_method": "S256"}


@pytest.mark.parametrize("change, reason", [
    ({"client_id": "nobody"}, "oidc.unknown_client"),
    ({"redirect_uri": "https://evil.example.test/cb"}, "oidc.redirect_uri_not_registered"),
    ({"redirect_uri": CB + "/../evil"}, "oidc.redirect_uri_not_registered"),
    ({"state": "s" * 3000}, "login.parameter_too_large"),
    # (the checks after these answer at the redirect_uri: tests/test_login_oidc_conformance.py)
])
def test_each_authorization_check_alone(op, change, reason):
    params = {"client_id": "rp", "redirect_uri": CB, "response_type": "code", "scope": "openid", **challenge(),
              **change}
    response = op.client().get(op.config["authorization_endpoint"], params=params, allow_redirects=False)
    assert response.status_code == 400 and response.headers["X-Refused-Reason"] == reason
    assert "evil" not in response.text and "Location" not in response.headers


def test_the_baseline_authorization_request_is_accepted(op):
    params = {"client_id": "rp", "redirect_uri": CB, "response_type": "code", "scope": "openid", **challenge()}
    response = op.client().get(op.config["authorization_endpoint"], params=params, allow_redirects=False)
    assert response.status_code == 303 and response.headers["Location"].startswith("/login?req=")


def id_token(op, browser) -> str:
    client = rp(op)
    answer, verifier, _ = authorize(op, client, browser)
    return client.fetch_token(op.config["token_endpoint"], authorization_response=answer.headers["Location"],
                              code_verifier=verifier)["id_token"]


def signed_in(op, browser) -> bool:
    return "signed in as" in browser.get(f"{op.url}/login").text


def test_rp_initiated_logout_needs_a_hint_from_here_and_a_registered_uri(op):
    endpoint = op.config["end_session_endpoint"]
    assert endpoint == f"{op.url}/oidc/logout"
    browser = op.client()
    hint = id_token(op, browser)
    assert signed_in(op, browser)

    def logout(**params):
        return browser.get(endpoint, params=params, allow_redirects=False)

    forged = authlib_jwt.encode({"alg": "RS256"}, {**authlib_jwt.decode(hint, JsonWebKey.import_key_set(op.jwks))},
                                op.rp_key).decode()
    for params, reason in [
            ({"id_token_hint": hint, "post_logout_redirect_uri": "https://evil.example.test/"},
             "oidc.post_logout_redirect_uri_not_registered"),
            ({"id_token_hint": hint, "post_logout_redirect_uri": CB}, "oidc.post_logout_redirect_uri_not_registered"),
            ({"id_token_hint": forged, "post_logout_redirect_uri": BYE}, "oidc.id_token_hint_invalid"),
            ({"id_token_hint": hint[:-4] + "AAAA", "post_logout_redirect_uri": BYE}, "oidc.id_token_hint_invalid"),
            ({"id_token_hint": hint, "client_id": "rp-jwt", "post_logout_redirect_uri": BYE}, "oidc.client_mismatch"),
            ({"id_token_hint": "x" * 9000}, "login.parameter_too_large")]:
        refused = browser.post(endpoint, data=params, allow_redirects=False)  # a 9 KB query is the core's to refuse
        assert (refused.status_code, refused.headers.get("X-Refused-Reason")) == (400, reason), params
        assert "evil" not in refused.text and "Location" not in refused.headers
    # without a hint nothing proves the RP asked: the user is shown the Sign out button instead
    asked = logout(post_logout_redirect_uri=BYE)
    assert asked.status_code == 303 and asked.headers["Location"] == "/login"
    assert signed_in(op, browser)
    done = logout(id_token_hint=hint, post_logout_redirect_uri=BYE, state="st 1")
    assert done.status_code == 303 and done.headers["Location"] == BYE + "?state=st+1"
    assert not signed_in(op, browser)


def test_rp_initiated_logout_without_the_browsers_cookie_ends_nothing(op):
    browser = op.client()
    hint = id_token(op, browser)
    # a back-end call or another browser: no cookie. The POST is continued at a GET (where a
    # browser brings its SameSite=Lax cookie); without one, the session the hint names stays
    # (it used to end: anyone holding an id_token could end its user's session)
    posted = op.client().post(op.config["end_session_endpoint"], data={"id_token_hint": hint, "client_id": "rp"},
                              allow_redirects=False)
    assert posted.status_code == 303 and posted.headers["Location"].startswith("/oidc/logout?held=")
    done = op.client().get(op.url + posted.headers["Location"], allow_redirects=False)
    assert done.status_code == 200 and "You are signed out." in done.text
    assert signed_in(op, browser)


def start(op, browser, **params):
    """GET /oidc/authorize (no redirect followed) with a fresh PKCE pair; (response, verifier)."""
    verifier = secrets.token_urlsafe(48)
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    query = {"client_id": "rp", "redirect_uri": CB, "response_type": "code", "scope": "openid groups",
             "code_challenge": digest, "code_challenge_method": "S256", "state": "st-9", **params}
    return browser.get(op.config["authorization_endpoint"], params=query, allow_redirects=False), verifier


def callback(response) -> dict[str, str]:
    location = response.headers["Location"]
    assert location.startswith(CB + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def test_prompt_none_never_shows_a_page(op):
    fresh = op.client()
    answer, _ = start(op, fresh, prompt="none")
    assert answer.status_code == 303
    assert callback(answer) == {"error": "login_required", "state": "st-9", "iss": op.url}
    posted, _ = start(op, fresh, prompt="none", response_mode="form_post")
    assert f'action="{CB}"' in posted.text and hidden(posted.text, "error") == "login_required"
    assert hidden(posted.text, "state") == "st-9" and 'id="password"' not in posted.text
    browser = op.client()
    authorize(op, rp(op), browser)  # signs in
    answer, _ = start(op, browser, prompt="none")
    assert "code" in callback(answer)


@pytest.mark.parametrize("params", [{"prompt": "none login"}, {"prompt": "consent none"}, {"max_age": "soon"},
                                    {"max_age": "-1"}, {"max_age": "1²"}])
def test_prompt_none_with_another_value_or_a_bad_max_age_is_invalid_request(op, params):
    answer, _ = start(op, op.client(), **params)
    assert answer.status_code == 303
    assert callback(answer)["error"] == "invalid_request" and callback(answer)["state"] == "st-9"


def test_prompt_login_anywhere_and_max_age_make_the_user_sign_in_again(op):
    browser = op.client()
    authorize(op, rp(op), browser)
    for params in ({"prompt": "login"}, {"prompt": "consent login"}, {"max_age": "0"}):
        again, _ = start(op, browser, **params)
        assert again.status_code == 303 and again.headers["Location"].startswith("/login?req="), params
    answer, _ = start(op, browser, max_age="3600")
    assert "code" in callback(answer)
    time.sleep(2.1)
    again, verifier = start(op, browser, max_age="1")
    assert again.headers["Location"].startswith("/login?req=")
    declined, _ = start(op, browser, max_age="1", prompt="none")  # too old, and no page may be shown
    assert callback(declined)["error"] == "login_required"
    before = int(time.time())
    done = op.sign_in(browser, "alice", "Alice-pw-1", url=op.url + again.headers["Location"], allow_redirects=False)
    token = rp(op).fetch_token(op.config["token_endpoint"], authorization_response=done.headers["Location"],
                               code_verifier=verifier)
    claims = authlib_jwt.decode(token["id_token"], JsonWebKey.import_key_set(op.jwks))
    assert claims["auth_time"] >= before  # the new sign-in's time


def test_a_deleted_account_gets_no_code_and_no_userinfo(op):
    def sign_in(browser):
        pending, verifier = start(op, browser)
        done = op.sign_in(browser, "carol", "Carol-pw-1", url=op.url + pending.headers["Location"],
                          allow_redirects=False)
        client = rp(op)
        client.fetch_token(op.config["token_endpoint"], authorization_response=done.headers["Location"],
                           code_verifier=verifier)
        return client

    first, second = op.client(), op.client()
    tokens = [sign_in(first), sign_in(second)]
    # (no userinfo call here: it would count as the sessions' account check for RECHECK_INTERVAL)
    op.slapd.delete(op.slapd.user_dn("carol"))
    # a new code from the first session: none; the session ends, the browser is sent to the form
    again, _ = start(op, first)
    assert again.status_code == 303 and again.headers["Location"].startswith("/login?req=")
    assert 'id="password"' in first.get(op.url + again.headers["Location"]).text
    # userinfo for the second session's token: refused, and that session ends too
    info = tokens[1].get(op.config["userinfo_endpoint"])
    assert info.status_code == 401 and info.json()["error"] == "invalid_token"
    assert not signed_in(op, second)
    assert tokens[0].get(op.config["userinfo_endpoint"]).status_code == 401  # its session is over


def test_a_code_from_a_session_that_has_ended_since_gets_no_token(op):
    """A code given just before the user signed out made an id_token for a session that was over
    (review: 200 and a fresh id_token after POST /logout; OIDC has no back channel to recall it)."""
    browser = op.client()
    answer, verifier, _ = authorize(op, rp(op), browser)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    page = browser.get(f"{op.url}/login")
    assert "You are signed out." in browser.post(f"{op.url}/logout", data={"csrf": hidden(page.text, "csrf")}).text
    refused = op.client().post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier},
        auth=("rp", SECRET))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    assert "id_token" not in refused.text
    assert "a code of a session that has ended since" in op.gw.output()


def test_token_and_userinfo_requests_are_answered_as_the_rfcs_say(op):
    client = rp(op)
    answer, verifier, _ = authorize(op, client)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier}
    post = op.client().post
    for missing in ("grant_type", "redirect_uri", "code"):  # RFC 6749 5.2: invalid_request, code not used up
        refused = post(op.config["token_endpoint"], data={k: v for k, v in body.items() if k != missing},
                       auth=("rp", SECRET))
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request"), missing
    json_body = post(op.config["token_endpoint"], json=body, auth=("rp", SECRET))
    assert (json_body.status_code, json_body.json()["error"]) == (400, "invalid_request")
    token = post(op.config["token_endpoint"], data=body, auth=("rp", SECRET)).json()
    assert token["id_token"]
    # a private_key_jwt client naming another client_id in the body (RFC 7523 3): invalid_client
    jwt_client = rp(op, "rp-jwt", op.rp_key, token_endpoint_auth_method=PrivateKeyJWT(op.config["token_endpoint"]))
    answer, verifier, _ = authorize(op, jwt_client)
    from joserfc import jwt
    from joserfc.jwk import RSAKey
    assertion = jwt.encode({"alg": "RS256"}, {"iss": "rp-jwt", "sub": "rp-jwt", "aud": op.config["token_endpoint"],
                                              "exp": int(time.time()) + 60, "jti": str(uuid.uuid4())},
                           RSAKey.import_key(op.rp_key))
    named = post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0],
        "redirect_uri": CB, "code_verifier": verifier, "client_id": "rp",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion})
    assert (named.status_code, named.json()["error"]) == (401, "invalid_client")
    userinfo = op.config["userinfo_endpoint"]
    bare = op.client().get(userinfo)  # RFC 6750 3.1: no token, no error code in the challenge
    assert (bare.status_code, bare.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert bare.headers["Cache-Control"] == "no-store"
    wrong = op.client().get(userinfo, headers={"Authorization": "Bearer " + "x" * 43})
    assert wrong.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    bearer = {"Authorization": "Bearer " + token["access_token"]}
    assert op.client().get(userinfo, headers=bearer).json()["sub"]
    for method in ("DELETE", "PUT", "OPTIONS"):
        assert op.client().request(method, userinfo, headers=bearer).status_code == 405, method


@pytest.mark.parametrize("change, error", [
    ({"scope": "openid\x85profile"}, "invalid_scope"),  # RFC 6749 3.3: scope tokens are separated by spaces
    ({"code_challenge": "!" * 43}, "invalid_request"),  # never the BASE64URL of a SHA-256: never redeemable
    ({"code_challenge": "a" * 44}, "invalid_request"),
])
def test_an_authorization_request_with_an_odd_scope_or_challenge_is_answered_at_the_redirect_uri(op, change, error):
    answer, _ = start(op, op.client(), **change)
    assert answer.status_code == 303 and callback(answer)["error"] == error
