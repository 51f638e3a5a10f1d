"""Review of time: dates and durations far out of range are refused or shown, never an exception.

* client_cert: a CA-signed CRL or OCSP answer whose nextUpdate is in year 9999 (RFC 5280's
  "no well-defined expiration" date) plus a grace or clock tolerance overflowed ``datetime``, and
  the login became ``internal_error``, a refusal even under soft-fail; the age settings are bounded.
* relay: ``authgw relay ticket --lifetime`` is checked before a ticket is stored; connector
  certificates never outlive the relay CA (``RelayCA.sign``), ``certificate_lifetime`` is bounded.
* link frames: a JSON integer deadline (or any number) no float holds is a malformed frame.
* ``authgw cache list|show`` and ``authgw relay connectors`` print ``?`` for a stored time no date
  holds.

Certificates, CRLs and OCSP answers are real (``support.pki``, ``support.ocsp``); commands run as
an operator runs them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import sqlite3
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import Attempt, CertificateCredential, Outcome
from gateway.plugins import linkproto as proto
from gateway.plugins.relay.ca import RelayCA
from gateway.runtime import build_runtime
from support.chainhelp import attempt
from support.gateway import authgw, write_conf
from support.linkenv import Relay
from support.ocsp import PkiServer
from support.pki import CA, write_bundle

UTC = dt.timezone.utc
#: The last second a certificate, CRL or OCSP answer can name (GeneralizedTime 99991231235959Z).
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


# -- client certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    pki_server = PkiServer().start()
    yield pki_server
    pki_server.stop()


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.create("time root CA", days=365)


@pytest.fixture(scope="module")
def issuing(root) -> CA:
    return root.issue("time issuing CA", ca=True, not_after=dt.datetime.now(UTC) + dt.timedelta(days=200))


def _runtime(directory, root: CA, issuing: CA, revocation: dict):
    write_bundle(directory / "conf.d" / "root.pem", root)
    write_bundle(directory / "conf.d" / "issuing.pem", issuing)
    settings = {"ca_bundle": "root.pem", "intermediates": "issuing.pem", "revocation": revocation,
                "mapping": {"rules": ["cn"], "lookup": False}}
    conf = write_conf(directory / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"], "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
    })
    return build_runtime(conf, state_dir=directory / "state")


def _decide(runtime, cert):
    return runtime.gateway.decide(Attempt(
        request_id="t", client=ipaddress.ip_address("127.0.0.1"), front_door="forward_auth",
        deadline=time.monotonic() + 5, certificate=CertificateCredential((cert.der,), "tls")))


@pytest.mark.parametrize("policy", ["soft-fail", "hard-fail"])
def test_a_crl_valid_until_year_9999_with_a_grace_answers(tmp_path, root, issuing, policy):
    """nextUpdate 9999-12-31 + crl_grace 60 s overflowed in LoadedCrl.too_old: internal_error."""
    listed, clean = issuing.issue("amy", client=True), issuing.issue("amy", client=True)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "far.crl").write_bytes(issuing.crl([listed], next_update=LAST))
    runtime = _runtime(tmp_path, root, issuing, {"policy": policy, "crl_files": ["far.crl"], "crl_grace": 60,
                                                 "crl_max_age": 365 * 86400, "ocsp": False})
    try:
        good = _decide(runtime, clean)
        assert good.success, good
        assert good.identity.claims["certificate_revocation"] == "good"
        revoked = _decide(runtime, listed)
        assert (revoked.outcome, revoked.reason) == (Outcome.INVALID_CREDENTIALS, "cert.revoked")
    finally:
        runtime.discard()


@pytest.mark.parametrize("responder", ["ca", "delegate until 9999"])
def test_an_ocsp_answer_valid_until_year_9999_answers(tmp_path, root, issuing, server, responder):
    """nextUpdate 9999-12-31 + the clock tolerance overflowed in OcspClient.judge, as did a
    delegated responder certificate's notAfter 99991231235959Z + the tolerance."""
    ca = root.issue(f"time OCSP CA {responder}", ca=True, not_after=dt.datetime.now(UTC) + dt.timedelta(days=200))
    delegate = ca.issue("time responder", ekus=[ExtendedKeyUsageOID.OCSP_SIGNING], not_after=LAST) \
        if responder != "ca" else None
    server.add_issuer(ca, delegate)
    url = server.url("/ocsp")
    good, revoked = ca.issue("amy", client=True, ocsp_url=url), ca.issue("amy", client=True, ocsp_url=url)
    server.revoke(revoked)
    # nextUpdate within the tolerance (60 s) of the last date there is
    server.validity = LAST - dt.datetime.now(UTC) - dt.timedelta(seconds=20)
    runtime = _runtime(tmp_path, root, ca, {"policy": "soft-fail", "ocsp_cache_seconds": 0})
    try:
        allowed = _decide(runtime, good)
        assert allowed.success and allowed.identity.claims["certificate_revocation"] == "good", allowed
        refused = _decide(runtime, revoked)
        assert (refused.outcome, refused.reason) == (Outcome.INVALID_CREDENTIALS, "cert.revoked")
    finally:
        server.validity = dt.timedelta(hours=1)
        runtime.discard()


