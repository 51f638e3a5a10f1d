"""The client_cert plugin in-process: header decoding, the directory binding check through the
real core chain (a small directory plugin registered in the test, as the LDAP plugin would answer
``gateway_lookup_user``), revocation of intermediates, CRL caching, background refresh and
rollback, partitioned CRLs, OCSP answers that must not be believed, rfc822Name constraints on the
subject's emailAddress, ``authgw check`` self-tests, and settings errors.
Certificates, CRLs and OCSP answers are real, made by ``support.pki`` and ``support.ocsp``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import Attempt, BackendUnavailable, CertificateCredential, Identity, Outcome, hookimpl
from gateway.plugins.client_cert.crl import CrlStore
from gateway.plugins.client_cert.headers import parse_pem_header, parse_xfcc
from gateway.plugins.client_cert.mapping import directory_binding_matches
from gateway.plugins.client_cert.ocsp import OcspClient
from gateway.plugins.client_cert.settings import RevocationSettings
from gateway.plugins.client_cert.status import Status
from gateway.plugins.client_cert.verify import CertError, TrustStore, UsagePolicy
from gateway.runtime import build_runtime
from support.gateway import authgw, write_conf
from support.net import free_port
from support.ocsp import PkiServer
from support.pki import CA, partition, write_bundle

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def server():
    pki_server = PkiServer().start()
    yield pki_server
    pki_server.stop()


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.create("units root CA", days=365)


@pytest.fixture(scope="module")
def issuing(root, server) -> CA:
    ca = root.issue("units issuing CA", ca=True, not_after=dt.datetime.now(UTC) + dt.timedelta(days=200),
                    ocsp_url=server.url("/ocsp"))
    server.add_issuer(root)  # the root signs answers about its intermediates itself
    server.add_issuer(ca, ca.issue("units responder", ekus=[ExtendedKeyUsageOID.OCSP_SIGNING]))
    return ca


def _conf(directory: Path, root: CA, issuing: CA, **client_cert) -> Path:
    write_bundle(directory / "conf.d" / "root.pem", root)  # relative paths start at conf.d
    write_bundle(directory / "conf.d" / "issuing.pem", issuing)
    settings = {"ca_bundle": "root.pem", "intermediates": "issuing.pem", "revocation": "off", **client_cert}
    return write_conf(directory / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"], "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
    })


def _attempt(cert) -> Attempt:
    import ipaddress

    return Attempt(request_id="t", client=ipaddress.ip_address("127.0.0.1"), front_door="forward_auth",
                   deadline=time.monotonic() + 5, certificate=CertificateCredential((cert.der,), "tls"))


class Directory:
    """A directory answering ``gateway_lookup_user`` the way the LDAP plugin does."""

    def __init__(self) -> None:
        self.claims: dict = {}
        self.down = False

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        if self.down:
            raise BackendUnavailable("ldap.unreachable", "test")
        if username != "alice":
            return None
        return Identity(subject="guid-alice", username="alice", method="ldap", email="alice@example.com",
                        groups=("staff",), claims=dict(self.claims))


@pytest.fixture
def bound(tmp_path, root, issuing):
    """An in-process core with ``require_directory_match`` and the test directory."""
    conf = _conf(tmp_path, root, issuing, mapping={"rules": ["upn"], "require_directory_match": True})
    runtime = build_runtime(conf, state_dir=tmp_path / "state")
    directory = Directory()
    runtime.gateway.pm.register(directory, name="directory")
    yield runtime.gateway, directory
    runtime.discard()


# -- directory binding (AD strong mapping) -----------------------------------------------------------


def test_directory_binding_by_user_certificate(bound, issuing):
    gateway, directory = bound
    cert = issuing.issue("Alice", client=True, upn="alice@example.com")
    other = issuing.issue("Alice", client=True, upn="alice@example.com")
    directory.claims = {"userCertificate;binary": [other.der, cert.der]}
    decision = gateway.decide(_attempt(cert))
    assert decision.success and decision.identity.subject == "guid-alice"
    assert decision.identity.method == "client_cert" and decision.identity.groups == ("staff",)
    assert "userCertificate;binary" not in decision.identity.claims  # bytes are not JSON
    json.dumps(decision.identity.to_json())
    directory.claims = {"userCertificate": [base64.b64encode(cert.der).decode()]}
    assert gateway.decide(_attempt(cert)).success
    directory.claims = {"userCertificate": [other.der]}
    decision = gateway.decide(_attempt(cert))
    assert (decision.outcome, decision.reason) == (Outcome.INVALID_CREDENTIALS, "cert.directory_mismatch")


def test_directory_binding_by_alt_security_identities(bound, issuing):
    gateway, directory = bound
    cert = issuing.issue("Alice", client=True, upn="alice@example.com")
    serial = cert.cert.serial_number.to_bytes((cert.cert.serial_number.bit_length() + 7) // 8, "big")
    x500_issuer = "O=authgw tests,CN=units issuing CA"  # AD writes the issuer most significant first
    ski = x509.SubjectKeyIdentifier.from_public_key(cert.cert.public_key()).digest.hex().upper()
    sha1 = hashlib.sha1(cert.der).hexdigest()
    strong = [f"X509:<I>{x500_issuer}<SR>{serial[::-1].hex()}",  # AD: serial bytes reversed
              f"X509:<I>CN=units issuing CA, O=authgw tests<SR>{serial[::-1].hex().upper()}",
              f"X509:<SKI>{ski}", f"X509:<SHA1-PUKEY>{sha1}"]
    for mapping in strong:
        directory.claims = {"altSecurityIdentities": [mapping]}
        assert gateway.decide(_attempt(cert)).success, mapping
    weak = [f"X509:<I>{x500_issuer}<S>O=authgw tests,CN=Alice", "X509:<S>O=authgw tests,CN=Alice",
            "X509:<RFC822>alice@example.com", f"X509:<SKI>{'00' * 20}",
            f"X509:<I>{x500_issuer}<SR>{serial.hex()}"]  # forward: only with mapping.serial_order
    for mapping in weak:
        directory.claims = {"altSecurityIdentities": mapping}
        assert gateway.decide(_attempt(cert)).reason == "cert.directory_mismatch", mapping
    directory.claims = {}
    assert gateway.decide(_attempt(cert)).reason == "cert.directory_mismatch"


def test_directory_unavailable_is_a_note_not_a_deny(bound, issuing):
    gateway, directory = bound
    directory.down = True
    decision = gateway.decide(_attempt(issuing.issue("Alice", client=True, upn="alice@example.com")))
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "cert.directory_unavailable")


def test_binding_ignores_other_claims(issuing):
    cert = issuing.issue("Alice", client=True)
    assert not directory_binding_matches({"mail": cert.der, "usercertificate": "not base64!"}, cert.cert)
    assert directory_binding_matches({"USERCERTIFICATE": cert.pem.decode()}, cert.cert)


# -- revocation ----------------------------------------------------------------------------------------


def test_revoked_intermediate_with_check_chain(tmp_path, root, issuing, server):
    """The root answers OCSP itself about the intermediate (CA-signed responses)."""
    revoked_ca = root.issue("units revoked CA", ca=True, ocsp_url=server.url("/ocsp"))
    server.add_issuer(revoked_ca)
    server.revoke(revoked_ca)
    write_bundle(tmp_path / "conf.d" / "both.pem", issuing, revoked_ca)
    conf = _conf(tmp_path, root, issuing, intermediates="both.pem", mapping={"rules": ["cn"], "lookup": False},
                 revocation={"policy": "hard-fail", "check": "chain"})
    runtime = build_runtime(conf, state_dir=tmp_path / "state")
    try:
        ocsp_url = server.url("/ocsp")
        good = runtime.gateway.decide(_attempt(issuing.issue("amy", client=True, ocsp_url=ocsp_url)))
        assert good.success, good
        bad = runtime.gateway.decide(_attempt(revoked_ca.issue("amy", client=True, ocsp_url=ocsp_url)))
        assert (bad.outcome, bad.reason) == (Outcome.INVALID_CREDENTIALS, "cert.revoked")
    finally:
        runtime.discard()


def test_crl_file_under_hard_fail(tmp_path, root, issuing):
    listed, clean = issuing.issue("amy", client=True), issuing.issue("amy", client=True)
    other = root.issue("units other CA", ca=True)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "issuing.crl").write_bytes(issuing.crl([listed]))
    write_bundle(tmp_path / "conf.d" / "both.pem", issuing, other)
    conf = _conf(tmp_path, root, issuing, intermediates="both.pem", mapping={"rules": ["cn"], "lookup": False},
                 revocation={"policy": "hard-fail", "crl_files": ["issuing.crl"]})
    runtime = build_runtime(conf, state_dir=tmp_path / "state")
    try:
        assert runtime.gateway.decide(_attempt(clean)).success
        revoked = runtime.gateway.decide(_attempt(listed))
        assert (revoked.outcome, revoked.reason) == (Outcome.INVALID_CREDENTIALS, "cert.revoked")
        # That CRL says nothing about another CA's certificates: hard-fail denies them.
        unknown = runtime.gateway.decide(_attempt(other.issue("amy", client=True)))
        assert (unknown.outcome, unknown.reason) == (Outcome.INVALID_CREDENTIALS, "cert.revocation_unknown")
    finally:
        runtime.discard()


def test_crl_cached_refreshed_in_background_and_never_rolled_back(issuing, server):
    import logging

    now = dt.datetime.now(UTC)
    url = server.put_crl("refresh.crl", issuing.crl([], next_update=now + dt.timedelta(seconds=2)))
    cert = issuing.issue("amy", client=True, crl_url=url)
    store = CrlStore(RevocationSettings(policy="hard-fail", timeout=2), logging.getLogger("test"), 0)
    deadline = time.monotonic() + 5
    assert store.status(cert.cert, issuing.cert, deadline).status is Status.GOOD
    assert store.status(cert.cert, issuing.cert, deadline).status is Status.GOOD
    assert server.hits["/crl/refresh.crl"] == 1  # kept until nextUpdate
    server.put_crl("refresh.crl", issuing.crl([cert], next_update=now + dt.timedelta(hours=1)))
    time.sleep(2.2)  # let nextUpdate pass
    store.refresh()  # what the background thread does
    assert server.hits["/crl/refresh.crl"] == 2
    assert store.status(cert.cert, issuing.cert, time.monotonic() + 5).status is Status.REVOKED
    assert server.hits["/crl/refresh.crl"] == 2
    # A CA's older CRL served again (a replay) does not replace the newer one.
    server.put_crl("refresh.crl", issuing.crl([], this_update=now - dt.timedelta(hours=1)))
    # Due for the periodic refresh without waiting crl_refresh_interval. (Not "= 0": monotonic()
    # counts from boot, and a CI machine may have been up for less than the interval.)
    store._urls[url].fetched -= store.settings.crl_refresh_interval
    store.refresh()
    assert server.hits["/crl/refresh.crl"] == 3
    assert store.status(cert.cert, issuing.cert, time.monotonic() + 5).status is Status.REVOKED


def _crl_store(directory: Path, *crls: bytes, **settings) -> CrlStore:
    """A store holding *crls* as files (hard-fail, no OCSP: the CRLs alone answer)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for number, der in enumerate(crls):
        files.append(directory / f"{number}.crl")
        files[-1].write_bytes(der)
    return CrlStore(RevocationSettings(policy="hard-fail", crl_files=files, ocsp=False, **settings),
                    logging.getLogger("test"), 0)


