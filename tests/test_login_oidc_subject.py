"""What an OpenID Connect authorization request says about *who* and *how* (OIDC Core 3.1.2.1
``id_token_hint`` and ``acr_values``, 5.5 ``claims`` with a ``sub`` value or an essential
``acr``): never an answer for another user than the request names, whoever is signed in, and
never an essential ``acr`` the sign-in does not meet. Through a real ``authgw serve`` (the
``ldap`` and ``client_cert`` chain steps, the latter on its own TLS listener) and slapd, with
Authlib as the relying party that redeems the codes and validates the id_tokens."""

from __future__ import annotations

import base64
import json
import secrets
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt as authlib_jwt
from authlib.oidc.core import CodeIDToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.login import LoginSite, certificate_listener
from support.pki import CA
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
SECRET = "rp-secret-value-0123456789"
AC = "urn:oasis:names:tc:SAML:2.0:ac:classes:"
PASSWORD, KERBEROS, X509 = AC + "PasswordProtectedTransport", AC + "Kerberos", AC + "X509"


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    base = tmp_path_factory.mktemp("oidc-subject")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    slapd.add_user("bob", "Bob-pw-1", cn="Bob Builder", mail="bob@example.com")
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    ca = CA.create()
    certificate_files, cert_url = certificate_listener(base, ca)
    site = LoginSite(base / "op", slapd, ca, gateway={"chain": ["client_cert", "ldap"]},
                     login={"oidc": {"clients": [{"client_id": "rp", "redirect_uris": [CB],
                                                  "client_secret": {"file": str(base / "secret")}}]}},
                     extra=certificate_files)
    site.gw = site.start()
    site.cert_url = cert_url
    site.alice_cert = ca.issue("alice", client=True).write(base, "alice")
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    yield site
    site.stop()
    slapd.stop()


def rp(op) -> OAuth2Session:
    session = OAuth2Session("rp", SECRET, scope="openid profile", redirect_uri=CB, code_challenge_method="S256",
                            token_endpoint_auth_method="client_secret_post")
    session.trust_env = False
    session.verify = str(op.ca_file)
    return session


