"""Review of the client_cert plugin: three findings, each through a real ``authgw serve`` that
reads the certificate from its trusted proxy's header (127.0.0.1), with certificates minted by
the test.

* A certificate naming another spelling of a directory user (``ALICE``, ``alİce``) logged in as
  that user through a real slapd, which matches names ignoring case and lowers ``İ`` to ``i``.
* An OCSP answer embedding a certificate whose key type ``cryptography`` does not support, from a
  real responder on loopback, made every login of that CA an internal error, even under
  soft-fail.
* The ``subject`` rule read a comma escaped inside a CN (``CN=eve\\,CN=admin,OU=staff``) as an
  RDN boundary and mapped the certificate to admin.
* A UPN or emailAddress with two ``@`` (``pat@partner.test@corp.test``) passed ``domains:
  [corp.test]`` and, with the domain stripped, named ``pat@partner.test``: a user of another
  domain, whom a real slapd finds by mail.
* ``POST /v1/authenticate`` answered "success" for the certificate its trusted proxy forwarded (the
  calling service's) whatever username and password it was asked about.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from support.gateway import GatewayProcess, static_users, write_conf
from support.http import Response, request
from support.pki import CA, Issued, write_bundle
from support.slapd import Slapd

UTC = dt.timezone.utc
HEADER = "X-SSL-Client-Cert"


def _settings(root: Path, **client_cert) -> dict:
    return {"ca_bundle": str(root), "headers": [{"name": HEADER, "format": "pem"}], **client_cert}


def _start(base: Path, client_cert: dict, chain: list[str], extra: dict[str, str] | None = None) -> GatewayProcess:
    core = {"chain": chain, "trusted_proxies": ["127.0.0.1/32"], "throttle": {"enabled": False},
            "health": {"probe_interval": 3600}}
    conf = write_conf(base / "conf.d", {"gateway.yaml": json.dumps(core),
                                        "client_cert.yaml": json.dumps({"client_cert": client_cert}),
                                        **(extra or {})})
    return GatewayProcess(conf, base / "state").start()


def _login(gateway: GatewayProcess, cert: Issued) -> tuple[Response, dict]:
    """The answer to a certificate from the trusted proxy (bare base64 DER), and its audit line."""
    response = gateway.get("/auth", {HEADER: base64.b64encode(cert.der).decode()})
    return response, gateway.audit_for(response.header("X-Request-Id"))


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create("client_cert review CA")


# -- another spelling of a directory user's name -------------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "alice-pw", mail="alice@example.test")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ldap_gateways(tmp_path_factory, slapd, ca):
    """Two gateways before the same slapd: ``cn`` names as they are, and ``cn`` lower-cased (the
    operator's word that names differ in case only)."""
    base = tmp_path_factory.mktemp("ldap-gw")
    root = write_bundle(base / "root.pem", ca)
    ldap = {"ldap.yaml": json.dumps({"ldap": slapd.plugin_settings(mode="plain")})}
    started = {}
    try:
        for name, rule in (("exact", "cn"), ("lowercase", {"type": "cn", "lowercase": True})):
            started[name] = _start(base / name, _settings(root, revocation="off", mapping={"rules": [rule]}),
                                   ["client_cert", "ldap"], ldap)
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


def test_the_directory_spelling_logs_in(ldap_gateways, ca):
    response, audit = _login(ldap_gateways["exact"], ca.issue("alice", client=True))
    assert response.status == 200, audit
    assert response.header("Remote-User") == "alice"


@pytest.mark.parametrize("cn", ["ALICE", "Alice", "al\u0130ce", "AL\u0130CE"])
def test_another_spelling_of_a_directory_name_is_unknown(ldap_gateways, ca, cn):
    gateway = ldap_gateways["exact"]
    response, audit = _login(gateway, ca.issue(cn, client=True))
    assert response.status == 401, audit
    assert response.header("Remote-User") is None
    # The answer is that of a name the directory does not know: it does not tell alice exists.
    assert (audit["outcome"], audit["reason"], audit["username"]) == ("user_not_found", "cert.user_not_found", None)
    assert f"certificate names {cn!r} by rule cn, which the directory knows only as 'alice'" in gateway.output()


@pytest.mark.parametrize("cn, user", [("ALICE", "alice"), ("al\u0130ce", None), ("AL\u0130CE", None)])
def test_lowercase_rule_accepts_case_only(ldap_gateways, ca, cn, user):
    response, audit = _login(ldap_gateways["lowercase"], ca.issue(cn, client=True))
    assert response.header("Remote-User") == user, audit
    assert response.status == (200 if user else 401)


# -- an OCSP answer that cannot be read -------------------------------------------------------------

_EC_PUBLIC_KEY, _UNKNOWN_KEY_TYPE = bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209")


def _responder(answer) -> tuple[ThreadingHTTPServer, str]:
    """An OCSP responder on loopback answering each request's body with ``answer(body)``."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(200)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ocsp", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/ocsp"


@pytest.fixture(scope="module")
def forged_ocsp():
    """An OCSP responder on loopback whose answers say "good", signed by a key of no CA the
    gateway trusts (byKey), with a certificate attached whose public-key algorithm OID is one
    ``cryptography`` does not support (id-ecPublicKey's arc, last number changed)."""
    attacker = CA.create("forged OCSP responder")
    unreadable = x509.load_der_x509_certificate(attacker.der.replace(_EC_PUBLIC_KEY, _UNKNOWN_KEY_TYPE))

    def answer(body: bytes) -> bytes:
        request = ocsp.load_der_ocsp_request(body)
        now = dt.datetime.now(UTC)
        builder = (ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash, issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number, algorithm=request.hash_algorithm,
            cert_status=ocsp.OCSPCertStatus.GOOD, this_update=now, next_update=now + dt.timedelta(hours=1),
            revocation_time=None, revocation_reason=None)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, attacker.cert).certificates([unreadable]))
        return builder.sign(attacker.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    server, url = _responder(answer)
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("policy", ["soft-fail", "hard-fail"])
def test_an_unreadable_ocsp_answer_is_unknown_not_an_internal_error(tmp_path, ca, forged_ocsp, policy):
    root = write_bundle(tmp_path / "root.pem", ca)
    settings = _settings(root, revocation={"policy": policy, "retry_after_failure": 0},
                         mapping={"rules": ["cn"], "lookup": False})
    gateway = _start(tmp_path, settings, ["client_cert"])
    try:
        cert = ca.issue("olivia", client=True, ocsp_url=forged_ocsp)
        for _ in range(3):  # each login asks the responder again: nothing "good" is cached
            response, audit = _login(gateway, cert)
            if policy == "soft-fail":
                assert response.status == 200, audit
                assert response.header("Remote-User") == "olivia"
            else:
                assert response.status == 401, audit
                assert (audit["outcome"], audit["reason"]) == ("invalid_credentials", "cert.revocation_unknown")
        output = gateway.output()
    finally:
        gateway.stop()
    assert "internal_error" not in output and "Traceback" not in output and "UnsupportedAlgorithm" not in output
    assert "the response is not signed by the CA or a responder it authorised" in output


def test_a_signed_revoked_answer_that_cannot_be_read_is_revoked_not_unknown(tmp_path, ca):
    """The CA's own responder says "revoked" with a reason code ``cryptography`` does not read
    (7, unused in RFC 5280): taken as unknown, soft-fail let the revoked certificate in (review
    of this stop's diff). A signed answer is the CA's word: revoked."""
    from cryptography.hazmat.primitives.asymmetric import ec

    def answer(body: bytes) -> bytes:
        request = ocsp.load_der_ocsp_request(body)
        now = dt.datetime.now(UTC)
        response = (ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash, issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number, algorithm=request.hash_algorithm,
            cert_status=ocsp.OCSPCertStatus.REVOKED, this_update=now - dt.timedelta(minutes=1),
            next_update=now + dt.timedelta(hours=1), revocation_time=now - dt.timedelta(hours=1),
            revocation_reason=x509.ReasonFlags.key_compromise)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert).sign(ca.key, hashes.SHA256()))
        der, tbs = response.public_bytes(serialization.Encoding.DER), response.tbs_response_bytes
        odd = tbs.replace(bytes.fromhex("a0030a0101"), bytes.fromhex("a0030a0107"))  # CRLReason 1 -> 7
        assert odd != tbs
        while len(signature := ca.key.sign(odd, ec.ECDSA(hashes.SHA256()))) != len(response.signature):
            pass  # the DER around it keeps its lengths: a signature as long as the first
        return der.replace(tbs, odd).replace(response.signature, signature)

    server, url = _responder(answer)
    root = write_bundle(tmp_path / "root.pem", ca)
    gateway = _start(tmp_path, _settings(root, revocation={"policy": "soft-fail", "retry_after_failure": 0},
                                         mapping={"rules": ["cn"], "lookup": False}), ["client_cert"])
    try:
        response, audit = _login(gateway, ca.issue("rita", client=True, ocsp_url=url))
        assert response.status == 401 and response.header("Remote-User") is None, audit
        assert audit["reason"] == "cert.revoked", audit
        assert "revoked (its reason or time cannot be read)" in gateway.output()
    finally:
        gateway.stop()
        server.shutdown()
        server.server_close()