def test_crl_of_another_partition_proves_nothing(tmp_path, issuing):
    """RFC 5280 6.3.3 (b)(2)(i): the CA splits its CRL by distribution point. The certificate's is
    B; partition A, fresh and signed by the same CA, does not list it and must not make it good."""
    dead = f"http://127.0.0.1:{free_port()}"
    part_a, part_b = f"{dead}/part-a.crl", f"{dead}/part-b.crl"
    listed, clean = issuing.issue("amy", client=True, crl_url=part_b), issuing.issue("amy", client=True, crl_url=part_b)
    deadline = time.monotonic() + 5

    # A held, B unreachable (the review's case): unknown, with both reasons.
    store = _crl_store(tmp_path / "a", issuing.crl([], idp=partition(part_a)))
    verdict = store.status(clean.cert, issuing.cert, deadline)
    assert verdict.status is Status.UNKNOWN, verdict
    assert part_b in verdict.detail and "a distribution point the certificate does not name" in verdict.detail
    # B never fetched: A alone is still no answer (not NONE either: the issuer's CRL is missing).
    store = _crl_store(tmp_path / "a-only", issuing.crl([], idp=partition(part_a)), crl_distribution_points=False)
    assert store.status(clean.cert, issuing.cert, deadline).status is Status.UNKNOWN
    # B held: its contents answer, also next to A.
    for name, crls in {"b": [issuing.crl([listed], idp=partition(part_b))],
                       "a-and-b": [issuing.crl([], idp=partition(part_a)),
                                   issuing.crl([listed], idp=partition("ldap://dir.example/cn=B", part_b))]}.items():
        store = _crl_store(tmp_path / name, *crls, crl_distribution_points=False)
        assert store.status(listed.cert, issuing.cert, deadline).status is Status.REVOKED, name
        assert store.status(clean.cert, issuing.cert, deadline).status is Status.GOOD, name
    # A CRL without an issuingDistributionPoint covers every certificate of its issuer, as before.
    store = _crl_store(tmp_path / "whole", issuing.crl([listed]), crl_distribution_points=False)
    assert store.status(listed.cert, issuing.cert, deadline).status is Status.REVOKED
    assert store.status(clean.cert, issuing.cert, deadline).status is Status.GOOD


