"""Single sign-on under the chain's policy, through a real ``authgw serve``, slapd and an
OpenID Connect relying party (Authlib).

A login-door session answered every service (a new OIDC code, userinfo, SAML and WS-Federation
answers) until its ``absolute`` lifetime, whatever a deny-list step before the directory or a
wrapper under ``plugins:`` said by then: they saw sign-ins, never session reuse (review of
account state). Each reuse is now an attempt whose only credential is the session, run through
every step and wrapper with the session's identity as the answer unless one refuses; a refusal
ends the session, and each reuse is audited.
"""

from __future__ import annotations

import json
import os

import pytest
from authlib.integrations.requests_client import OAuth2Session

from support.fakedist import make_dist
from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
SECRET = "rp-secret-value-0123456789"

PLUGINS = {"session_policy.py": '''
    from pathlib import Path

    from gateway import Attempt, Decision, Identity, Outcome, PluginSettings, hookimpl


    class ListSettings(PluginSettings):
        file: str


    def listed(path: str) -> set[str]:
        return set(Path(path).read_text().split())


    class DenyFile:
        """A chain step before the directory: refuses the users named in a file (re-read each time)."""

        Settings = ListSettings

        def __init__(self, settings, context) -> None:
            self.file, self.name = settings.file, context.name

        @hookimpl
        def gateway_authenticate(self, attempt: Attempt):
            if attempt.username is not None and attempt.username in listed(self.file):
                return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason="denyfile.user")
            return None


    class Greedy:
        """A chain step after the directory that takes any attempt without a password for a
        sign-in of its own (as a client-certificate step may from a proxy's header), or raises
        when its file says so."""

        Settings = ListSettings

        def __init__(self, settings, context) -> None:
            self.file, self.name = settings.file, context.name

        @hookimpl
        def gateway_authenticate(self, attempt: Attempt):
            if "raise" in listed(self.file):
                raise RuntimeError("greedy step broken")
            if attempt.password is None:
                return Decision.allow(Identity(subject="someone-else", username="someone-else", method=self.name),
                                      step=self.name)
            return None


    class Suspend:
        """A wrapper: refuses the identities named in a file, whatever step proved them."""

        Settings = ListSettings

        def __init__(self, settings, context) -> None:
            self.file, self.name = settings.file, context.name

        @hookimpl(wrapper=True)
        def gateway_authenticate(self, attempt: Attempt):
            decision = yield
            if decision.success and decision.identity.username in listed(self.file):
                return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason="suspend.user")
            return decision
'''}


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    base = tmp_path_factory.mktemp("policy")
    slapd = Slapd(base / "slapd").start()
    for name in ("alice", "bob", "carol"):
        slapd.add_user(name, f"{name.title()}-pw-1", mail=f"{name}@example.com")
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    denied, suspended, greedy = base / "denied.txt", base / "suspended.txt", base / "greedy.txt"
    for path in (denied, suspended, greedy):
        path.write_text("")
    site_dir = make_dist(base / "site", "session-policy-test", {"denyfile": "session_policy:DenyFile",
                                                                "suspend": "session_policy:Suspend",
                                                                "greedy": "session_policy:Greedy"}, PLUGINS)
    env = {"PYTHONPATH": os.pathsep.join([str(site_dir), os.environ.get("PYTHONPATH", "")])}
    site = LoginSite(base / "op", slapd, CA.create(), env=env,
                     gateway={"chain": ["denyfile", "ldap", "greedy"], "plugins": ["login", "suspend"]},
                     login={"oidc": {"clients": [{"client_id": "rp", "redirect_uris": [CB],
                                                  "client_secret": {"file": str(base / "secret")}}]}},
                     extra={"denyfile.yaml": "denyfile: " + json.dumps({"file": str(denied)}),
                            "suspend.yaml": "suspend: " + json.dumps({"file": str(suspended)}),
                            "greedy.yaml": "greedy: " + json.dumps({"file": str(greedy)})})
    site.gw = site.start()
    site.denied, site.suspended, site.greedy = denied, suspended, greedy
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    yield site
    site.stop()
    slapd.stop()


def rp(op) -> OAuth2Session:
    client = OAuth2Session("rp", SECRET, scope="openid profile", redirect_uri=CB, code_challenge_method="S256")
    client.trust_env = False
    client.verify = str(op.ca_file)
    return client


