"""Stop 46 attack review of the client_cert plugin, against real ``authgw serve`` processes
(their TLS listener, or the XFCC header from a trusted proxy), certificates from a throwaway PKI
and a real slapd. (The Kerberos plugin was attacked too; nothing new was found there.)

``required_policies`` is the operator's ``user-initial-policy-set`` with an explicit policy
required (RFC 5280 section 6.1): a leaf asserting the OID is in that policy only when every CA
certificate on its path below the trust anchor asserts it too (or anyPolicy). A root with two
issuing CAs, a high-assurance one certified for the OID and a low-assurance one certified for
another policy, let the low-assurance CA's leaf that names the OID log in, which OpenSSL's
``-policy OID -explicit_policy`` refuses. A CA certificate without certificatePolicies is taken
as unconstrained (Windows' reading; the existing hierarchies of test_client_cert.py have one).

``require_directory_match`` is the docs' remedy for a trusted partner CA that can write any UPN
or CN; two of its strong mappings were something such a CA can copy: the subjectKeyIdentifier
(public, and written by the issuing CA) and the issuer name with a serial (a CA of the corporate
CA's name, made by the partner CA and forwarded in the client's chain). The ``issuer_serial``
rule read the latter the same way.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support.gateway import GatewayProcess, write_conf
from support.http import Response
from support.net import free_port, wait_for_port
from support.pki import CA, Issued, write_bundle
from support.slapd import Slapd

HIGH = "1.3.6.1.4.1.55555.46.1"  # e.g. "smart card, in person"
LOW = "1.3.6.1.4.1.55555.46.2"   # e.g. "software certificate, enrolled online"
ANY_POLICY = "2.5.29.32.0"


@pytest.fixture(scope="module")
def policy_pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("policy_pki")
    root = CA.create("stop46 policy root", days=30)
    cas = {
        "high": root.issue("stop46 high assurance CA", ca=True, policies=[HIGH]),
        "any": root.issue("stop46 any-policy CA", ca=True, policies=[ANY_POLICY]),
        "low": root.issue("stop46 low assurance CA", ca=True, policies=[LOW]),
        "none": root.issue("stop46 CA without policies", ca=True),
    }
    # A CA certified for HIGH under the low-assurance CA: the CA above it still constrains it.
    cas["under_low"] = cas["low"].issue("stop46 high CA under the low one", ca=True, policies=[HIGH])
    # anyPolicy under a CA that inhibits it: RFC 5280 ignores the lower CA's anyPolicy.
    cas["inhibiting"] = _inhibiting_ca(root)
    cas["under_inhibit"] = cas["inhibiting"].issue("stop46 any-policy CA under it", ca=True, policies=[ANY_POLICY])
    write_bundle(directory / "root.pem", root)
    write_bundle(directory / "intermediates.pem", *cas.values())
    root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(directory, "server")
    for name, ca in cas.items():
        # Every leaf asserts the high-assurance policy: only the CA above it tells them apart.
        ca.issue("henry", client=True, policies=[HIGH]).write(directory, name)
    return directory


def _inhibiting_ca(root: CA) -> CA:
    """A CA under *root* certified for anyPolicy that inhibits anyPolicy below it (skipCerts 0). RFC 5280
    says the extension is critical; cryptography's verifier refuses a path with a critical one
    (fail closed), so it is non-critical here, which OpenSSL honours too."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    root.serial += 1
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stop46 inhibiting CA")]))
            .issuer_name(root.cert.subject).public_key(key.public_key()).serial_number(root.serial)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier(ANY_POLICY), None)]),
                           critical=False)
            .add_extension(x509.InhibitAnyPolicy(0), critical=False)  # critical: cert.untrusted (see above)
            .sign(root.key, hashes.SHA256()))
    return CA(cert, key, serial=root.serial * 100)


@pytest.fixture(scope="module")
def policy_gw(policy_pki: Path, tmp_path_factory):
    port = free_port()
    settings = {
        "ca_bundle": str(policy_pki / "root.pem"),
        "intermediates": str(policy_pki / "intermediates.pem"),
        "listener": {"address": f"127.0.0.1:{port}", "certificate": str(policy_pki / "server.crt"),
                     "key": str(policy_pki / "server.key")},
        "required_policies": [HIGH],
        "revocation": {"policy": "off"},
        "mapping": {"lookup": False, "rules": ["cn"]},
    }
    base = tmp_path_factory.mktemp("policy_gw")
    conf = write_conf(base / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"], "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
    })
    gateway = GatewayProcess(conf, base / "state").start()
    try:
        wait_for_port("127.0.0.1", port, timeout=15, proc=gateway.proc)
    except Exception:
        gateway.stop()
        raise
    gateway.tls_port = port
    yield gateway
    gateway.stop()