def test_crls_whose_scope_leaves_the_certificate_out(tmp_path, issuing):
    """Issuer and signature are right; the issuingDistributionPoint says the CRL is not about
    this certificate, so its status stays unknown."""
    with_dp = issuing.issue("amy", client=True, crl_url="http://crl.example/b.crl")
    without_dp = issuing.issue("amy", client=True)
    deadline = time.monotonic() + 5
    cases = {
        "attribute certificates only": (with_dp, partition(only_contains_attribute_certs=True)),
        "CA certificates only": (with_dp, partition(only_contains_ca_certs=True)),
        "a partition, for a certificate without distribution points":
            (without_dp, partition("http://crl.example/b.crl")),
    }
    for what, (cert, idp) in cases.items():
        store = _crl_store(tmp_path / what.replace(" ", "-"), issuing.crl([], idp=idp), crl_distribution_points=False)
        verdict = store.status(cert.cert, issuing.cert, deadline)
        assert verdict.status is Status.UNKNOWN and "does not cover it" in verdict.detail, (what, verdict)
    # The scope flags that do fit still apply: an end-entity-only CRL answers for a leaf.
    store = _crl_store(tmp_path / "users", issuing.crl([], idp=partition(only_contains_user_certs=True)),
                       crl_distribution_points=False)
    assert store.status(without_dp.cert, issuing.cert, deadline).status is Status.GOOD


