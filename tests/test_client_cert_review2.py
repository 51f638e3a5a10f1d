"""Second review of the client_cert plugin, each finding through a real ``authgw serve`` (or
``authgw check``) that reads the certificate from its trusted proxy's header (127.0.0.1), with
certificates and CRLs minted by the test and served by a real HTTP server on loopback.

* A configured CRL URL held one CRL, and the first one held pinned it to its issuer: the root's
  genuine CRL, served there once at start-up by whoever is on the plain-http path, was held and
  the issuing CA's own CRLs refused from then on ("of another issuer"). A revoked certificate
  logged in under soft-fail; hard-fail refused every certificate of that CA.
* ``authgw check`` with ``check: chain`` refused the root's own CRL at an intermediate's
  distribution point ("not a CA this URL serves"): a FAIL on every such set-up.
* ``domains`` compared with ``str.casefold``, which reads ``ß`` as ``ss``: a UPN
  ``admin@groß.test`` (another domain) passed ``domains: [gross.test]`` and named admin.
* The subject emailAddress was checked against a CA's rfc822Name constraints case-folded the same
  way: a CA constrained to ``gross.test`` named admin with ``admin@groß.test``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from support.gateway import GatewayProcess, authgw, write_conf
from support.http import Response
from support.net import wait_for
from support.ocsp import PkiServer
from support.pki import CA, Issued, write_bundle

UTC = dt.timezone.utc
HEADER = "X-SSL-Client-Cert"


def _start(base: Path, client_cert: dict) -> GatewayProcess:
    core = {"chain": ["client_cert"], "trusted_proxies": ["127.0.0.1/32"], "throttle": {"enabled": False},
            "health": {"probe_interval": 3600}}
    conf = write_conf(base / "conf.d", {"gateway.yaml": json.dumps(core),
                                        "client_cert.yaml": json.dumps({"client_cert": client_cert})})
    return GatewayProcess(conf, base / "state").start()


def _login(gateway: GatewayProcess, cert: Issued) -> tuple[Response, dict]:
    """The answer to a certificate from the trusted proxy (bare base64 DER), and its audit line."""
    response = gateway.get("/auth", {HEADER: base64.b64encode(cert.der).decode()})
    return response, gateway.audit_for(response.header("X-Request-Id"))


@pytest.fixture(scope="module")
def server():
    pki_server = PkiServer().start()
    yield pki_server
    pki_server.stop()


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.create("review2 root CA", days=365)


@pytest.fixture(scope="module")
def issuing(root) -> CA:
    return root.issue("review2 issuing CA", ca=True, not_after=dt.datetime.now(UTC) + dt.timedelta(days=200))


# -- a configured CRL URL is not pinned to the first CRL's issuer -----------------------------------


@pytest.mark.parametrize("policy", ["soft-fail", "hard-fail"])
def test_another_cas_crl_served_once_at_a_configured_url_does_not_pin_it(tmp_path, server, root, issuing, policy):
    name = f"pinned-{policy}.crl"
    path = f"/crl/{name}"
    url = server.put_crl(name, root.crl([]))  # on the path at start-up: the root's genuine CRL
    revoked, good = issuing.issue("amy", client=True), issuing.issue("ann", client=True)
    write_bundle(tmp_path / "root.pem", root)
    write_bundle(tmp_path / "issuing.pem", issuing)
    gateway = _start(tmp_path, {
        "ca_bundle": str(tmp_path / "root.pem"), "intermediates": str(tmp_path / "issuing.pem"),
        "headers": [{"name": HEADER, "format": "pem"}], "mapping": {"rules": ["cn"], "lookup": False},
        "revocation": {"policy": policy, "ocsp": False, "crl_urls": [url], "crl_refresh_interval": 5,
                       "retry_after_failure": 0, "timeout": 2}})
    try:
        wait_for(lambda: server.hits[path] >= 1, 20, interval=0.1, what="the start-up fetch", log=gateway.output)
        server.put_crl(name, issuing.crl([revoked], this_update=dt.datetime.now(UTC)))  # the CA's own
        # Two background refreshes after the switch: the first one to fetch the CA's CRL has ended.
        seen = server.hits[path]
        wait_for(lambda: server.hits[path] >= seen + 2, 40, interval=0.2, what="two CRL refreshes",
                 log=gateway.output)

        response, audit = _login(gateway, revoked)
        assert response.status == 401, audit  # it logged in under soft-fail ("unknown")
        assert (audit["outcome"], audit["reason"]) == ("invalid_credentials", "cert.revoked"), audit
        response, audit = _login(gateway, good)
        assert response.status == 200, audit  # hard-fail refused it (cert.revocation_unknown)
        assert response.header("Remote-User") == "ann"
        assert "is not that of the CRL held" not in gateway.output()
    finally:
        gateway.stop()


# -- authgw check: an intermediate's distribution point serves its issuer ---------------------------


def test_authgw_check_takes_the_roots_crl_at_an_intermediates_distribution_point(tmp_path, server, root):
    url = server.put_crl("check-root.crl", root.crl([]))
    intermediate = root.issue("review2 check CA", ca=True, crl_url=url)
    other = root.issue("review2 other CA", ca=True)  # trusted, but it did not issue the intermediate
    conf_d = tmp_path / "conf.d"
    write_bundle(conf_d / "root.pem", root)
    write_bundle(conf_d / "issuing.pem", intermediate, other)
    settings = {"ca_bundle": "root.pem", "intermediates": "issuing.pem", "mapping": {"rules": ["cn"], "lookup": False},
                "revocation": {"policy": "hard-fail", "check": "chain", "ocsp": False, "timeout": 2}}
    conf = write_conf(conf_d, {"gateway.yaml": json.dumps({"chain": ["client_cert"]}),
                               "client_cert.yaml": json.dumps({"client_cert": settings})})

    result = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    line = next((l for l in result.stdout.splitlines() if f"client_cert.crl[{url}]" in l), "")
    assert line.startswith("PASS"), result.stdout  # FAIL: "its issuer ... is not a CA this URL serves"
    assert "0 of 1 revocation source(s) usable" not in result.stdout
    assert result.returncode == 0, result.stdout + result.stderr

    # Another configured CA's CRL there is still refused: the URL serves the intermediate's issuer only.
    server.put_crl("check-root.crl", other.crl([]))
    result = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    line = next((l for l in result.stdout.splitlines() if f"client_cert.crl[{url}]" in l), "")
    assert line.startswith("FAIL") and "is not a CA this URL serves" in line, result.stdout


# -- names compared by ASCII case only ---------------------------------------------------------------


@pytest.fixture(scope="module")
def constrained(root) -> CA:
    """A CA whose mailboxes are those of gross.test (RFC 5280 4.2.1.10)."""
    return root.issue("review2 gross.test CA", ca=True, name_constraints=x509.NameConstraints(
        permitted_subtrees=[x509.RFC822Name("gross.test"), x509.RFC822Name(".gross.test")], excluded_subtrees=None))


@pytest.fixture(scope="module")
def domain_gateway(tmp_path_factory, root, issuing, constrained):
    base = tmp_path_factory.mktemp("domains")
    write_bundle(base / "root.pem", root)
    write_bundle(base / "issuing.pem", issuing, constrained)
    gateway = _start(base, {
        "ca_bundle": str(base / "root.pem"), "intermediates": str(base / "issuing.pem"),
        "headers": [{"name": HEADER, "format": "pem"}], "revocation": "off",
        "mapping": {"lookup": False, "rules": [{"type": "upn", "domains": ["gross.test"]},
                                                {"type": "subject_email", "strip_domain": True}]}})
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("upn, user", [("admin@gross.test", "admin"), ("admin@GROSS.Test", "admin"),
                                       ("admin@gro\u00df.test", None), ("admin@GRO\u1e9e.TEST", None)])
def test_a_upn_domain_is_compared_without_regard_to_ascii_case_only(domain_gateway, issuing, upn, user):
    response, audit = _login(domain_gateway, issuing.issue("someone", upn=upn, client=True))
    assert response.header("Remote-User") == user, audit
    if user is None:  # it logged in as admin
        assert (response.status, audit["reason"]) == (401, "cert.unmapped"), audit


def _subject_email(address: str) -> x509.NameAttribute:
    # UTF8String: what a CA that lets a requester choose the text writes; IA5String holds ASCII only.
    return x509.NameAttribute(NameOID.EMAIL_ADDRESS, address, _type=x509.name._ASN1Type.UTF8String)


@pytest.mark.parametrize("email, user", [("admin@gross.test", "admin"), ("admin@gro\u00df.test", None),
                                         ("admin@mail.gro\u00df.test", None)])
def test_a_subject_email_outside_an_ascii_constraint_names_no_one(domain_gateway, constrained, email, user):
    response, audit = _login(domain_gateway, constrained.issue("someone", client=True,
                                                               extra_name=[_subject_email(email)]))
    assert response.header("Remote-User") == user, audit
    if user is None:  # a CA constrained to gross.test named admin
        assert (response.status, audit["reason"]) == (401, "cert.untrusted"), audit