def request_url(op, client: OAuth2Session, base: str | None = None, **params) -> tuple[str, str]:
    """An authorization request URL (at *base*, the login listener by default) and its verifier."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")
    uri, _ = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier,
                                             state="st-1", **params)
    return (uri.replace(op.url, base, 1) if base else uri), verifier


def callback(response) -> dict[str, str]:
    """The fields of a redirect to the callback (the answer, code or error)."""
    assert response.status_code == 303, (response.status_code, response.headers.get("X-Refused-Reason"))
    location = response.headers["Location"]
    assert location.startswith(CB + "?"), location
    fields = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert fields["state"] == "st-1" and fields["iss"].startswith("https://localhost:")
    return fields


def id_token(op, client: OAuth2Session, response, verifier: str) -> dict:
    """The code in *response* redeemed by Authlib, the id_token validated against the JWKS."""
    token = client.fetch_token(op.config["token_endpoint"], authorization_response=response.headers["Location"],
                               code_verifier=verifier)
    jwks = op.client().get(op.config["jwks_uri"]).json()
    claims = authlib_jwt.decode(token["id_token"], JsonWebKey.import_key_set(jwks), claims_cls=CodeIDToken,
                                claims_options={"iss": {"essential": True, "value": op.url}},
                                claims_params={"client_id": "rp", "access_token": token["access_token"]})
    claims.validate()
    return {**claims, "raw": token["id_token"]}


def sign_in(op, browser, user: str, password: str, **params):
    """An authorization request answered by a password sign-in at the form; the callback redirect."""
    uri, verifier = request_url(op, rp(op), **params)
    first = browser.get(uri, allow_redirects=False)
    assert first.headers["Location"].startswith("/login?req="), first.headers.get("Location")
    return op.sign_in(browser, user, password, url=op.url + first.headers["Location"], allow_redirects=False), verifier


@pytest.fixture(scope="module")
def tokens(op):
    """alice's and bob's id_tokens, each from a sign-in of their own."""
    found = {}
    for user, password in (("alice", "Alice-pw-1"), ("bob", "Bob-pw-1")):
        answer, verifier = sign_in(op, op.client(), user, password)
        found[user] = id_token(op, rp(op), answer, verifier)
    assert found["alice"]["sub"] != found["bob"]["sub"]
    return found


def alice_browser(op):
    browser = op.client()
    assert "signed in as" in op.sign_in(browser, "alice", "Alice-pw-1").text
    return browser


def forged(op, claims: dict, key_pem: bytes | None = None) -> str:
    """An id_token signed with the provider's own current key (read from its state directory),
    or with *key_pem*: a hint the test makes with the claims it wants (an expired one, another
    issuer, another signer)."""
    own = (op.gw.state_dir / "login" / "signing-current.key").read_bytes()
    kid = op.client().get(op.config["jwks_uri"]).json()["keys"][0]["kid"]  # the current key comes first
    return authlib_jwt.encode({"alg": "RS256", "kid": kid}, claims, key_pem or own).decode()


# -- id_token_hint ---------------------------------------------------------------------------------

def test_an_id_token_hint_for_another_user_is_never_answered_for_the_one_signed_in(op, tokens):
    browser, client = alice_browser(op), rp(op)
    # prompt=none: login_required at the redirect_uri, no code, no page
    uri, _ = request_url(op, client, prompt="none", id_token_hint=tokens["bob"]["raw"])
    fields = callback(browser.get(uri, allow_redirects=False))
    assert fields["error"] == "login_required" and "code" not in fields
    # without prompt=none: the sign-in form (alice's session does not answer), and bob signs in
    uri, verifier = request_url(op, client, id_token_hint=tokens["bob"]["raw"])
    first = browser.get(uri, allow_redirects=False)
    assert first.status_code == 303 and first.headers["Location"].startswith("/login?req=")
    form = browser.get(op.url + first.headers["Location"], allow_redirects=False)
    assert 'id="password"' in form.text and "signed in as" not in form.text
    answer = op.sign_in(browser, "bob", "Bob-pw-1", url=form.url, allow_redirects=False)
    claims = id_token(op, client, answer, verifier)
    assert (claims["sub"], claims["preferred_username"]) == (tokens["bob"]["sub"], "bob")


def test_a_new_sign_in_of_another_user_than_the_hint_names_gets_no_code(op, tokens):
    browser = op.client()
    answer, _ = sign_in(op, browser, "alice", "Alice-pw-1", id_token_hint=tokens["bob"]["raw"])
    fields = callback(answer)
    assert fields["error"] == "login_required" and "code" not in fields
    assert "reason=oidc.subject_mismatch" in op.gw.output()
    # the hint of the user signed in: answered from the session
    client = rp(op)
    uri, verifier = request_url(op, client, prompt="none", id_token_hint=tokens["alice"]["raw"])
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["sub"] == tokens["alice"]["sub"]


def test_an_expired_hint_of_this_provider_names_the_user_and_a_foreign_one_is_invalid_request(op, tokens):
    browser, client = alice_browser(op), rp(op)
    now = int(time.time())
    base = {"iss": op.url, "aud": "rp", "iat": now - 7200, "exp": now - 3600}
    # expired but ours: it names the user (OIDC Core 3.1.2.1), as RP-initiated logout takes it
    uri, verifier = request_url(op, client, prompt="none",
                                id_token_hint=forged(op, {**base, "sub": tokens["alice"]["sub"]}))
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["sub"] == tokens["alice"]["sub"]
    uri, _ = request_url(op, client, prompt="none", id_token_hint=forged(op, {**base, "sub": tokens["bob"]["sub"]}))
    assert callback(browser.get(uri, allow_redirects=False))["error"] == "login_required"
    # not ours: another signer, another issuer, no subject, not a JWT: invalid_request, whoever is signed in
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for hint in (forged(op, {**base, "sub": tokens["alice"]["sub"]}, stranger),
                 forged(op, {**base, "iss": "https://other.example.test", "sub": tokens["alice"]["sub"]}),
                 forged(op, base), "not.a.jwt", tokens["alice"]["raw"][:-4] + "AAAA"):
        uri, _ = request_url(op, client, id_token_hint=hint)
        fields = callback(browser.get(uri, allow_redirects=False))
        assert fields["error"] == "invalid_request" and "code" not in fields, hint
    assert "reason=oidc.id_token_hint_invalid" in op.gw.output()


# -- claims ----------------------------------------------------------------------------------------

def test_a_claims_sub_value_for_another_user_is_never_answered_for_the_one_signed_in(op, tokens):
    browser, client = alice_browser(op), rp(op)
    for member in ("id_token", "userinfo"):
        for request in ({"value": tokens["bob"]["sub"], "essential": True}, {"values": [tokens["bob"]["sub"]]}):
            uri, _ = request_url(op, client, prompt="none", claims=json.dumps({member: {"sub": request}}))
            fields = callback(browser.get(uri, allow_redirects=False))
            assert fields["error"] == "login_required" and "code" not in fields, (member, request)
    # alice's own sub: answered from her session
    uri, verifier = request_url(op, client, prompt="none",
                                claims=json.dumps({"id_token": {"sub": {"value": tokens["alice"]["sub"]}}}))
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["sub"] == tokens["alice"]["sub"]
    # a hint and a claims sub naming different users: nobody can be answered
    uri, _ = request_url(op, client, id_token_hint=tokens["alice"]["raw"],
                         claims=json.dumps({"id_token": {"sub": {"value": tokens["bob"]["sub"]}}}))
    assert callback(browser.get(uri, allow_redirects=False))["error"] == "invalid_request"


@pytest.mark.parametrize("claims", [
    "{", "[]", '"sub"', '{"id_token": []}', '{"id_token": {"sub": 1}}', '{"id_token": {"sub": {"value": 7}}}',
    '{"id_token": {"sub": {"values": "x"}}}', '{"id_token": {"sub": {"value": "a", "values": ["a"]}}}',
    '{"id_token": {"sub": {"essential": "yes"}}}', '{"userinfo": {"sub": {"values": []}}}', "[" * 1000 + "]" * 1000,
])
def test_a_malformed_claims_parameter_is_invalid_request(op, claims):
    browser, client = alice_browser(op), rp(op)
    uri, _ = request_url(op, client, claims=claims)
    fields = callback(browser.get(uri, allow_redirects=False))
    assert fields["error"] == "invalid_request" and "code" not in fields


def test_a_claims_parameter_over_the_parameter_limit_is_refused_on_a_page(op):
    uri, _ = request_url(op, rp(op), claims=json.dumps({"id_token": {"sub": {"value": "x" * 3000}}}))
    page = op.client().get(uri, allow_redirects=False)
    assert (page.status_code, page.headers.get("X-Refused-Reason")) == (400, "login.parameter_too_large")


# -- acr -------------------------------------------------------------------------------------------

def test_the_id_token_states_the_sign_in_method_and_an_essential_acr_is_enforced(op, tokens):
    assert op.config["acr_values_supported"] == [PASSWORD, KERBEROS, X509]
    assert op.config["claims_parameter_supported"] is True and "acr" in op.config["claims_supported"]
    assert tokens["alice"]["acr"] == PASSWORD  # a password sign-in
    browser, client = alice_browser(op), rp(op)

    def essential(*values):
        return json.dumps({"id_token": {"acr": {"essential": True, "values": list(values)}}})

    # an essential acr the password session does not meet: no code
    uri, _ = request_url(op, client, claims=essential(X509))
    fields = callback(browser.get(uri, allow_redirects=False))
    assert fields["error"] == "unmet_authentication_requirements" and "code" not in fields
    assert "reason=oidc.acr_unmet" in op.gw.output()
    # one it meets: answered, and the id_token says so
    uri, verifier = request_url(op, client, claims=essential(X509, PASSWORD))
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["acr"] == PASSWORD
    # values no method of the provider has: refused at once, no session needed
    uri, _ = request_url(op, client, claims=essential(AC + "MobileTwoFactorContract"))
    assert callback(op.client().get(uri, allow_redirects=False))["error"] == "unmet_authentication_requirements"
    # acr_values is voluntary (OIDC Core 3.1.2.1): answered, the acr claim says what the sign-in was
    uri, verifier = request_url(op, client, acr_values=X509)
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["acr"] == PASSWORD


def test_an_essential_x509_acr_is_met_by_a_client_certificate_sign_in(op):
    client = rp(op)
    browser = op.client()
    browser.cert = tuple(str(p) for p in op.alice_cert)
    claims = json.dumps({"id_token": {"acr": {"essential": True, "value": X509}}})
    uri, verifier = request_url(op, client, base=op.cert_url, claims=claims)
    first = browser.get(uri, allow_redirects=False)
    assert first.headers["Location"].startswith("/login?req=")
    answer = browser.get(op.cert_url + first.headers["Location"], allow_redirects=False)  # the certificate signs in
    assert answer.headers["Location"].startswith(CB + "?code=")
    assert id_token(op, client, answer, verifier)["acr"] == X509
    # that session meets it from then on; an essential password acr it does not
    uri, verifier = request_url(op, client, base=op.cert_url, claims=claims, prompt="none")
    assert id_token(op, client, browser.get(uri, allow_redirects=False), verifier)["acr"] == X509
    uri, _ = request_url(op, client, base=op.cert_url, prompt="none",
                         claims=json.dumps({"id_token": {"acr": {"essential": True, "value": PASSWORD}}}))
    assert parse_qs(urlsplit(browser.get(uri, allow_redirects=False).headers["Location"]).query)["error"] == \
        ["unmet_authentication_requirements"]