@pytest.mark.parametrize("policy, outcome, reason", [
    ("hard-fail", Outcome.INVALID_CREDENTIALS, "cert.revocation_unknown"),
    ("soft-fail", Outcome.SUCCESS, ""),
])
def test_other_partitions_crl_under_each_policy(tmp_path, root, issuing, policy, outcome, reason):
    part_b = f"http://127.0.0.1:{free_port()}/part-b.crl"  # unreachable
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "part-a.crl").write_bytes(issuing.crl([], idp=partition("http://127.0.0.1:9/part-a.crl")))
    conf = _conf(tmp_path, root, issuing, mapping={"rules": ["cn"], "lookup": False},
                 revocation={"policy": policy, "crl_files": ["part-a.crl"], "timeout": 1})
    runtime = build_runtime(conf, state_dir=tmp_path / "state")
    try:
        decision = runtime.gateway.decide(_attempt(issuing.issue("amy", client=True, crl_url=part_b)))
        assert (decision.outcome, decision.reason) == (outcome, reason), decision
        if decision.success:
            assert decision.identity.claims["certificate_revocation"] == "unknown"
    finally:
        runtime.discard()


def test_ocsp_answers_that_are_not_believed(issuing, server):
    import logging

    rogue = CA.create("rogue responder")
    cert = issuing.issue("amy", client=True, ocsp_url=server.url("/ocsp"))
    client = OcspClient(RevocationSettings(policy="hard-fail", ocsp_require_nonce=True), logging.getLogger("test"), 60)

    def answer(signer, status=ocsp.OCSPCertStatus.GOOD, nonce=None, this_update=None, certs=()):
        now = dt.datetime.now(UTC)
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert.cert, issuer=issuing.cert, algorithm=hashes.SHA1(), cert_status=status,
            this_update=this_update or now, next_update=(this_update or now) + dt.timedelta(hours=1),
            revocation_time=None, revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.NAME, signer.cert)
        if certs:
            builder = builder.certificates(list(certs))
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        der = builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        return ocsp.load_der_ocsp_response(der)

    nonce = b"n" * 32
    verdict, _ = client.judge(answer(issuing, nonce=nonce), cert.cert, issuing.cert, nonce)
    assert verdict.status is Status.GOOD
    no_eku = issuing.issue("responder without OCSPSigning")
    cases = {
        "signed by a key the CA never authorised": answer(rogue, nonce=nonce, certs=[rogue.cert]),
        "signed by a CA-issued certificate without OCSPSigning": answer(no_eku, nonce=nonce, certs=[no_eku.cert]),
        "without the required nonce": answer(issuing),
        "with another nonce": answer(issuing, nonce=b"m" * 32),
        "from the future": answer(issuing, nonce=nonce, this_update=dt.datetime.now(UTC) + dt.timedelta(hours=2)),
        "too old": answer(issuing, nonce=nonce, this_update=dt.datetime.now(UTC) - dt.timedelta(hours=3)),
    }
    for what, response in cases.items():
        verdict, _ = client.judge(response, cert.cert, issuing.cert, nonce)
        assert verdict.status is Status.UNKNOWN, what
    unauthorized = ocsp.load_der_ocsp_response(ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER))
    assert client.judge(unauthorized, cert.cert, issuing.cert, nonce)[0].status is Status.UNKNOWN


# -- name constraints on the subject's emailAddress ---------------------------------------------------------


def _email(address: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.EMAIL_ADDRESS, address)


def _constrained(root: CA, permitted=(), excluded=()) -> CA:
    """A partner sub-CA under *root* with rfc822Name name constraints."""
    constraints = x509.NameConstraints(permitted_subtrees=[x509.RFC822Name(n) for n in permitted] or None,
                                       excluded_subtrees=[x509.RFC822Name(n) for n in excluded] or None)
    return root.issue("units partner CA", ca=True, name_constraints=constraints)


def _verify(root: CA, leaf, *intermediates: CA) -> str | None:
    """None when the path verifies, else the reason code."""
    usage = UsagePolicy(frozenset({ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string}), True, frozenset(), 60)
    trust = TrustStore([root.cert], [ca.cert for ca in intermediates], usage, cache_seconds=0)
    try:
        trust.verify([leaf.der])
    except CertError as exc:
        return exc.reason
    return None