def test_revocation_ages_are_bounded(tmp_path, root):
    """1e12 or .inf seconds overflowed every login's date arithmetic; now `config check` refuses."""
    write_bundle(tmp_path / "conf.d" / "root.pem", root)
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"]}),
        "client_cert.yaml": "client_cert:\n  ca_bundle: root.pem\n  revocation:\n    policy: soft-fail\n"
                            "    crl_grace: .inf\n    crl_max_age: 1e12\n    ocsp_max_age: 1.0e+12\n"
                            "    ocsp_cache_seconds: .nan\n",
    })
    result = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2, result.stdout
    for key in ("crl_grace", "crl_max_age", "ocsp_max_age", "ocsp_cache_seconds"):
        assert f"client_cert.revocation.{key}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- relay tickets and certificates ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    return Relay(tmp_path_factory.mktemp("relay")).setup()  # the CLI alone: no serving process


def _tickets(relay) -> list:
    return sqlite3.connect(relay.state / "relay" / "relay.sqlite3").execute("SELECT expires FROM tickets").fetchall()


def test_a_ticket_lifetime_is_checked_before_anything_is_stored(relay):
    """1e308, inf and 3e11 stored a ticket expiring at inf then failed to print its URL; nan
    was an IntegrityError traceback. Now: exit 2 and nothing stored; 30 days still works."""
    for lifetime in ("1e308", "inf", "nan", "3e11", "0", "-5", "2592001"):
        before = _tickets(relay)
        result = relay.cli("relay", "ticket", relay.connection, f"--lifetime={lifetime}")
        assert result.returncode == 2, (lifetime, result.stdout, result.stderr)
        assert "--lifetime" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stdout == "" and _tickets(relay) == before, lifetime
    before = set(_tickets(relay))
    result = relay.cli("relay", "ticket", relay.connection, "--lifetime", "2592000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{relay.url}/p/") and "valid until" in result.stderr
    (expires,), = set(_tickets(relay)) - before
    assert time.time() + 2592000 - 60 < expires <= time.time() + 2592000


@pytest.mark.parametrize("key, value", [("certificate_lifetime", 1e9), ("certificate_lifetime", 3e11),
                                        ("ticket_lifetime", 1e308)])
def test_relay_lifetimes_are_bounded(tmp_path, key, value):
    relay = Relay(tmp_path / "relay", settings={key: value})
    result = relay.cli("config", "check")
    assert result.returncode == 2, result.stdout
    assert f"relay.{key}" in result.stderr and "Traceback" not in result.stderr


