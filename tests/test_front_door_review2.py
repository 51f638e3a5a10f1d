"""Second review of the forward-auth and JSON API front doors and the core chain, against a real
``authgw serve`` (behind a real nginx, with a real slapd where a directory's spelling matters)
and third-party plugins installed as real distributions."""

from __future__ import annotations

import json
import socket

import pytest

from support.fakedist import make_dist
from support.gateway import static_users, write_conf
from support.http import basic, request
from support.net import free_port
from support.nginx import Nginx
from support.slapd import Slapd
from test_nginx_recipe import recipe

PASSWORD = "Mallory-Passw0rd"


def _behind_nginx(tmp_path, gw) -> Nginx:
    port = free_port()
    return Nginx(tmp_path / "nginx", recipe(gw.port, port, free_port()), port=port).start()


def _app_saw(nginx: Nginx, username: str, password: str) -> tuple[int, str]:
    r = request(nginx.url, "GET", "/page", {"Authorization": basic(username, password)})
    return r.status, r.text


@pytest.fixture
def directory(tmp_path):
    slapd = Slapd(tmp_path / "slapd").start()
    yield slapd
    slapd.stop()


def test_a_directory_username_with_white_space_at_an_end_is_not_signed_in_as_another(
        directory, tmp_path, conf_dir, start_gateway):
    """Users sign in with their uid or their mail. Mallory's entry (found by her mail) spells its
    uid ``admin `` (a trailing space: caseIgnoreMatch makes it equal to ``admin`` in a search,
    but it is another entry). ``Remote-User: admin `` reached the application behind nginx as
    ``admin``: HTTP has no way to send white space at the ends of a value (RFC 9110 5.5), nginx
    and every parser drop it. Such a username is not signed in, as one holding a control
    character is not."""
    directory.add_user("admin", "Admin-Passw0rd", mail="admin@example.com")
    directory.add_entry(f"cn=Mallory,{directory.users_dn}", {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
        "cn": "Mallory", "sn": "Mallory", "uid": "admin ", "mail": "mallory@example.com",
        "userPassword": PASSWORD})
    settings = directory.plugin_settings(
        "plain", user_filter="(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))")
    conf = write_conf(conf_dir, {
        "gateway.yaml": "chain: [ldap]\ntrusted_proxies: [127.0.0.1/32]\nthrottle: {enabled: false}\n",
        "ldap.yaml": "ldap: " + json.dumps(settings)})
    gw = start_gateway(conf)
    nginx = _behind_nginx(tmp_path, gw)
    try:
        status, seen = _app_saw(nginx, "mallory@example.com", PASSWORD)
        # Before: 200 and "user=admin authorization=[]": the application took mallory for admin.
        assert status == 401 and "user=admin" not in seen, (status, seen)
        entry = gw.audit()[-1]
        assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", "unrepresentable_username", "ldap")
    finally:
        nginx.stop()


def test_a_group_name_with_white_space_at_an_end_is_left_out_not_read_as_another(
        tmp_path, conf_dir, demo_hash, start_gateway):
    """A group `` admins`` (the comma rule's sibling: ``project-x, admins`` was read as
    ``admins``) reached the application as ``admins``: nginx drops the leading space of the
    first, a backend splitting on commas and stripping does of any other. Left out, with a
    warning, in both ``identity_headers`` modes (percent-encoding leaves spaces as they are)."""
    for mode in ("utf-8", "percent"):
        conf = write_conf(conf_dir / mode, {
            "gateway.yaml": f"chain: [static]\ntrusted_proxies: [127.0.0.1/32]\nidentity_headers: {mode}\n",
            **static_users({"alice": demo_hash}),
        })
        with open(conf / "users" / "users.yaml", "a") as extra:
            extra.write(f'  mallory:\n    password_hash: "{demo_hash}"\n'
                        '    groups: [" admins", "ops", "support ", "\\u3000wheel"]\n')
        gw = start_gateway(conf)
        nginx = _behind_nginx(tmp_path / mode, gw)
        try:
            status, seen = _app_saw(nginx, "mallory", "demo-password")
            assert status == 200, seen
            # Before: "groups=[admins,ops,support ,\u3000wheel]" (utf-8) / "[admins,ops,support ,%E3%80%80wheel]".
            assert seen.splitlines()[1].startswith("groups=[ops] "), (mode, seen)
            assert "white space" in gw.output()
        finally:
            nginx.stop()
        gw.stop()


PLUGINS = {"review2_plugins.py": '''
    from gateway import Decision, Identity, hookimpl
    from gateway.model import MUTUAL_AUTH_KEY

    class Policy:
        """A third-party policy wrapper that rewrites a success (adding a group it computes)."""
        identity = {"groups": ("staff", 7)}

        def __init__(self, settings, context):
            self.name = context.name

        @hookimpl(wrapper=True)
        def gateway_authenticate(self, attempt):
            decision = yield
            if not decision.success:
                return decision
            fields = {"subject": decision.identity.subject, "username": decision.identity.username,
                      "method": decision.identity.method, **self.identity}
            return Decision.allow(Identity(**fields), step=self.name)

    class ControlPolicy(Policy):
        identity = {"username": "alice\\n"}

    class EmptyPolicy(Policy):
        identity = {"username": ""}

    class Stray:
        """A policy wrapper that returns something that is no Decision."""
        def __init__(self, settings, context):
            self.name = context.name

        @hookimpl(wrapper=True)
        def gateway_authenticate(self, attempt):
            yield
            return "allow"

    class Mutual:
        """A step completing a mutual authentication with a token that is no header value."""
        def __init__(self, settings, context):
            self.name = context.name

        @hookimpl
        def gateway_authenticate(self, attempt):
            attempt.stash[MUTUAL_AUTH_KEY] = "Negotiate oRQwEqADCgEA\\r\\nSet-Cookie: session=planted"
            return Decision.allow(Identity(subject="s-1", username=attempt.username, method=self.name),
                                  step=self.name)
'''}