@pytest.mark.parametrize("permitted, excluded, subject_emails, sans, accepted", [
    # host form: every mailbox on that host, and no other host
    (["partner.example"], [], ["ann@partner.example"], [], True),
    (["partner.example"], [], ["Ann@PARTNER.Example"], [], True),
    (["partner.example"], [], ["admin@corp.example"], [], False),  # the review's certificate
    (["partner.example"], [], ["ann@eu.partner.example"], [], False),
    (["partner.example"], [], ["ann@partner.example", "admin@corp.example"], [], False),
    (["partner.example"], [], ["admin"], [], False),  # not a mailbox: cannot be shown inside
    (["partner.example"], [], [], [], True),  # nothing to check
    # domain form: any host below the domain, not the domain itself
    ([".partner.example"], [], ["ann@eu.partner.example"], [], True),
    ([".partner.example"], [], ["ann@partner.example"], [], False),
    ([".partner.example"], [], ["ann@evilpartner.example"], [], False),
    # mailbox form: that one mailbox
    (["boss@partner.example"], [], ["boss@partner.example"], [], True),
    (["boss@partner.example"], [], ["ann@partner.example"], [], False),
    # excluded subtrees, alone and within a permitted one
    ([], ["corp.example"], ["ann@partner.example"], [], True),
    ([], ["corp.example"], ["admin@corp.example"], [], False),
    ([], ["corp.example"], ["ADMIN@Corp.Example."], [], False),  # case and root label do not escape
    ([], [".corp.example"], ["admin@hq.corp.example"], [], False),
    (["partner.example"], ["intern@partner.example"], ["intern@partner.example"], [], False),
    # a SAN email inside the constraints: the verifier checks the SAN, this check the subject
    (["partner.example"], [], [], ["ann@partner.example"], True),
    (["partner.example"], [], ["ann@partner.example"], ["ann@partner.example"], True),
    (["partner.example"], [], ["admin@corp.example"], ["ann@partner.example"], False),
])
def test_rfc822_constraints_bind_the_subject_email(root, permitted, excluded, subject_emails, sans, accepted):
    """RFC 5280 4.2.1.10: rfc822Name constraints apply to the subject's emailAddress, which the
    ``subject_email`` rule and the profile's email read (cryptography checks the SAN only)."""
    partner = _constrained(root, permitted, excluded)
    leaf = partner.issue("admin", client=True, emails=sans, extra_name=[_email(e) for e in subject_emails])
    assert _verify(root, leaf, partner) == (None if accepted else "cert.untrusted")


def test_rfc822_constraints_of_every_ca_on_the_path(root):
    """A constraint binds the whole subtree below its CA, not only the certificates it signs."""
    partner = _constrained(root, permitted=["partner.example"])
    issuing = partner.issue("units partner issuing CA", ca=True)
    inside = issuing.issue("ann", client=True, extra_name=[_email("ann@partner.example")])
    outside = issuing.issue("admin", client=True, extra_name=[_email("admin@corp.example")])
    assert _verify(root, inside, partner, issuing) is None
    assert _verify(root, outside, partner, issuing) == "cert.untrusted"
    # Without constraints anywhere, a subject email is not restricted.
    plain = root.issue("units plain CA", ca=True)
    assert _verify(root, plain.issue("admin", client=True, extra_name=[_email("admin@corp.example")]), plain) is None


def test_subject_email_outside_the_constraints_logs_nobody_in(tmp_path, root, issuing):
    partner = _constrained(root, permitted=["partner.example"])
    write_bundle(tmp_path / "conf.d" / "cas.pem", issuing, partner)
    conf = _conf(tmp_path, root, issuing, intermediates="cas.pem",
                 mapping={"rules": ["subject_email"], "lookup": False})
    runtime = build_runtime(conf, state_dir=tmp_path / "state")
    try:
        ann = runtime.gateway.decide(_attempt(partner.issue("ann", client=True,
                                                            extra_name=[_email("ann@partner.example")])))
        assert ann.success and ann.identity.email == "ann@partner.example", ann
        admin = runtime.gateway.decide(_attempt(partner.issue("admin", client=True,
                                                              extra_name=[_email("admin@corp.example")])))
        assert (admin.outcome, admin.reason) == (Outcome.INVALID_CREDENTIALS, "cert.untrusted")
    finally:
        runtime.discard()


# -- header decoding -------------------------------------------------------------------------------------


def test_header_encodings(issuing):
    cert = issuing.issue("amy", client=True)
    pem = cert.pem.decode()
    assert parse_pem_header(quote(pem, safe="")) == (cert.der,)  # nginx $ssl_client_escaped_cert
    legacy = pem.strip().replace("\n", "\n\t")  # nginx $ssl_client_cert (deprecated)
    assert parse_pem_header(legacy) == (cert.der,)
    traefik = ",".join(base64.b64encode(c.der).decode() for c in (cert, issuing))
    assert parse_pem_header(quote(traefik, safe="")) == (cert.der, issuing.der)  # Traefik, leaf first
    assert parse_pem_header("") is None and parse_pem_header("-") is None
    quoted = quote(pem, safe="")
    xfcc = f'By=spiffe://a;Hash=1;Subject="CN=amy,O=\\"quoted\\", inc";URI=;Cert="{quoted}"'
    assert parse_xfcc(xfcc) == (cert.der,)
    assert parse_xfcc("By=spiffe://a;Hash=1") is None  # the proxy forwards no certificate
    for bad in ('Cert="x', "Cert=a;Cert=b", "=x", f'Cert="{quoted}"junk'):
        with pytest.raises(CertError) as info:
            parse_xfcc(bad)
        assert info.value.reason == "cert.malformed"
    with pytest.raises(CertError):
        parse_pem_header("A" * 70000)


