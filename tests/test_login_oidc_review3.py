"""Third review of the OpenID Connect provider, through a real ``authgw serve`` and slapd, with
Authlib as the relying party:

- a ``code_verifier`` that is not 43 to 128 unreserved characters (RFC 7636 section 4.1) is
  ``invalid_grant`` and does not use the code up: a verifier of one character ("a") redeemed
  the code its challenge was made for, and such a challenge, which travels in the browser's URL,
  gives its verifier away to anyone who tries the few values it can have.

No assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
SECRET = "rp-secret-value-0123456789"


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    base = tmp_path_factory.mktemp("oidc-review3")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": [
        {"client_id": "rp", "redirect_uris": [CB], "client_secret": {"file": str(base / "secret")}}]}})
    try:
        site.gw = site.start()
        site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
        site.browser = site.client()
        assert "signed in as" in site.sign_in(site.browser, "alice", "Alice-pw-1").text
        yield site
    finally:
        site.stop()
        slapd.stop()


def challenge_of(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def code_for(op, verifier: str) -> str:
    """A code answered from the browser's session for a request whose S256 challenge is made
    from *verifier* (Authlib builds the request)."""
    client = OAuth2Session("rp", SECRET, scope="openid profile", redirect_uri=CB)
    uri, state = client.create_authorization_url(op.config["authorization_endpoint"], nonce="n-1",
                                                 code_challenge=challenge_of(verifier), code_challenge_method="S256")
    answer = op.browser.get(uri, allow_redirects=False)
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("X-Refused-Reason"))
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query["state"] == [state], answer.headers["Location"]
    return query["code"][0]


def redeem(op, code: str, verifier: str) -> requests.Response:
    return op.client().post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier,
        "client_id": "rp", "client_secret": SECRET})


UNRESERVED = string.ascii_letters + string.digits + "-._~"


@pytest.mark.parametrize("verifier", [
    "a",                          # one character: its challenge gives it away at once
    "v" * 42,                     # one short of RFC 7636's 43
    "v" * 129,                    # one over its 128
    "v" * 42 + "+",               # not an unreserved character
    "v" * 42 + "é",
    "v" * 20 + " " + "v" * 22,
], ids=["1-char", "42", "129", "plus", "non-ascii", "space"])
def test_a_code_verifier_outside_rfc7636_is_invalid_grant(op, verifier):
    refused = redeem(op, code_for(op, verifier), verifier)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant", refused.text
    assert "access_token" not in refused.text


def test_verifiers_of_43_and_128_unreserved_characters_redeem_and_a_malformed_one_uses_nothing_up(op):
    for length in (43, 128):
        verifier = "".join(secrets.choice(UNRESERVED) for _ in range(length))
        code = code_for(op, verifier)
        # a malformed verifier first (one who read the code and tries a short one): the code stays
        assert redeem(op, code, "a").json()["error"] == "invalid_grant"
        token = redeem(op, code, verifier)
        assert token.status_code == 200, token.text
        assert token.json()["token_type"] == "Bearer" and token.json()["id_token"]