def signed_in_rp(op, browser, username: str) -> OAuth2Session:
    """*browser* signs *username* in at the OP for a new relying-party client, which takes a token."""
    client = rp(op)
    uri, _ = client.create_authorization_url(op.config["authorization_endpoint"], code_verifier="v" * 50)
    page = browser.get(uri)
    done = op.sign_in(browser, username, f"{username.title()}-pw-1", url=page.url, allow_redirects=False)
    client.fetch_token(op.config["token_endpoint"], authorization_response=done.headers["Location"],
                       code_verifier="v" * 50)
    return client


def reuse(op, browser):
    """Another authorization request with the browser's session (no redirect followed)."""
    uri, _ = rp(op).create_authorization_url(op.config["authorization_endpoint"], code_verifier="w" * 50)
    return browser.get(uri, allow_redirects=False)


def audited(op, username: str) -> list[dict]:
    return [r for r in op.gw.audit() if r.get("username") == username and r["method"] == "session"]


@pytest.mark.parametrize("username, listed, reason", [
    ("alice", "denied", "denyfile.user"),      # a chain step before the directory
    ("bob", "suspended", "suspend.user"),      # a wrapper under plugins:
])
def test_a_session_is_refused_by_the_policy_that_would_refuse_a_sign_in(op, username, listed, reason):
    browser = op.client()
    client = signed_in_rp(op, browser, username)
    allowed = reuse(op, browser)
    assert allowed.status_code == 303 and allowed.headers["Location"].startswith(CB + "?code="), allowed.text
    (first,) = audited(op, username)
    assert (first["outcome"], first["reason"]) == ("success", "login.session")
    assert client.get(op.config["userinfo_endpoint"]).status_code == 200

    getattr(op, listed).write_text(username + "\n")
    try:
        refused = reuse(op, browser)
        # The session ends: the browser is sent to the form, where the policy refuses a sign-in too.
        assert refused.status_code == 303 and refused.headers["Location"].startswith("/login?req="), refused.text
        assert (audited(op, username)[-1]["outcome"], audited(op, username)[-1]["reason"]) == \
            ("account_state", reason)
        assert "signed in as" not in browser.get(f"{op.url}/login").text
        assert client.get(op.config["userinfo_endpoint"]).status_code == 401  # its session is over
        again = op.sign_in(browser, username, f"{username.title()}-pw-1", url=op.url + refused.headers["Location"],
                           allow_redirects=False)
        assert again.status_code != 303 or not again.headers["Location"].startswith(CB + "?code=")
    finally:
        getattr(op, listed).write_text("")


def test_userinfo_is_refused_once_the_policy_refuses_and_the_session_ends(op):
    browser = op.client()
    client = signed_in_rp(op, browser, "carol")
    assert client.get(op.config["userinfo_endpoint"]).json()["sub"]
    op.suspended.write_text("carol\n")
    try:
        info = client.get(op.config["userinfo_endpoint"])
        assert info.status_code == 401 and info.json()["error"] == "invalid_token"
        assert audited(op, "carol")[-1]["reason"] == "suspend.user"
    finally:
        op.suspended.write_text("")
    assert client.get(op.config["userinfo_endpoint"]).status_code == 401  # the session stays ended
    assert "signed in as" not in browser.get(f"{op.url}/login").text


def test_only_refusals_of_the_chain_end_a_session(op):
    """A step after the one that proved the user may answer an attempt without a password for a
    sign-in of its own (the greedy step here; a client-certificate step taking a proxy's
    header): that is not a refusal, and the session goes on as its own user. A step that fails
    (ERROR) issues nothing and leaves the session for when it works again: the relying party is
    told at its redirect_uri (error=temporarily_unavailable; a 503 page before)."""
    browser = op.client()
    signed_in_rp(op, browser, "alice")
    for _ in range(2):
        again = reuse(op, browser)
        assert again.status_code == 303 and again.headers["Location"].startswith(CB + "?code="), again.text
    op.greedy.write_text("raise\n")
    try:
        broken = reuse(op, browser)
        assert broken.status_code == 303, broken.text
        assert broken.headers["Location"].startswith(CB + "?error=temporarily_unavailable&"), broken.headers
        assert "code=" not in broken.headers["Location"]
    finally:
        op.greedy.write_text("")
    assert "signed in as" in browser.get(f"{op.url}/login").text
    assert reuse(op, browser).headers["Location"].startswith(CB + "?code=")