# -- self-tests and settings --------------------------------------------------------------------------------


def test_selftests(tmp_path, root, issuing, server):
    soon = CA.create("units CA expiring soon", days=20)
    write_bundle(tmp_path / "roots.pem", root, soon)
    (tmp_path / "fresh.crl").write_bytes(issuing.crl([]))
    now = dt.datetime.now(UTC)
    (tmp_path / "stale.crl").write_bytes(issuing.crl([], this_update=now - dt.timedelta(days=3),
                                                     next_update=now - dt.timedelta(days=1)))
    root.issue("localhost", ips=["127.0.0.1"], server=True).write(tmp_path / "conf.d", "server")
    fresh_url = server.put_crl("units.crl", issuing.crl([]))
    dead = f"http://127.0.0.1:{free_port()}/crl"
    conf = _conf(tmp_path, root, issuing, ca_bundle="../roots.pem", revocation={
        "policy": "hard-fail", "crl_files": ["../fresh.crl", "../stale.crl"], "crl_urls": [fresh_url, dead],
        "ocsp_responder": server.url("/ocsp"), "timeout": 2},
        listener={"address": f"127.0.0.1:{free_port()}", "certificate": "server.crt", "key": "server.key"})
    result = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    out = result.stdout
    lines = {line[6:].split(": ", 1)[0]: line[:4] for line in out.splitlines()  # "STATUS name: detail"
             if line[:4] in ("PASS", "WARN", "FAIL")}
    assert lines["client_cert.ca_bundle"] == "WARN", out  # the second root expires within 30 days
    assert "CN=units CA expiring soon" in out and "within 30 days" in out
    assert lines["client_cert.intermediates"] == "PASS", out
    assert lines["client_cert.listener_certificate"] == "WARN", out  # issued for 7 days
    assert "renew the listener's certificate" in out
    assert lines[f"client_cert.crl[{tmp_path / 'conf.d' / '..' / 'fresh.crl'}]"] == "PASS", out
    assert lines[f"client_cert.crl[{tmp_path / 'conf.d' / '..' / 'stale.crl'}]"] == "FAIL", out
    assert lines[f"client_cert.crl[{fresh_url}]"] == "PASS", out
    assert lines[f"client_cert.crl[{dead}]"] == "FAIL", out
    assert lines[f"client_cert.ocsp[{server.url('/ocsp')}]"] == "PASS", out
    assert "DOWN  client_cert.crl[" in out  # readiness: the stale CRL and the unreachable URL
    assert result.returncode == 1


@pytest.mark.parametrize("settings, message", [
    ({"ca_bundle": "root.pem"}, "client_cert.revocation: required key is missing"),
    ({"ca_bundle": "root.pem", "revocation": "sometimes"},
     "client_cert.revocation: Input should be 'off', 'soft-fail' or 'hard-fail'"),
    ({"ca_bundle": "root.pem", "revocation": "off", "mapping": {"rules": ["subject"]}}, "needs a `pattern`"),
    ({"ca_bundle": "root.pem", "revocation": "off", "headers": [{"name": "Authorization", "format": "pem"}]},
     "never reaches plugins"),
    ({"ca_bundle": "root.pem", "revocation": {"policy": "soft-fail", "crl_urls": ["ldap://x/"]}}, "only http"),
    ({"ca_bundle": "missing.pem", "revocation": "off"}, "missing.pem"),
])
def test_settings_errors(tmp_path, root, settings, message):
    write_bundle(tmp_path / "conf.d" / "root.pem", root)
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"]}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
    })
    result = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr, result.stderr


# -- the listener's own chain (issue 15) ----------------------------------------------------------------


def _cross_signed(ca: CA, by: CA) -> x509.Certificate:
    """*ca*'s name and key in a certificate *by* signed: a second issuer for all *ca* issued."""
    now = dt.datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(by.cert.subject)
            .public_key(ca.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(by.key, hashes.SHA256()))


