"""Integrated sign-in at ``/login``: Kerberos SSO in headless Chromium (a ``kinit`` ticket from a
real MIT KDC, no form) inside ``kerberos.allowed_networks``, the form outside them or without a
ticket, and a client certificate on ``client_cert``'s TLS listener."""

from __future__ import annotations

import json
import os
import ssl
import urllib.request

import pytest

from support.browser import chromium
from support.kdc import KDC, write_krb5_conf
from support.login import LoginSite, certificate_listener
from support.pki import CA
from support.slapd import Slapd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrated")
    kdc = KDC(base / "kdc", "EXAMPLE.TEST").start()
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
        conf = write_krb5_conf(base / "krb5.conf", [kdc])
        env = {**kdc.env, "KRB5_CONFIG": str(conf)}
        kdc.add_principal("alice", "alice-kpw")
        kdc.kadmin(f"addprinc -randkey {kdc.principal('HTTP/localhost')}")
        keytab = kdc.export("HTTP/localhost", base / "http.keytab")
        cache = kdc.kinit("alice", "alice-kpw", base / "alice.cc", env=env)
        yield {"base": base, "kdc": kdc, "slapd": slapd, "env": env, "keytab": keytab, "cache": cache,
               "ca": CA.create()}
    finally:
        slapd.stop()
        kdc.stop()


def kerberos_site(world, name: str, networks: list[str]) -> LoginSite:
    kerberos = {"allowed_networks": networks, "keytab": str(world["keytab"]), "realms": ["EXAMPLE.TEST"]}
    return LoginSite(world["base"] / name, world["slapd"], world["ca"], env=world["env"],
                     gateway={"chain": ["kerberos", "ldap"]},
                     extra={"kerberos.yaml": "kerberos: " + json.dumps(kerberos)})


@pytest.fixture(scope="module")
def inside(world):
    site = kerberos_site(world, "inside", ["127.0.0.0/8"])
    site.gw = site.start()
    yield site
    site.stop()


@pytest.fixture(scope="module")
def outside(world):
    site = kerberos_site(world, "outside", ["10.0.0.0/8"])
    site.gw = site.start()
    yield site
    site.stop()


def profile(directory, world) -> tuple[dict, list[str]]:
    # TESTING-NOTES: Chromium on Linux uses GSSAPI only in a profile that has seen a Negotiate
    # challenge before; pre-seed that in Local State.
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Local State").write_text(json.dumps({"net": {"received_http_auth_negotiate_headers": True}}))
    env = {**os.environ, **world["env"], "KRB5CCNAME": f"FILE:{world['cache']}"}
    return env, ["--auth-server-allowlist=localhost"]


def test_the_form_answers_a_negotiate_challenge_inside_and_none_outside(inside, outside):
    inner = inside.client().get(f"{inside.url}/login")
    assert inner.status_code == 401 and inner.headers["WWW-Authenticate"] == "Negotiate"
    assert 'id="password"' in inner.text  # a browser without a ticket shows this body: the form
    outer = outside.client().get(f"{outside.url}/login")
    assert outer.status_code == 200 and "WWW-Authenticate" not in outer.headers and 'id="password"' in outer.text


def test_chromium_with_a_ticket_signs_in_without_the_form(inside, world, tmp_path):
    env, args = profile(tmp_path / "profile", world)
    with chromium(trust=[inside.server_cert], args=args, env=env, user_data_dir=tmp_path / "profile") as context:
        page = context.new_page()
        page.goto(f"{inside.url}/login")
        page.wait_for_selector("#message, #username")
        assert page.inner_text("#message") == "You are signed in as Alice Liddell."
    lines = [a for a in inside.gw.audit() if a["front_door"] == "login"]
    assert (lines[-1]["outcome"], lines[-1]["step"]) == ("success", "kerberos")


def test_chromium_outside_the_networks_or_without_a_ticket_gets_the_form(inside, outside, world, tmp_path):
    env, args = profile(tmp_path / "p1", world)
    with chromium(trust=[outside.server_cert], args=args, env=env, user_data_dir=tmp_path / "p1") as context:
        page = context.new_page()
        page.goto(f"{outside.url}/login")
        page.wait_for_selector("#username")
    env, args = profile(tmp_path / "p2", world)
    env["KRB5CCNAME"] = f"FILE:{tmp_path / 'no-ticket.cc'}"
    with chromium(trust=[inside.server_cert], args=args, env=env, user_data_dir=tmp_path / "p2") as context:
        page = context.new_page()
        page.goto(f"{inside.url}/login")
        page.wait_for_selector("#username")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("#message")
        assert page.inner_text("#message") == "You are signed in as Alice Liddell."


def test_a_client_certificate_on_the_tls_listener_signs_in(world, tmp_path):
    ca = world["ca"]
    certificate_files, cert_url = certificate_listener(tmp_path, ca)
    site = LoginSite(tmp_path / "site", world["slapd"], ca, gateway={"chain": ["client_cert", "ldap"]},
                     extra=certificate_files)
    site.start()
    try:
        cert, key = ca.issue("alice", client=True).write(tmp_path, "alice")
        context = ssl.create_default_context(cadata=ca.pem.decode())
        context.load_cert_chain(cert, key)
        with urllib.request.urlopen(f"{cert_url}/login", context=context, timeout=15) as response:
            body = response.read().decode()
            cookies = " ".join(response.headers.get_all("Set-Cookie"))
        assert "You are signed in as Alice Liddell." in body and "authgw_session=" in cookies
        bare = ssl.create_default_context(cadata=ca.pem.decode())
        try:  # without a certificate: the listener refuses or the form is shown, never a session
            with urllib.request.urlopen(f"{cert_url}/login", context=bare, timeout=15) as response:
                assert "signed in" not in response.read().decode()
        except (ssl.SSLError, OSError):
            pass
    finally:
        site.stop()