@pytest.fixture
def plugins_env(tmp_path):
    site = make_dist(tmp_path / "site", "review2-plugins", {
        "policy": "review2_plugins:Policy", "control_policy": "review2_plugins:ControlPolicy",
        "empty_policy": "review2_plugins:EmptyPolicy", "mutual": "review2_plugins:Mutual",
        "stray": "review2_plugins:Stray",
    }, PLUGINS)
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize("wrapper, reason", [("policy", "malformed_identity"),
                                             ("control_policy", "unrepresentable_username"),
                                             ("empty_policy", "unrepresentable_username")])
def test_a_wrappers_identity_is_checked_as_a_steps_is(conf_dir, demo_hash, start_gateway, plugins_env,
                                                      wrapper, reason):
    """The fold refused a step's identity that no header can carry; a wrapper's (a policy that
    rewrites the success) was not checked: a group that is a number was an audited success and a
    500, a username with a line feed or an empty one a 200 with an empty ``Remote-User``."""
    conf = write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\nplugins: [{wrapper}]\n",
                                 **static_users({"alice": demo_hash})})
    gw = start_gateway(conf, env=plugins_env)
    r = gw.auth("alice", "demo-password")
    # Before: 500 (policy), 200 with "Remote-User: " (control_policy, empty_policy).
    assert r.status == 401 and r.header("Remote-User") is None, (r.status, r.headers.items())
    entry = gw.audit()[-1]
    assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", reason, wrapper), entry
    assert gw.auth("alice", "demo-password").status == 401 and gw.get("/healthz").status == 200



def test_a_wrapper_that_returns_no_decision_is_denied_and_said(conf_dir, demo_hash, start_gateway, plugins_env):
    """Denied as before, and now with a line naming what came back (it was a silent 401)."""
    conf = write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nplugins: [stray]\n",
                                 **static_users({"alice": demo_hash})})
    gw = start_gateway(conf, env=plugins_env)
    r = gw.auth("alice", "demo-password")
    assert r.status == 401 and r.header("Remote-User") is None
    assert (gw.audit()[-1]["outcome"], gw.audit()[-1]["reason"]) == ("error", "internal_error")
    assert "wrapper returned 'str' instead of a Decision" in gw.output()

def test_a_mutual_authentication_token_that_is_no_header_value_is_dropped_not_the_answer(
        conf_dir, start_gateway, plugins_env):
    """A step's ``MUTUAL_AUTH_KEY`` holding CR LF: the success was audited, then the answer
    could not be written and the connection was reset (no answer at all). The token is dropped
    and logged, as a challenge that is no header value is; the success is answered."""
    conf = write_conf(conf_dir, {"gateway.yaml": "chain: [mutual]\nthrottle: {enabled: false}\n"})
    gw = start_gateway(conf, env=plugins_env)
    r = gw.auth("alice", "anything")  # before: RemoteDisconnected
    assert r.status == 200 and r.header("Remote-User") == "alice"
    assert r.header("WWW-Authenticate") is None and r.header("Set-Cookie") is None
    assert "MUTUAL_AUTH_KEY token is not a header value" in gw.output()


def test_every_spelling_of_a_greek_name_slapd_takes_for_one_spends_one_budget(directory, conf_dir, start_gateway):
    """``ΐ`` (U+0390) case-folds to three code points and its capital ``Ϊ́`` to two; slapd finds
    the same entry for both. The throttle's key (and the cache's) told them apart: the name had
    a second budget of guesses for the directory to bind, as ``İ`` had before (review of the
    forward-auth door)."""
    directory.add_user("\u0390ris", "Iris-Passw0rd")
    conf = write_conf(conf_dir, {
        "gateway.yaml": "chain: [ldap]\nthrottle: {user_failures: 2, user_client_failures: 2, window: 600}\n",
        "ldap.yaml": "ldap: " + json.dumps(directory.plugin_settings("plain", backoff=0))})
    gw = start_gateway(conf)
    assert [gw.auth("\u0390ris", "wrong").status for _ in range(2)] == [401, 401]
    assert [a["reason"] for a in gw.audit()] == ["ldap.invalid_password"] * 2  # the same entry
    assert gw.auth("\u0390ris", "wrong").status == 429
    # Before: 401, "ldap.invalid_password": another spelling, another budget, another bind.
    r = gw.auth("\u03aa\u0301RIS", "wrong")
    assert (r.status, gw.audit()[-1]["reason"]) == (429, "throttled")