def test_served_chain_is_the_path_openssl_would_build_on_each_handshake(root, issuing):
    """A certificate file with the server's certificate alone: OpenSSL would look its issuers up
    in the trust store on every handshake and send them, the root included; they are found
    once. A file that holds a chain, or a certificate with no single path to a root, is left
    to OpenSSL as before (None)."""
    from gateway.plugins.client_cert.listener import served_chain

    leaf = issuing.issue("localhost", dns=["localhost"], server=True)
    by_root = root.issue("localhost", dns=["localhost"], server=True)
    stranger = CA.create("another root CA")
    trust = [root.cert, issuing.cert, stranger.cert]
    assert served_chain(leaf.pem, trust) == [issuing.cert, root.cert]
    assert served_chain(by_root.pem, trust) == [root.cert]
    assert served_chain(by_root.pem, [root.cert, root.cert]) == [root.cert]  # a bundle listing it twice
    assert served_chain(leaf.pem + issuing.pem, trust) is None  # sent as the file has it
    assert served_chain(leaf.pem, [root.cert]) is None  # the issuing CA is not in the bundle
    assert served_chain(leaf.pem, [issuing.cert]) is None  # no root above it
    assert served_chain(stranger.pem, trust) is None  # self-signed: nothing to add
    # An issuer with the right name but another key does not sign the certificate.
    impostor = stranger.issue("units issuing CA", ca=True)
    assert served_chain(leaf.pem, [root.cert, impostor.cert]) is None
    assert served_chain(leaf.pem, [root.cert, impostor.cert, issuing.cert]) == [issuing.cert, root.cert]
    # Two certificates of the issuing CA's key (cross-signed): a choice left to OpenSSL.
    assert served_chain(leaf.pem, [*trust, _cross_signed(issuing, stranger)]) is None
    with pytest.raises(ValueError):
        served_chain(b"not a certificate", trust)


def test_listener_context_without_a_writable_temporary_directory(tmp_path, root, issuing, monkeypatch):
    """The chain goes to a temporary file for the ssl module to read; with none to be had the
    listener still starts (OpenSSL builds the chain itself, as before). Either way no file is
    left behind, and the context serves: a handshake with a client that trusts only the root."""
    import ssl
    import tempfile

    from gateway.plugins.client_cert.listener import ssl_context_factory
    from gateway.plugins.client_cert.settings import ListenerSettings

    crt, key = issuing.issue("localhost", dns=["localhost"], server=True).write(tmp_path, "server")
    settings = ListenerSettings(address="127.0.0.1:1", certificate=str(crt), key=str(key))
    client = ssl.create_default_context(cadata=root.pem.decode())
    for directory in (tmp_path / "tmp", tmp_path / "missing"):
        if directory.name == "tmp":
            directory.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(directory))
        server = ssl_context_factory(settings, [root.cert, issuing.cert])()
        client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(client_in, client_out, server_hostname="localhost")
        s = server.wrap_bio(server_in, server_out, server_side=True)
        done = set()
        for _ in range(10):
            for name, end, src, dst in (("client", c, client_out, server_in), ("server", s, server_out, client_in)):
                if name not in done:
                    try:
                        end.do_handshake()
                        done.add(name)
                    except ssl.SSLWantReadError:
                        pass
                if data := src.read():
                    dst.write(data)
        assert done == {"client", "server"}, directory  # the chain reached a client knowing only the root
        if directory.exists():
            assert not list(directory.iterdir())


@pytest.mark.parametrize("where", ["status", "headers", "body"])
def test_a_fetch_ends_at_its_deadline_however_slowly_the_server_sends(where):
    """Every byte restarted the socket timeout, and the deadline was checked only between 64 KiB
    reads: a responder sending a byte a second held a chain thread for good (review: every
    certificate login then got 503). The fetch now ends at its deadline, whatever it is reading."""
    import socket
    import threading

    from gateway.plugins.client_cert.fetch import FetchError, fetch

    answer = {"status": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
              "headers": b"HTTP/1.1 200 OK\r\n" + b"X-Slow: 1\r\n" * 50 + b"\r\n",
              "body": b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100}[where]
    start = {"status": 0, "headers": 17, "body": 19}[where]
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer[:start])
            for byte in answer[start:]:
                if stop.wait(0.3):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(FetchError, match="no complete answer within 1.0s"):
            fetch(f"http://127.0.0.1:{server.getsockname()[1]}/crl", timeout=1.0, max_bytes=1 << 20)
        assert time.monotonic() - started < 10  # its deadline, not the server's pace (~15 s at least)
    finally:
        stop.set()
        server.close()
        thread.join(timeout=5)