# -- RFC 4514 syntax inside a subject value ----------------------------------------------------------


@pytest.fixture(scope="module")
def subject_gateway(tmp_path_factory, ca):
    base = tmp_path_factory.mktemp("subject-gw")
    root = write_bundle(base / "root.pem", ca)
    # A certificate with a UID maps by it, one without by its CN: the first pattern unanchored.
    rules = [{"type": "subject", "pattern": "UID=(\\w+)"}, {"type": "subject", "pattern": "CN=(?P<user>[^,]+),OU=staff"}]
    gateway = _start(base, _settings(root, revocation="off", mapping={"rules": rules, "lookup": False}),
                     ["client_cert"])
    yield gateway
    gateway.stop()


def _staff(ca: CA, *attributes: x509.NameAttribute) -> Issued:
    """A client certificate for ``O=Example, OU=staff`` and *attributes*, which end the subject
    (RFC 4514 text prints them first: ``CN=...,OU=staff,O=Example``)."""
    issued = ca.issue("placeholder", client=True)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "staff"), *attributes])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issued.cert.issuer)
               .public_key(issued.cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(issued.cert.not_valid_before_utc).not_valid_after(issued.cert.not_valid_after_utc))
    for extension in issued.cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return Issued(builder.sign(ca.key, hashes.SHA256()), issued.key)