def _tls_auth(gateway: GatewayProcess, directory: Path, name: str) -> Response:
    context = ssl.create_default_context(cafile=str(directory / "root.pem"))
    context.load_cert_chain(str(directory / f"{name}.crt"), str(directory / f"{name}.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.tls_port, context=context, timeout=15)
    try:
        conn.request("GET", "/auth")
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def _audit(gateway: GatewayProcess, response: Response) -> dict:
    return gateway.audit_for(response.header("X-Request-Id"))


def _openssl_accepts(directory: Path, name: str) -> bool:
    """OpenSSL's RFC 5280 verdict with HIGH as the explicit initial policy set (the reference)."""
    result = subprocess.run(["openssl", "verify", "-CAfile", str(directory / "root.pem"), "-untrusted",
                             str(directory / "intermediates.pem"), "-policy", HIGH, "-explicit_policy",
                             str(directory / f"{name}.crt")], capture_output=True, text=True, timeout=30)
    return result.returncode == 0


@pytest.mark.parametrize("name", ["high", "any", "none"])
def test_a_leaf_under_a_ca_certified_for_the_required_policy_logs_in(policy_gw, policy_pki, name):
    # "none": a CA certificate without certificatePolicies constrains nothing, as Windows reads it
    # (AD CS subordinate CAs commonly have none); RFC 5280 and OpenSSL would refuse its leaves.
    assert _openssl_accepts(policy_pki, name) == (name != "none")
    response = _tls_auth(policy_gw, policy_pki, name)
    assert response.status == 200, response.body
    assert response.header("Remote-User") == "henry"


@pytest.mark.parametrize("name", ["low", "under_low", "under_inhibit"])
def test_required_policy_is_refused_when_an_intermediate_is_not_certified_for_it(policy_gw, policy_pki, name):
    # The leaf asserts HIGH, but a CA on its path is certified for LOW only: under RFC 5280 the
    # leaf is in no required policy. It logged in as henry.
    assert not _openssl_accepts(policy_pki, name)
    response = _tls_auth(policy_gw, policy_pki, name)
    assert response.status == 401, response.body
    assert response.header("Remote-User") is None
    record = _audit(policy_gw, response)
    assert (record["outcome"], record["reason"]) == ("invalid_credentials", "cert.policy_missing"), record


# -- require_directory_match: an X509:<SKI> mapping binds the key, not an SKI a CA wrote ----------------

CORP_UPN = "alice@corp.example.com"


@pytest.fixture(scope="module")
def binding_world(tmp_path_factory):
    """slapd with alice, whose altSecurityIdentities (read from ``description``) is the strong
    ``X509:<SKI>`` mapping of her smart card; a root with the corporate CA and a partner CA (the
    constrained partner or group CA of docs/plugins/client_cert.md, "Name constraints do not limit
    the names the rules read", whose remedy is ``require_directory_match``)."""
    directory = tmp_path_factory.mktemp("binding_pki")
    root = CA.create("stop46 binding root", days=30)
    corp = root.issue("stop46 corporate CA", ca=True)
    partner = root.issue("stop46 partner CA", ca=True)
    write_bundle(directory / "root.pem", root)
    write_bundle(directory / "intermediates.pem", corp, partner)
    root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(directory, "server")
    alice = corp.issue("Alice", client=True, upn=CORP_UPN)
    alice.write(directory, "alice")
    ski = alice.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # The partner CA's certificate for its own key, carrying alice's UPN and alice's (public) SKI.
    forged = partner.issue("Alice", client=True, upn=CORP_UPN)
    key = forged.key
    now = dt.datetime.now(dt.timezone.utc)
    partner.serial += 1
    builder = (x509.CertificateBuilder().subject_name(forged.cert.subject).issuer_name(partner.cert.subject)
               .public_key(key.public_key()).serial_number(partner.serial)
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7)))
    for ext in forged.cert.extensions:
        value = x509.SubjectKeyIdentifier(ski) if isinstance(ext.value, x509.SubjectKeyIdentifier) else ext.value
        builder = builder.add_extension(value, ext.critical)
    Issued(builder.sign(partner.key, hashes.SHA256()), key).write(directory, "forged")

    slapd = Slapd(directory / "slapd").start()
    try:
        slapd.add_user("alice", "alice-pw", extra={"description": f"X509:<SKI>{ski.hex().upper()}"})
        yield directory, slapd
    finally:
        slapd.stop()