def _csr(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_a_connector_certificate_never_outlives_the_relay_ca(tmp_path):
    """RelayCA.sign(lifetime=3e11) raised OverflowError; 1e9 gave a certificate past the CA's end."""
    ca = RelayCA.load_or_create(tmp_path, "acme")
    for lifetime in (1e9, 3e11, 1e308):
        cert = ca.sign(_csr("acme-00000001"), connector_id="acme-00000001", connection="acme", lifetime=lifetime)
        assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc
    cert = ca.sign(_csr("acme-00000001"), connector_id="acme-00000001", connection="acme", lifetime=90 * 86400)
    assert abs((cert.not_valid_after_utc - dt.datetime.now(UTC)).total_seconds() - 90 * 86400) < 60
    for lifetime in (float("inf"), float("nan"), 0):
        with pytest.raises(ValueError):
            ca.sign(_csr("acme-00000001"), connector_id="acme-00000001", connection="acme", lifetime=lifetime)


def test_the_relay_listener_certificate_lasts_as_long_as_the_relay_ca(tmp_path):
    """It lasted 365 days and is issued only at start: a relay that ran a year lost every
    connector at once (review of time)."""
    ca = RelayCA.load_or_create(tmp_path, "acme")
    cert_path, _key = ca.server_certificate(tmp_path / "tls", ["relay.example", "127.0.0.1"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


# -- link frames --------------------------------------------------------------------------------------------


NOW = 1_800_000_000.0


@pytest.mark.parametrize("deadline", ["1" + "0" * 400, "-1" + "0" * 400])
def test_a_deadline_no_float_holds_is_a_malformed_frame(deadline):
    """math.isfinite(10**400) raises OverflowError: it escaped both read loops and dropped the link."""
    text = '{"v": %d, "id": "abc", "type": "authenticate", "deadline": %s, "nonce": "%s", "body": {}}' % (
        proto.VERSION, deadline, "n" * 22)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(text, now=NOW, guard=proto.ReplayGuard())
    assert refused.value.code == "bad_request"


def test_an_integer_no_float_holds_is_refused_anywhere_in_a_frame():
    text = '{"v": %d, "id": "abc", "type": "answer", "body": {"time": 1%s}}' % (proto.VERSION, "0" * 400)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(text, now=NOW)
    assert refused.value.code == "bad_request"
    # a large integer a float does hold still reads, as an integer
    message = proto.decode('{"v": %d, "id": "abc", "type": "answer", "body": {"n": %d}}' % (proto.VERSION, 2**80),
                           now=NOW)
    assert message.body == {"n": 2**80}


# -- stored times the listings print --------------------------------------------------------------------------


@pytest.fixture
def cached(tmp_path, demo_hash):
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": "chain: [static]\nplugins: [cache]\nthrottle: {enabled: false}\n",
        "static.yaml": f"static: {{users_file: {tmp_path / 'users.yaml'}}}\n",
        "cache.yaml": "cache: {methods: [static]}\n",
    })
    write_conf(tmp_path, {"users.yaml": f'users:\n  alice:\n    password_hash: "{demo_hash}"\n'})
    state = tmp_path / "state"
    runtime = build_runtime(conf, state_dir=state)
    runtime.gateway.startup()
    try:
        assert asyncio.run(runtime.gateway.authenticate(attempt("alice", "demo-password"))).success
    finally:
        runtime.close()
    return conf, state


@pytest.mark.parametrize("stored_at", [1e20, -1e20, float("inf")])
def test_cache_listings_print_a_time_no_date_holds_as_unknown(cached, stored_at):
    conf, state = cached
    files = [path for path in state.rglob("*.sqlite3") if "entries" in str(
        sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall())]
    assert len(files) == 1, files
    with sqlite3.connect(files[0]) as db:
        assert db.execute("UPDATE entries SET stored_at = ?", (stored_at,)).rowcount == 1
    for action in (["list"], ["show", "alice"]):
        result = authgw("cache", *action, "--config", str(conf), "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "?" in result.stdout
        assert "not used offline (its time was changed in the store)" in result.stdout


def test_relay_connectors_print_a_time_no_date_holds_as_unknown(relay):
    with sqlite3.connect(relay.state / "relay" / "relay.sqlite3") as db:
        db.execute("INSERT INTO connectors (id, connection, serial, not_after, enrolled, last_seen) "
                   "VALUES ('acme-0000000f', 'acme', 'f', 1e20, 0, 1e300)")
    result = relay.cli("relay", "connectors")
    assert result.returncode == 0, result.stderr
    line = [row for row in result.stdout.splitlines() if row.startswith("acme-0000000f")]
    assert len(line) == 1 and line[0].split()[-2:] == ["?", "?"], result.stdout


def test_a_cache_refresh_window_past_the_entries_life_is_refused():
    """refresh_after at or past max_age: an active user's entry, not renewed by logins within
    refresh_after, aged out between two of them (review of time)."""
    from gateway.plugins.cache.settings import CacheSettings

    with pytest.raises(ValueError, match="refresh_after"):
        CacheSettings.model_validate({"max_age": 600, "refresh_after": 600})
    assert CacheSettings.model_validate({"max_age": 600, "refresh_after": 300}).refresh_after == 300