def test_subject_rule_maps_a_plain_subject(subject_gateway, ca):
    response, audit = _login(subject_gateway, _staff(ca, x509.NameAttribute(NameOID.COMMON_NAME, "eve")))
    assert response.status == 200, audit
    assert response.header("Remote-User") == "eve"


@pytest.mark.parametrize("value", ["eve,CN=admin", "eve UID=admin", "eve+UID=admin", "eve;CN=admin"])
def test_subject_rule_never_reads_a_value_as_structure(subject_gateway, ca, value):
    cert = _staff(ca, x509.NameAttribute(NameOID.COMMON_NAME, value))
    response, audit = _login(subject_gateway, cert)
    assert response.status == 401, audit
    assert response.header("Remote-User") is None
    assert (audit["outcome"], audit["reason"]) == ("user_not_found", "cert.unmapped")
    assert f"certificate not mapped by rule subject: its subject's values hold RFC 4514 syntax " \
           f"({x509.NameAttribute(NameOID.COMMON_NAME, value).rfc4514_string()})" in subject_gateway.output()


# -- a mailbox with two `@` --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def domain_gateway(tmp_path_factory, slapd, ca):
    """Names from corp.test only, the domain stripped, looked up in a real slapd by uid or mail:
    ``pat`` is a user of another domain (``pat@partner.test``)."""
    slapd.add_user("pat", "pat-pw", mail="pat@partner.test")
    base = tmp_path_factory.mktemp("domain-gw")
    root = write_bundle(base / "root.pem", ca)
    by_uid_or_mail = "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))"
    ldap = slapd.plugin_settings(mode="plain", user_filter=by_uid_or_mail)
    rules = [{"type": kind, "domains": ["corp.test"], "strip_domain": True} for kind in ("upn", "subject_email")]
    gateway = _start(base, _settings(root, revocation="off", mapping={"rules": rules}), ["client_cert", "ldap"],
                     {"ldap.yaml": json.dumps({"ldap": ldap})})
    yield gateway
    gateway.stop()