def test_a_fetch_ends_at_its_deadline_however_slowly_the_name_is_looked_up(monkeypatch):
    """The C resolver takes no timeout: a DNS server that does not answer held a chain thread
    for the resolver's own timeouts, seconds per server, past the attempt's deadline. A stalled
    lookup now ends the fetch at its deadline, and stalled lookups do not pile up threads. (The
    system resolver is replaced by one that stalls: no DNS server is reachable from a test.)"""
    import socket
    import threading

    from gateway.plugins.client_cert import fetch as fetching

    release = threading.Event()
    real = socket.getaddrinfo
    asked: list[str] = []

    def stalled(host, *args, **kwargs):
        asked.append(host)
        if host.endswith(".stalled.test"):
            release.wait(30)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    try:
        started = time.monotonic()
        with pytest.raises(fetching.FetchError, match=r"^http://crl\.stalled\.test/a\.crl\?…: the name crl\.stalled\.test "
                                                        "was not looked up in time$"):
            fetching.fetch("http://crl.stalled.test/a.crl?token=s3cret", timeout=0.5, max_bytes=1024)
        assert time.monotonic() - started < 10  # its deadline, not the resolver's (30 s here)
        for _ in range(7):  # every lookup slot taken by a lookup that does not end
            with pytest.raises(fetching.FetchError, match="not looked up in time"):
                fetching.fetch("http://crl.stalled.test/a.crl", timeout=0.05, max_bytes=1024)
        before = len(asked)
        with pytest.raises(fetching.FetchError, match="name lookups are backed up"):
            fetching.fetch("http://crl.stalled.test/a.crl", timeout=5, max_bytes=1024)
        assert len(asked) == before  # failed at once: no ninth thread
        # A literal address needs no lookup, so it is fetched even then (here: nothing listens).
        with pytest.raises(fetching.FetchError, match="ConnectionRefusedError"):
            fetching.fetch(f"http://127.0.0.1:{free_port()}/a.crl", timeout=5, max_bytes=1024)
    finally:
        release.set()
    # The stalled lookups end: their slots are free again.
    deadline = time.monotonic() + 10
    while fetching._LOOKUPS._value < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(fetching.FetchError, match="ConnectionRefusedError"):
        fetching.fetch(f"http://crl.stalled.test:{free_port()}/a.crl", timeout=5, max_bytes=1024)


@pytest.mark.parametrize("name, verified", [("localhost", True), ("elsewhere.example", False)])
def test_an_https_fetch_checks_the_certificate_for_the_urls_name(tmp_path, monkeypatch, name, verified):
    """The name is looked up once and the connection made to its address, so the TLS check must
    still be for the name in the URL (here: a server for *name* reached as ``localhost``)."""
    import http.server
    import ssl
    import threading

    from gateway.plugins.client_cert.fetch import FetchError, fetch
    from support.pki import CA

    ca = CA.create("fetch test CA")
    crt, key = ca.issue(name, dns=[name], server=True).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the "system" trust store

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"a crl")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://localhost:{server.server_address[1]}/a.crl"
        if verified:
            assert fetch(url, timeout=5, max_bytes=1024) == b"a crl"
        else:
            with pytest.raises(FetchError, match="certificate verify failed: Hostname mismatch"):
                fetch(url, timeout=5, max_bytes=1024)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("spelling", ["ｆｒａｎｋ", "fran\u212a", "\u2003frank", "frank\u00a0", "frank\t", "frank\n",
                                      " frank", "frank ", "fr\u200bank", "frank\u202e", "fr\u00adank"],
                         ids=["fullwidth", "kelvin", "em-space", "nbsp", "tab", "newline", "space-before",
                              "space-after", "zero-width", "bidi", "soft-hyphen"])
def test_a_name_spelt_other_than_plainly_maps_to_no_one(spelling):
    """With a certificate the name is the whole credential, and a directory matches names
    loosely: OpenLDAP's caseIgnoreMatch took ``ｆｒａｎｋ``, ``fran<Kelvin sign>`` and ``frank``
    padded with white space for frank, and the certificate logged in as frank (review of the
    client_cert plugin). Such a name now maps to no one."""
    from gateway.plugins.client_cert.mapping import candidates
    from gateway.plugins.client_cert.settings import MappingRule
    from support.pki import CA

    ca = CA.create()
    crafted = ca.issue(spelling, upn=f"{spelling}@example.com", emails=["x@example.com"], client=True)
    rules = [MappingRule(type="cn"), MappingRule(type="upn"), MappingRule(type="cn", lowercase=True),
             MappingRule(type="upn", domains=["example.com"], lowercase=True),
             MappingRule(type="cn", pattern=r"^(?P<user>.+)$")]
    for rule in rules:
        assert candidates(rule, crafted.cert) == [], (rule, spelling)
    plain = ca.issue("Frank Smith", upn="frank@example.com", client=True)
    assert candidates(MappingRule(type="cn"), plain.cert) == ["Frank Smith"]  # a space inside is a name's
    assert candidates(MappingRule(type="upn", lowercase=True), plain.cert) == ["frank"]


def test_a_header_name_or_oid_ending_in_a_line_break_is_refused():
    # The patterns ended in `$`, which re.match lets match before a final newline.
    from pydantic import ValidationError

    from gateway.plugins.client_cert.settings import HeaderSource, _oid

    assert HeaderSource(name="X-SSL-Client-Cert", format="pem").name == "x-ssl-client-cert"
    with pytest.raises(ValidationError, match="not an HTTP header name"):
        HeaderSource(name="X-SSL-Client-Cert\n", format="pem")
    assert _oid("1.3.6.1.5.5.7.3.2") == "1.3.6.1.5.5.7.3.2"
    with pytest.raises(ValueError, match="not a dotted OID"):
        _oid("1.3.6.1.5.5.7.3.2\n")