@pytest.fixture(scope="module")
def binding_gw(binding_world, tmp_path_factory):
    directory, slapd = binding_world
    port = free_port()
    settings = {
        "ca_bundle": str(directory / "root.pem"),
        "intermediates": str(directory / "intermediates.pem"),
        "listener": {"address": f"127.0.0.1:{port}", "certificate": str(directory / "server.crt"),
                     "key": str(directory / "server.key")},
        "revocation": {"policy": "off"},
        # The docs' advice for a trusted partner CA: your domain only, and the directory confirms.
        "mapping": {"lookup": True, "require_directory_match": True,
                    "rules": [{"type": "upn", "domains": ["corp.example.com"]}]},
    }
    ldap = slapd.plugin_settings(mode="plain", attributes={"altSecurityIdentities": "description"})
    base = tmp_path_factory.mktemp("binding_gw")
    conf = write_conf(base / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert", "ldap"], "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
        "ldap.yaml": json.dumps({"ldap": ldap}),
    })
    gateway = GatewayProcess(conf, base / "state").start()
    try:
        wait_for_port("127.0.0.1", port, timeout=15, proc=gateway.proc)
    except Exception:
        gateway.stop()
        raise
    gateway.tls_port = port
    yield gateway
    gateway.stop()


def test_alices_own_certificate_meets_her_ski_mapping(binding_world, binding_gw):
    directory, _ = binding_world
    response = _tls_auth(binding_gw, directory, "alice")
    assert response.status == 200, (response.body, binding_gw.output()[-2000:])
    assert response.header("Remote-User") == "alice"


def test_a_trusted_cas_certificate_with_alices_ski_on_another_key_is_not_alice(binding_world, binding_gw):
    # The partner CA copied alice's SKI (it is in her certificate, which is public) into a
    # certificate for a key of its own with her UPN: it met her X509:<SKI> mapping and logged in
    # as alice, the one thing require_directory_match is there to stop.
    directory, _ = binding_world
    response = _tls_auth(binding_gw, directory, "forged")
    assert response.status == 401, response.body
    assert response.header("Remote-User") is None
    record = _audit(binding_gw, response)
    assert (record["outcome"], record["reason"]) == ("invalid_credentials", "cert.directory_mismatch"), record


# -- require_directory_match: X509:<I>..<SR>.. names the issuer the operator configured ---------------


@pytest.fixture(scope="module")
def serial_world(tmp_path_factory):
    """slapd with alice, whose altSecurityIdentities is the strong ``X509:<I>..<SR>..`` mapping
    (AD's form) of her certificate from the corporate CA; a partner CA (no path length limit, as
    CA certificates mostly have) under the same root."""
    directory = tmp_path_factory.mktemp("serial_pki")
    root = CA.create("stop46 serial root", days=30)
    corp = root.issue("stop46 corporate issuing CA", ca=True)
    partner = root.issue("stop46 partner issuing CA", ca=True)
    write_bundle(directory / "root.pem", root)
    write_bundle(directory / "intermediates.pem", corp, partner)
    alice = corp.issue("Alice", client=True, upn=CORP_UPN)
    (directory / "alice.pem").write_bytes(alice.pem)
    # The partner CA makes a CA of its own named as the corporate CA, which issues a certificate
    # with alice's UPN and alice's serial: issuer name and serial are all <I><SR> compares.
    lookalike = partner.issue("stop46 corporate issuing CA", ca=True)
    lookalike.serial = alice.cert.serial_number - 1
    forged = lookalike.issue("Alice", client=True, upn=CORP_UPN)
    assert (forged.cert.issuer, forged.cert.serial_number) == (alice.cert.issuer, alice.cert.serial_number)
    (directory / "forged.pem").write_bytes(forged.pem)
    (directory / "lookalike.pem").write_bytes(lookalike.pem)
    serial = alice.cert.serial_number.to_bytes((alice.cert.serial_number.bit_length() + 8) // 8, "big")
    issuer = ",".join(reversed(alice.cert.issuer.rfc4514_string().split(",")))  # AD: most significant first
    slapd = Slapd(directory / "slapd").start()
    try:
        slapd.add_user("alice", "alice-pw", extra={"description": f"X509:<I>{issuer}<SR>{serial[::-1].hex()}"})
        yield directory, slapd
    finally:
        slapd.stop()


@pytest.fixture(scope="module")
def serial_gw(serial_world, tmp_path_factory):
    directory, slapd = serial_world
    settings = {
        "ca_bundle": str(directory / "root.pem"),
        "intermediates": str(directory / "intermediates.pem"),
        # Envoy at 127.0.0.1 forwards the client's chain (XFCC Cert and Chain).
        "headers": [{"name": "X-Forwarded-Client-Cert", "format": "xfcc"}],
        "revocation": {"policy": "off"},
        "mapping": {"lookup": True, "require_directory_match": True,
                    "rules": [{"type": "upn", "domains": ["corp.example.com"]}]},
    }
    ldap = slapd.plugin_settings(mode="plain", attributes={"altSecurityIdentities": "description"})
    yield from _behind_xfcc_proxy(tmp_path_factory.mktemp("serial_gw"), settings, ldap)


def _behind_xfcc_proxy(base: Path, client_cert: dict, ldap: dict):
    """A gateway with the chain ``client_cert, ldap`` that trusts 127.0.0.1 to forward client
    certificates (the fixtures' body: started, yielded, stopped)."""
    conf = write_conf(base / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert", "ldap"], "trusted_proxies": ["127.0.0.1/32"],
                                    "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": client_cert}),
        "ldap.yaml": json.dumps({"ldap": ldap}),
    })
    gateway = GatewayProcess(conf, base / "state").start()
    yield gateway
    gateway.stop()