def _mailbox_cert(ca: CA, kind: str, value: str) -> Issued:
    if kind == "upn":
        return ca.issue("placeholder", client=True, upn=value)
    return ca.issue("placeholder", client=True, extra_name=[x509.NameAttribute(NameOID.EMAIL_ADDRESS, value)])


@pytest.mark.parametrize("kind", ["upn", "subject_email"])
def test_a_name_of_the_allowed_domain_logs_in(domain_gateway, ca, kind):
    response, audit = _login(domain_gateway, _mailbox_cert(ca, kind, "alice@corp.test"))
    assert response.status == 200, audit
    assert response.header("Remote-User") == "alice"


@pytest.mark.parametrize("kind", ["upn", "subject_email"])
def test_a_mailbox_with_two_ats_passes_no_domain_filter(domain_gateway, ca, kind):
    """``domains`` read the text after the last ``@``, and stripping it left ``pat@partner.test``,
    another domain's user, whom the directory found by mail: a login as pat."""
    response, audit = _login(domain_gateway, _mailbox_cert(ca, kind, "pat@partner.test@corp.test"))
    assert response.status == 401, audit
    assert response.header("Remote-User") is None
    assert (audit["outcome"], audit["reason"], audit["username"]) == ("user_not_found", "cert.unmapped", None)


# -- the API and a forwarded certificate ---------------------------------------------------------------

_API_TOKEN = "agw_client_cert_review_" + "k" * 24


@pytest.fixture(scope="module")
def api_gateway(tmp_path_factory, ca):
    from gateway.passwords import hash_password

    base = tmp_path_factory.mktemp("api-gw")
    root = write_bundle(base / "root.pem", ca)
    digest = hash_password("alice-pw")
    core_files = static_users({"alice": digest, "bob": digest})
    settings = _settings(root, revocation="off", mapping={"rules": ["cn"]})
    core = {"chain": ["client_cert", "static"], "trusted_proxies": ["127.0.0.1/32"], "throttle": {"enabled": False},
            "health": {"probe_interval": 3600},
            "api_tokens": [{"name": "portal", "sha256": hashlib.sha256(_API_TOKEN.encode()).hexdigest()}]}
    conf = write_conf(base / "conf.d", {"gateway.yaml": json.dumps(core),
                                        "client_cert.yaml": json.dumps({"client_cert": settings}), **core_files})
    gateway = GatewayProcess(conf, base / "state").start()
    yield gateway
    gateway.stop()


def _api(gateway: GatewayProcess, username: str, password: str, headers: dict[str, str]) -> dict:
    response = request(gateway.url, "POST", "/v1/authenticate",
                       {"Authorization": f"Bearer {_API_TOKEN}", "Content-Type": "application/json", **headers},
                       body=json.dumps({"username": username, "password": password}).encode())
    assert response.status == 200, response.body
    return response.json()


def test_a_forwarded_certificate_still_logs_in_at_auth(api_gateway, ca):
    response, audit = _login(api_gateway, ca.issue("bob", client=True))
    assert response.status == 200, audit
    assert response.header("Remote-User") == "bob"


@pytest.mark.parametrize("password, outcome, user",
                         [("wrong", "invalid_credentials", None), ("alice-pw", "success", "alice")])
def test_the_api_answers_for_the_password_not_a_forwarded_certificate(api_gateway, ca, password, outcome, user):
    """The service calling the API through its trusted proxy presented bob's certificate; asked
    whether alice's password holds, the API said "success" as bob, for any password."""
    answer = _api(api_gateway, "alice", password, {HEADER: base64.b64encode(ca.issue("bob", client=True).der).decode()})
    assert (answer["outcome"], answer["step"]) == (outcome, "static"), answer
    assert (answer["identity"] or {}).get("username") == user
