"""A signed-in username is in Unicode normal form KC, or it is not signed in.

LDAP matches names after NFKC (RFC 4518 string preparation): to slapd the uid ``ａｄｍｉｎ``
(full width) is ``admin``. An entry spelt so, found by its own mail, reached the application as
``ａｄｍｉｎ``, which any application that folds names (NFKC, as Django's ``normalize_username``)
reads as the administrator. Against a real slapd and a real ``authgw serve``."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.model import Outcome
from support.chainhelp import build, decide
from support.gateway import write_conf
from support.http import basic, request
from support.slapd import Slapd

PASSWORD = "Mallory-Passw0rd"


@pytest.fixture
def directory(tmp_path):
    slapd = Slapd(tmp_path / "slapd").start()
    yield slapd
    slapd.stop()


def test_a_directory_name_in_compatibility_form_is_not_signed_in_as_the_name_it_folds_to(
        directory, conf_dir, start_gateway):
    directory.add_user("admin", "Admin-Passw0rd", mail="admin@example.com")
    directory.add_entry(f"cn=Mallory,{directory.users_dn}", {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
        "cn": "Mallory", "sn": "Mallory", "uid": "ａｄｍｉｎ", "mail": "mallory@example.com",
        "userPassword": PASSWORD})
    settings = directory.plugin_settings(
        "plain", user_filter="(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))")
    conf = write_conf(conf_dir, {
        "gateway.yaml": "chain: [ldap]\nthrottle: {enabled: false}\n",
        "ldap.yaml": "ldap: " + json.dumps(settings)})
    gw = start_gateway(conf)

    r = request(gw.url, "GET", "/auth", {"Authorization": basic("mallory@example.com", PASSWORD)})
    # Before: 200 with Remote-User: ａｄｍｉｎ (the directory's own password check passed).
    assert r.status == 401 and "remote-user" not in {k.lower() for k in r.headers}, (r.status, r.headers)
    entry = gw.audit()[-1]
    assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", "unnormalised_username", "ldap")
    # The administrator, typed as they are, still signs in as themselves.
    r = request(gw.url, "GET", "/auth", {"Authorization": basic("admin", "Admin-Passw0rd")})
    assert r.status == 200 and r.headers.get("Remote-User") == "admin", (r.status, r.headers)


def test_only_names_nfkc_leaves_as_they_are_are_signed_in(tmp_path, caplog):
    # Full width, a ligature, a decomposed accent: each is another spelling of a name NFKC gives.
    for name in ("ｂｏｂ", "ﬁona", "zoe\u0308"):
        folder = tmp_path / name.encode("unicode_escape").decode().replace("\\", "_")
        folder.mkdir()
        runtime = build(folder, {"chain": ["a"]}, {"a": {"action": "success", "success_as": name}})
        with caplog.at_level(logging.ERROR, logger="authgw"):
            decision = decide(runtime)
        assert (decision.outcome, decision.step, decision.reason) == (Outcome.ERROR, "a", "unnormalised_username")
        assert "normal form KC" in caplog.text
    # Names already in that form, ASCII or not, are signed in as spelt.
    for name in ("zoë", "Ærøskøbing", "李雷", "admin"):
        folder = tmp_path / f"ok-{len(name)}-{ord(name[0])}"
        folder.mkdir()
        runtime = build(folder, {"chain": ["a"]}, {"a": {"action": "success", "success_as": name}})
        assert decide(runtime).identity.username == name