def _xfcc(directory: Path, leaf: str, *chain: str) -> str:
    value = f'Hash=00;Cert="{quote((directory / leaf).read_text(), safe="")}"'
    if chain:
        value += f';Chain="{quote("".join((directory / c).read_text() for c in chain), safe="")}"'
    return value


def test_alices_certificate_meets_her_issuer_serial_mapping(serial_world, serial_gw):
    directory, _ = serial_world
    response = serial_gw.get("/auth", {"X-Forwarded-Client-Cert": _xfcc(directory, "alice.pem")})
    assert response.status == 200, (response.body, serial_gw.output()[-2000:])
    assert response.header("Remote-User") == "alice"


def test_a_lookalike_issuer_from_the_clients_chain_does_not_meet_an_issuer_serial_mapping(serial_world, serial_gw):
    # The certificate verifies (lookalike CA -> partner CA -> root) and carries the corporate CA's
    # name and alice's serial, so it met her X509:<I><SR> mapping and logged in as alice.
    directory, _ = serial_world
    response = serial_gw.get("/auth", {"X-Forwarded-Client-Cert": _xfcc(directory, "forged.pem", "lookalike.pem")})
    assert response.status == 401, response.body
    assert response.header("Remote-User") is None
    record = _audit(serial_gw, response)
    assert (record["outcome"], record["reason"]) == ("invalid_credentials", "cert.directory_mismatch"), record


@pytest.fixture(scope="module")
def table_gw(serial_world, tmp_path_factory):
    """The ``issuer_serial`` rule (which docs/plugins/client_cert.md recommends where a partner CA
    is trusted) names alice's certificate by the corporate CA's name and her serial."""
    directory, slapd = serial_world
    alice = x509.load_pem_x509_certificate((directory / "alice.pem").read_bytes())
    settings = {
        "ca_bundle": str(directory / "root.pem"),
        "intermediates": str(directory / "intermediates.pem"),
        "headers": [{"name": "X-Forwarded-Client-Cert", "format": "xfcc"}],
        "revocation": {"policy": "off"},
        "mapping": {"lookup": True, "rules": [{"type": "issuer_serial", "certificates": [
            {"issuer": alice.issuer.rfc4514_string(), "serial": f"{alice.serial_number:x}", "user": "alice"}]}]},
    }
    yield from _behind_xfcc_proxy(tmp_path_factory.mktemp("table_gw"), settings, slapd.plugin_settings(mode="plain"))


def test_the_issuer_serial_rule_names_alice_by_her_certificate(serial_world, table_gw):
    directory, _ = serial_world
    response = table_gw.get("/auth", {"X-Forwarded-Client-Cert": _xfcc(directory, "alice.pem")})
    assert response.status == 200, (response.body, table_gw.output()[-2000:])
    assert response.header("Remote-User") == "alice"


def test_the_issuer_serial_rule_does_not_read_a_lookalike_issuer_from_the_clients_chain(serial_world, table_gw):
    # The lookalike CA's certificate with alice's serial was alice by the table.
    directory, _ = serial_world
    response = table_gw.get("/auth", {"X-Forwarded-Client-Cert": _xfcc(directory, "forged.pem", "lookalike.pem")})
    assert response.status == 401, response.body
    assert response.header("Remote-User") is None
    record = _audit(table_gw, response)
    assert record["reason"] == "cert.unmapped", record
